"""The converter: what it writes loads in both mlx-mixtral and mlx-lm with the right logits, and
nothing it is given, however broken, leaves a half-written model or a traceback behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_mixtral
from convert import writer
from convert.__main__ import main
from convert.convert import convert
from mlx_mixtral.checkpoint import INDEX_FILE, read_header
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.loading import load_model

from checkpoints import PROBE_TOKENS, bf16_logit_atol

REPO = Path(__file__).resolve().parents[1]
BATCH = [PROBE_TOKENS, PROBE_TOKENS[:1] + PROBE_TOKENS[:0:-1]]
SMALL_SHARDS = 3 * 10**6  # the tiny models are ~20 MB: force several output shards

# KL(transformers || converted) per position on BATCH, measured on the "gqa" fixture: 8-bit 0.005,
# 4-bit 0.73 (mlx-lm's everything-at-4-bit: 1.16). Hidden 64 in groups of 32 with std-0.25 weights
# quantizes far worse than Mixtral does (benchmarks/RESULTS.md, "Quantization quality").
MAX_KL = {8: 0.02, 4: 1.0}


def _logits(model, tokens=BATCH) -> np.ndarray:
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def _kl(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean KL(ref || out) of the next-token distributions, in nats."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lr, lo = log_softmax(ref), log_softmax(out)
    return float((np.exp(lr) * (lr - lo)).sum(-1).mean())


def _stored(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) over every shard of an output folder."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: (v["dtype"], v["shape"]) for k, v in read_header(f).items()})
    return out


def _nothing_left(dst: Path) -> None:
    assert not dst.exists()
    assert not [p.name for p in dst.parent.iterdir() if p.name.startswith(f"{dst.name}.")]


@pytest.fixture(scope="module")
def gqa(hf_checkpoint_factory) -> Path:
    return hf_checkpoint_factory("gqa")


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("converted")


@pytest.fixture(scope="module")
def q4(gqa, out_root) -> Path:
    """gqa, 4-bit, group size 32, float32: the converter's defaults for router/embeddings/lm_head."""
    return convert(gqa, out_root / "q4", quantize=True, bits=4, group_size=32, dtype="float32",
                   max_shard_bytes=SMALL_SHARDS, progress=False).path


def test_float_conversion_is_exact_and_sharded(gqa, tmp_path, hf_reference):
    summary = convert(gqa, tmp_path / "out", dtype="float32", max_shard_bytes=SMALL_SHARDS, progress=False)
    out = summary.path
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == summary.shards >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((out / INDEX_FILE).read_text())
    stored = _stored(out)
    assert set(index["weight_map"]) == set(stored) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == summary.nbytes
    assert "model.layers.1.block_sparse_moe.switch_mlp.down_proj.weight" in stored
    assert stored["model.layers.1.block_sparse_moe.switch_mlp.down_proj.weight"] == ("F32", [8, 64, 128])
    assert all(f.stat().st_size <= SMALL_SHARDS + 10**5 or len(read_header(f)) == 1 for f in out.glob("*.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float32"
    assert (out / "tokenizer.model").read_bytes() == (gqa / "tokenizer.model").read_bytes()
    assert (out / "tokenizer_config.json").is_file()
    assert summary.bits_per_weight == pytest.approx(32, rel=1e-3)
    model, _ = mlx_mixtral.load(out, progress=False)
    assert np.abs(_logits(model) - hf_reference.logits(gqa, BATCH)).max() < 1e-4


@pytest.mark.parametrize("variant", ["mha", "tied", "head_dim", "sliding_window", "experts4_top1", "experts6_top3"])
def test_every_fixture_variant_converts_exactly(variant, hf_checkpoint_factory, tmp_path, hf_reference):
    src = hf_checkpoint_factory(variant)
    out = convert(src, tmp_path / variant, dtype="float32", progress=False).path
    model, _ = mlx_mixtral.load(out, progress=False)
    tokens = [PROBE_TOKENS + PROBE_TOKENS[1:]]  # 33 tokens: past the 16-token sliding window
    np.testing.assert_allclose(_logits(model, tokens), hf_reference.logits(src, tokens), atol=1e-4)
    # quantized: close to transformers, and closer at 8 bits than at 4 (random tiny models quantize
    # unevenly: top-1 routing flips whole experts, so no one absolute bound fits every variant)
    reference = hf_reference.logits(src, tokens)
    kl = {bits: _kl(reference, _logits(load_model(convert(
        src, tmp_path / f"{variant}-q{bits}", quantize=True, bits=bits, group_size=32, dtype="float32",
        progress=False).path, progress=False), tokens)) for bits in (8, 4)}
    assert kl[8] < 0.4 and kl[8] < kl[4] / 2, kl


def test_float16_router_8_bit_lm_head_4_bit_and_sizes_through_the_cli(gqa, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--hf-path", str(gqa), "--mlx-path", str(out), "-q", "--q-group-size", "32", "--dtype", "float16",
                 "--router-bits", "8", "--lm-head-bits", "4", "--max-shard-size", "2.5MB"]) == 0
    assert "router 8-bit, embeddings 8-bit, lm_head 4-bit), float16" in capsys.readouterr().out
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["model.layers.0.block_sparse_moe.gate"] == {"group_size": 32, "bits": 8}
    assert "lm_head" not in q and q["model.embed_tokens"] == {"group_size": 32, "bits": 8}  # 4: the default
    stored = _stored(out)
    assert stored["model.layers.0.block_sparse_moe.gate.weight"] == ("U32", [8, 64 * 8 // 32])
    assert stored["lm_head.weight"] == ("U32", [32000, 64 * 4 // 32])
    assert stored["model.norm.weight"][0] == "F16" and stored["lm_head.scales"][0] == "F16"
    shards = list(out.glob("*.safetensors"))
    assert len(shards) >= 3 and all(f.stat().st_size <= 2_500_000 + 10**5 or len(read_header(f)) == 1 for f in shards)


@pytest.mark.parametrize("text,size", [("500MB", 500 * 10**6), ("2.5GB", 2_500_000_000), ("5gb", 5 * 10**9),
                                       ("123", 123), ("1.5 KB", 1500)])
def test_shard_sizes_parse_in_decimal_units(text, size):
    from convert.__main__ import parse_size

    assert parse_size(text) == size


def test_dequantize_our_mixed_output_through_the_cli(gqa, tmp_path, capsys, hf_reference):
    mixed, back = tmp_path / "mixed", tmp_path / "back"
    assert main(["--hf-path", str(gqa), "--mlx-path", str(mixed), "-q", "--q-bits", "8", "--q-group-size", "32",
                 "--embed-bits", "float", "--lm-head-bits", "4", "--dtype", "float32"]) == 0
    assert main(["--hf-path", str(mixed), "--mlx-path", str(back), "--dequantize"]) == 0
    assert "quantization" not in json.loads((back / "config.json").read_text())
    stored = _stored(back)
    assert not [k for k in stored if k.endswith((".scales", ".biases"))]
    assert stored["lm_head.weight"] == ("F32", [32000, 64])
    np.testing.assert_allclose(_logits(load_model(back, progress=False)), _logits(load_model(mixed, progress=False)),
                               atol=1e-4)


@pytest.mark.parametrize("what", ["file", "symlink"])
def test_force_onto_a_file_or_a_symlink(what, gqa, tmp_path):
    dst = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    if what == "file":
        dst.write_text("not a model")
    else:
        dst.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(MixtralError, match="already exists"):
        convert(gqa, dst, progress=False)
    convert(gqa, dst, force=True, dtype="float32", progress=False)
    assert dst.is_dir() and not dst.is_symlink() and (dst / "config.json").is_file()
    assert (elsewhere / "keep.txt").read_text() == "mine"  # what a link pointed to is not touched


def test_a_failure_after_force_keeps_the_old_destination(gqa, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    convert(gqa, dst, dtype="float32", progress=False)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "save_shard", full_disk) if hasattr(writer, "save_shard") else None
    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    with pytest.raises((MixtralError, OSError)):
        convert(gqa, dst, force=True, quantize=True, progress=False)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_bfloat16_sharded_source_stays_bfloat16(hf_checkpoint_factory, tmp_path, hf_reference):
    src = hf_checkpoint_factory("gqa", dtype="bfloat16", shards=3)
    out = convert(src, tmp_path / "out", progress=False).path  # default dtype: the source's
    assert {dtype for dtype, _ in _stored(out).values()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load_model(out, progress=False)
    reference = hf_reference.logits(src, BATCH)
    assert np.abs(_logits(model) - reference).max() < bf16_logit_atol(reference)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_output_stays_close_to_transformers(bits, gqa, q4, tmp_path, hf_reference, mlx_lm_converted):
    out = q4 if bits == 4 else convert(gqa, tmp_path / "q8", quantize=True, bits=8, group_size=32,
                                       dtype="float32", progress=False).path
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert {k: q[k] for k in ("group_size", "bits", "mode")} == {"group_size": 32, "bits": bits, "mode": "affine"}
    assert q["model.layers.0.block_sparse_moe.gate"] is False  # the router stays float
    small = {"group_size": 32, "bits": 8}  # embeddings and lm_head at 8 bits (already the default at 8)
    assert q.get("model.embed_tokens", small) == small and q.get("lm_head", small) == small
    stored = _stored(out)
    assert stored["model.layers.0.block_sparse_moe.switch_mlp.up_proj.weight"] == ("U32", [8, 128, 64 * bits // 32])
    assert stored["model.layers.0.block_sparse_moe.switch_mlp.up_proj.scales"] == ("F32", [8, 128, 2])
    assert "model.layers.0.block_sparse_moe.gate.scales" not in stored
    model, _ = mlx_mixtral.load(out, progress=False)
    reference = hf_reference.logits(gqa, BATCH)
    assert _kl(reference, _logits(model)) < MAX_KL[bits]
    if bits == 4:  # keeping router, embeddings and lm_head finer pays off
        theirs = load_model(mlx_lm_converted(gqa, quantize=True, bits=4, group_size=32), progress=False)
        assert _kl(reference, _logits(model)) < _kl(reference, _logits(theirs))


def test_mlx_lm_loads_our_output_with_the_same_logits(q4, mlx_lm_reference):
    ours = _logits(load_model(q4, progress=False))
    np.testing.assert_allclose(mlx_lm_reference.logits(q4, BATCH), ours, atol=1e-4)


def test_we_load_mlx_lm_output_and_dequantize_it(gqa, mlx_lm_converted, mlx_lm_reference, tmp_path):
    theirs = mlx_lm_converted(gqa, quantize=True, bits=4, group_size=32)
    reference = mlx_lm_reference.logits(theirs, BATCH)
    model, _ = mlx_mixtral.load(theirs, progress=False)
    np.testing.assert_allclose(_logits(model), reference, atol=1e-4)

    out = convert(theirs, tmp_path / "deq", dequantize=True, dtype="float32", progress=False).path
    assert "quantization" not in json.loads((out / "config.json").read_text())
    stored = _stored(out)
    assert not [k for k in stored if k.endswith((".scales", ".biases"))]
    assert stored["model.layers.0.block_sparse_moe.switch_mlp.down_proj.weight"] == ("F32", [8, 64, 128])
    model, _ = mlx_mixtral.load(out, progress=False)  # mlx-lm wrote tokenizer.json, which we copied
    np.testing.assert_allclose(_logits(model), reference, atol=1e-4)


def test_widths_that_do_not_split_into_groups_stay_float_and_say_so(gqa, tmp_path, capsys, mlx_lm_reference):
    # hidden 64 < group size 128: only down_proj (input 128) can be quantized; 6 per layer + 2 stay float
    out = convert(gqa, tmp_path / "g128", quantize=True, group_size=128, dtype="float32", progress=False).path
    err = capsys.readouterr().err
    assert "kept 14 weights in float" in err and "model.layers.*.self_attn.q_proj (input width 64)" in err
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["model.layers.1.self_attn.o_proj"] is False and "model.layers.1.block_sparse_moe.switch_mlp.down_proj" not in q
    stored = _stored(out)
    assert stored["model.layers.1.self_attn.o_proj.weight"][0] == "F32"
    assert stored["model.layers.1.block_sparse_moe.switch_mlp.down_proj.weight"][0] == "U32"
    np.testing.assert_allclose(mlx_lm_reference.logits(out, BATCH), _logits(load_model(out, progress=False)), atol=1e-4)


@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
def test_an_interrupted_conversion_leaves_nothing_behind(failure, gqa, tmp_path, monkeypatch):
    real_save = mx.save_safetensors
    calls = []

    def save_then_fail(*args, **kwargs):
        calls.append(args[0])
        if len(calls) > 1:
            raise failure
        real_save(*args, **kwargs)

    monkeypatch.setattr(writer.mx, "save_safetensors", save_then_fail)
    dst = tmp_path / "out"
    with pytest.raises(MixtralError if isinstance(failure, OSError) else KeyboardInterrupt) as e:
        convert(gqa, dst, max_shard_bytes=SMALL_SHARDS, progress=False)
    if isinstance(failure, OSError):
        assert "is the disk full?" in str(e.value) and "\n" not in str(e.value)
    assert len(calls) == 2 and Path(calls[0]).parent.name.startswith("out.partial-")
    _nothing_left(dst)


def test_force_replaces_an_existing_destination_but_never_the_source(gqa, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    with pytest.raises(MixtralError, match="already exists; .* --force"):
        convert(gqa, dst, progress=False)
    convert(gqa, dst, force=True, progress=False)
    assert not (dst / "stale.txt").exists() and (dst / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(MixtralError, match="holds\\) the source"):
        convert(gqa, gqa.parent, force=True, progress=False)


def _broken_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    shards = sorted(dst.glob("model-*.safetensors"))
    if how == "not mixtral":
        config["model_type"] = "llama"
    elif how == "wrong shape":
        config["intermediate_size"] = 96
    elif how == "missing shard":
        shards[1].unlink()
    elif how == "truncated shard":
        os.truncate(shards[-1], shards[-1].stat().st_size - 100)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("how,message", [
    ("not mixtral", "config.json: model_type is 'llama', not 'mixtral'"),
    ("wrong shape", "block_sparse_moe.switch_mlp.gate_proj.weight has shape [8, 128, 64], but config.json implies [8, 96, 64]"),
    ("missing shard", "model-00002-of-00005.safetensors: shard named in model.safetensors.index.json is missing"),
    ("truncated shard", "model-00005-of-00005.safetensors: truncated safetensors file"),
])
def test_a_broken_checkpoint_is_one_line_and_nothing_written(how, message, hf_checkpoint_factory, tmp_path, capsys):
    src = _broken_copy(hf_checkpoint_factory("gqa", shards=3), tmp_path / "src", how)
    dst = tmp_path / "out"
    capsys.readouterr()  # building the fixture may have printed
    assert main(["--hf-path", str(src), "--mlx-path", str(dst), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    _nothing_left(dst)


@pytest.mark.parametrize("flags,message", [
    (["-q", "--q-bits", "7"], "--q-bits 7 is not supported; use one of 2, 3, 4, 5, 6, 8"),
    (["-q", "--q-group-size", "48"], "--q-group-size 48 is not supported; use one of 32, 64, 128"),
    (["--dtype", "float64"], "--dtype float64: expected one of float16, bfloat16, float32"),
    (["-q", "--router-bits", "4"], "--router-bits 4: expected 8|float"),
    (["--embed-bits", "8"], "--embed-bits only applies with -q"),
    (["--attention-bits", "8"], "--attention-bits only applies with -q"),
    (["-q", "--attention-bits", "7"], "--attention-bits 7 is not supported; use one of 2, 3, 4, 5, 6, 8"),
    (["-q", "--dequantize"], "-q and --dequantize: choose one"),
    (["--dequantize"], "is not quantized; there is nothing to --dequantize"),
    (["--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size; write it like 5GB or 500MB"),
])
def test_bad_options_are_one_line(flags, message, gqa, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(["--hf-path", str(gqa), "--mlx-path", str(dst), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    _nothing_left(dst)


def test_quantizing_a_quantized_folder_is_refused(q4, tmp_path):
    with pytest.raises(MixtralError, match="is already quantized; .* --dequantize"):
        convert(q4, tmp_path / "again", quantize=True, progress=False)


def test_too_little_disk_is_refused_before_starting(gqa, tmp_path, monkeypatch):
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(MixtralError, match=r"only 1\.00 MB free but the converted model needs about 18\.\d+ MB"):
        convert(gqa, tmp_path / "out", progress=False)
    _nothing_left(tmp_path / "out")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_python_dash_m_convert_writes_a_model_and_prints_a_summary(gqa, tmp_path):
    proc = _run(sys.executable, "-m", "convert", "--hf-path", str(gqa), "--mlx-path", str(tmp_path / "out"),
                "-q", "--q-bits", "8", "--embed-bits", "float")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Wrote {tmp_path / 'out'}: ") and "bits per weight" in proc.stdout
    assert "peak memory" in proc.stdout and "router float, embeddings float, lm_head 8-bit" in proc.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["model.embed_tokens"] is False


def test_attention_can_take_more_bits_than_the_experts(gqa, tmp_path, capsys, hf_reference, mlx_lm_reference):
    out = tmp_path / "q3a8"
    assert main(["--hf-path", str(gqa), "--mlx-path", str(out), "-q", "--q-bits", "3", "--attention-bits", "8",
                 "--q-group-size", "32", "--dtype", "float32"]) == 0
    assert "3-bit, group size 32 (attention 8-bit, router float" in capsys.readouterr().out
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 3 and q["model.layers.1.self_attn.k_proj"] == {"group_size": 32, "bits": 8}
    stored = _stored(out)
    assert stored["model.layers.1.self_attn.o_proj.weight"] == ("U32", [64, 64 * 8 // 32])
    assert stored["model.layers.1.block_sparse_moe.switch_mlp.up_proj.weight"] == ("U32", [8, 128, 64 * 3 // 32])
    ours = _logits(load_model(out, progress=False))
    np.testing.assert_allclose(mlx_lm_reference.logits(out, BATCH), ours, atol=1e-4)
    all3 = convert(gqa, tmp_path / "q3", quantize=True, bits=3, group_size=32, dtype="float32", progress=False).path
    reference = hf_reference.logits(gqa, BATCH)
    assert _kl(reference, ours) < _kl(reference, _logits(load_model(all3, progress=False)))


def test_mlx_mixtral_convert_reports_errors_in_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    mlx_mixtral_cli = Path(sys.executable).parent / "mlx-mixtral"
    proc = _run(str(mlx_mixtral_cli), "convert", "--hf-path", str(tmp_path / "src"), "--mlx-path", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path / 'src' / 'config.json'}: model_type is 'mistral', not 'mixtral'; "
        "mlx-mixtral only runs Mixtral checkpoints"
    ]
    _nothing_left(tmp_path / "out")
