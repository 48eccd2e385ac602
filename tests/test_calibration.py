"""Calibrated quantization in the converter (`--calibration`): importance-weighted scales and
biases in MLX's own format.

Checked: the codes are packed exactly as `mx.quantize` packs them; on held-out activations (text
the calibration never saw) the importance-weighted error of every quantized layer is below
round-to-nearest's, and below the same search with equal weights (so the importance is what
helps), at 2, 3 and 4 bits and group sizes 32 and 64, main weights and the --miss-bits copy;
an expert no calibration token reaches is still quantized soundly; without the flag the output is
`mx.quantize`'s, byte for byte; mlx-lm loads a calibrated folder and gives our logits; bad
calibration input is one line and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_mixtral
from convert.calibration import Calibration, calibration_tokens
from convert.convert import convert
from convert.weighted_quant import pack, weighted_error, weighted_quantize
from mlx_mixtral.checkpoint import Checkpoint
from mlx_mixtral.config import ModelConfig
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.experts.low_bit import miss_folder
from mlx_mixtral.tokenizer import Tokenizer

HELD_OUT = """The committee met on a grey Tuesday to decide the route of the new railway. Farmers argued
that the line would cut their fields in two; merchants in the valley wanted the station as close to
the market square as possible. After four hours the engineer unrolled a map and showed a third path
along the river, longer by a mile but flat the whole way, and cheaper to build. Nobody liked it, and
so it was accepted. Years later the river flooded twice, and the embankment held both times.
def moving_average(values, window):
    total, out = 0.0, []
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
Le lendemain, la pluie avait cessé et les enfants coururent jusqu'au bout de la jetée pour voir les
bateaux rentrer au port, chargés de sardines et de maquereaux encore brillants.
""" * 6


@pytest.fixture(scope="module")
def source(hf_checkpoint_factory) -> Path:
    return hf_checkpoint_factory("gqa")


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """(calibrated, round-to-nearest) folders, made once per (bits, group size)."""
    made = {}

    def get(bits: int, group: int) -> tuple[Path, Path]:
        if (bits, group) not in made:
            root = tmp_path_factory.mktemp(f"q{bits}g{group}")
            cal = convert(source, root / "cal", quantize=True, bits=bits, group_size=group, calibration=True,
                          miss_bits=2 if bits == 4 else None, progress=False)
            rtn = convert(source, root / "rtn", quantize=True, bits=bits, group_size=group,
                          miss_bits=2 if bits == 4 else None, progress=False)
            made[bits, group] = cal.path, rtn.path
        return made[bits, group]

    return get


@pytest.fixture(scope="module")
def held_out(source, tmp_path_factory) -> dict[str, mx.array]:
    """Every linear layer's importance measured on text the calibration never saw."""
    config = ModelConfig.from_file(source / "config.json")
    path = tmp_path_factory.mktemp("held") / "text.txt"
    path.write_text(HELD_OUT)
    calib = Calibration(calibration_tokens(path, Tokenizer.from_folder(source), config), config)
    found = {}
    for name, weights in Checkpoint(source).iter_weights(config):
        if name == "embeddings":
            calib.embeddings(weights)
        else:
            found.update(calib.layer(int(name.split()[-1]), weights))
    return found


def _tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def _float_weights(source: Path) -> dict[str, mx.array]:
    config = ModelConfig.from_file(source / "config.json")
    return {k: v for _, piece in Checkpoint(source).iter_weights(config) for k, v in piece.items()}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_codes_are_packed_as_mx_quantize_packs_them(bits):
    w = mx.array(np.random.default_rng(bits).normal(size=(3, 5, 128)).astype(np.float32))
    wq, scales, biases = mx.quantize(w, 32, bits)
    restored = np.array(mx.dequantize(wq, scales, biases, 32, bits)).reshape(3, 5, 4, 32)
    codes = np.rint((restored - np.array(biases)[..., None]) / np.array(scales)[..., None]).astype(np.uint8)
    assert np.array_equal(pack(codes.reshape(3, 5, 128), bits), np.array(wq))


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_calibrated_layers_have_less_weighted_error_on_held_out_text(source, converted, held_out, bits, group):
    cal, rtn = (_tensors(p) for p in converted(bits, group))
    floats = _float_weights(source)
    totals = {"cal": 0.0, "rtn": 0.0, "equal": 0.0}
    for path, importance in held_out.items():
        if f"{path}.scales" not in cal:
            continue  # not quantized (the router stays float)
        w = floats[f"{path}.weight"]
        for kind, tensors in (("cal", cal), ("rtn", rtn)):
            totals[kind] += weighted_error(w, tensors[f"{path}.weight"], tensors[f"{path}.scales"],
                                           tensors[f"{path}.biases"], importance, group, bits)
        equal = weighted_quantize(w, mx.ones_like(importance), group, bits, mx.float32)
        totals["equal"] += weighted_error(w, *equal, importance, group, bits)
    assert totals["cal"] < 0.97 * totals["rtn"], totals
    assert totals["cal"] < totals["equal"], totals  # the measured importance is what helps


def test_the_low_bit_miss_copy_is_calibrated_too(source, converted, held_out):
    cal, rtn = (_tensors(miss_folder(p, 2)) for p in converted(4, 32))
    floats = _float_weights(source)
    errors = {"cal": 0.0, "rtn": 0.0}
    for path, importance in held_out.items():
        if ".switch_mlp." in path:
            for kind, tensors in (("cal", cal), ("rtn", rtn)):
                errors[kind] += weighted_error(floats[f"{path}.weight"], tensors[f"{path}.weight"],
                                               tensors[f"{path}.scales"], tensors[f"{path}.biases"], importance, 32, 2)
    assert errors["cal"] < 0.97 * errors["rtn"], errors


def test_without_the_flag_the_output_is_round_to_nearest_byte_for_byte(source, converted):
    _, rtn = converted(3, 64)
    floats = _float_weights(source)
    tensors = _tensors(rtn)
    quantized = [k.removesuffix(".scales") for k in tensors if k.endswith(".scales")]
    assert quantized
    config = json.loads((rtn / "config.json").read_text())["quantization"]
    for path in quantized:
        bits = config.get(path, {}).get("bits", config["bits"])
        group = config.get(path, {}).get("group_size", config["group_size"])
        expected = mx.quantize(floats[f"{path}.weight"], group, bits)
        for part, a in zip(("weight", "scales", "biases"), expected):
            assert np.array_equal(np.array(tensors[f"{path}.{part}"]), np.array(a)), path


def test_mlx_lm_loads_a_calibrated_folder_and_gives_our_logits(converted, probe_tokens, mlx_lm_reference):
    cal, _ = converted(4, 32)
    ours, _ = mlx_mixtral.load(cal, progress=False)
    theirs = mlx_lm_reference.logits(cal, [probe_tokens])
    np.testing.assert_allclose(np.array(ours(mx.array([probe_tokens]))), theirs, atol=1e-4)


def test_an_expert_no_token_reaches_is_still_quantized_soundly(source, tmp_path):
    """A calibration text of one word said over and over: every token's hidden state is nearly the
    same, so a couple of experts take every token and the others none. Those are quantized with
    the layer-wide importance as their prior: weights positive and finite, codes close to
    round-to-nearest's plain error, never a degenerate group."""
    text = tmp_path / "same.txt"
    text.write_text("the " * 400)
    config = ModelConfig.from_file(source / "config.json")
    calib = Calibration(calibration_tokens(text, Tokenizer.from_folder(source), config), config)
    layers = Checkpoint(source).iter_weights(config)
    calib.embeddings(next(layers)[1])
    _, weights = next(layers)
    importance = calib.layer(0, weights)
    unreached = [e for e, n in enumerate(calib.counts) if n == 0]
    assert unreached and sum(calib.counts) > 0
    for part in ("gate_proj", "up_proj", "down_proj"):
        a = importance[f"model.layers.0.block_sparse_moe.switch_mlp.{part}"]
        assert bool(mx.all(a > 0)) and bool(mx.all(mx.isfinite(a)))
    out = convert(source, tmp_path / "q", quantize=True, bits=2, group_size=32, calibration=text, progress=False)
    q = _tensors(out.path)
    for part in ("gate_proj", "down_proj"):
        path = f"model.layers.0.block_sparse_moe.switch_mlp.{part}"
        for e in unreached:
            w = weights[f"{path}.weight"][e]
            ours = mx.dequantize(q[f"{path}.weight"][e], q[f"{path}.scales"][e], q[f"{path}.biases"][e], 32, 2)
            plain = mx.dequantize(*mx.quantize(w, 32, 2), 32, 2)
            assert bool(mx.all(mx.isfinite(ours)))
            assert mx.square(w - ours).mean().item() <= 1.5 * mx.square(w - plain).mean().item()


@pytest.mark.parametrize("problem, needle", [
    ("empty", "is empty"),
    ("binary", "not text"),
    ("short", "needs at least"),
    ("fifo", "not a regular file"),
    ("missing", "no calibration text"),
])
def test_bad_calibration_text_is_one_line_and_writes_nothing(source, tmp_path, problem, needle):
    text = tmp_path / "calibration.txt"
    if problem == "empty":
        text.write_text("  \n")
    elif problem == "binary":
        text.write_bytes(bytes(range(256)) * 20)
    elif problem == "short":
        text.write_text("Only a few words here.")
    elif problem == "fifo":
        os.mkfifo(text)
    run = subprocess.run([sys.executable, "-m", "convert", "--hf-path", str(source), "--mlx-path",
                          str(tmp_path / "out"), "-q", "--calibration", str(text)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and needle in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))


def test_calibration_needs_a_float_source_and_quantization(source, converted, tmp_path):
    cal, _ = converted(4, 32)
    with pytest.raises(MixtralError, match="already quantized"):
        convert(cal, tmp_path / "again", quantize=True, calibration=True, progress=False)
    with pytest.raises(MixtralError, match="add -q"):
        convert(source, tmp_path / "float", calibration=True, progress=False)
    assert not list(tmp_path.iterdir())
