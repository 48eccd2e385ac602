"""The benchmark (benchmarks/bench.py) end to end on a tiny synthetic model, its roofline
arithmetic against a hand count for Mixtral 8x7B, its memory refusal, and the wired-memory guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from benchmarks import roofline, synthetic
from mlx_mixtral import device
from mlx_mixtral.errors import MixtralError

REPO = Path(__file__).resolve().parent.parent


def _bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m benchmarks.bench` as a user runs it from the repository (working in tmp_path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "benchmarks.bench", *args], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env=env)


def test_bench_runs_on_tiny_synthetic_with_peer_and_dense_baseline(tmp_path):
    pytest.importorskip("mlx_lm")
    out = tmp_path / "bench.json"
    proc = _bench("--synthetic", "tiny", "--trials", "1", "--pp", "16", "32", "--tg", "8",
                  "--depth", "0", "20", "--compare", "mlx-lm", "--dense-baseline", "--json", str(out),
                  tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    engines = {"mlx-mixtral", "mlx-lm", "dense"}
    assert {e["engine"] for e in result["engines"]} == engines
    tests = {"ttft@pp16", "pp16", "pp32", "tg8@d0", "tg8@d20", "pp16@d20"}
    figures = {(f["engine"], f["test"]): f for f in result["figures"]}
    assert set(figures) == {(e, t) for e in engines for t in tests}
    for f in figures.values():
        assert len(f["samples"]) == 1 and 0 < f["median"] < 1e6  # a tiny model on a CPU: not infinite
    assert {(r["ratio"], r["test"]) for r in result["ratios"]} == {
        (label, t) for label in ("mlx-mixtral / mlx-lm speed", "MoE / dense time per token") for t in tests}
    for r in result["ratios"]:  # the same model on the same machine: a 10x gap would be a bug
        assert 0.1 < r["median"] < 10, r
    rows = {(r["engine"], r["test"]): r for r in result["roofline"]}
    assert set(rows) == {(e, t) for e in engines for t in ("tg8@d0", "tg8@d20")}
    ours, empty = rows[("mlx-mixtral", "tg8@d20")], rows[("mlx-mixtral", "tg8@d0")]
    # the mean context of 8 generated tokens is 20 + 4 against 0 + 4 positions
    assert ours["kv_bytes_per_token"] == 6 * empty["kv_bytes_per_token"] > 0
    assert ours["bytes_per_token"] == ours["weight_bytes_per_token"] + ours["kv_bytes_per_token"]
    tok_s = figures[("mlx-mixtral", "tg8@d20")]["median"]
    assert ours["achieved_gbs"] == pytest.approx(ours["bytes_per_token"] * tok_s / 1e9)


def test_bytes_per_token_of_mixtral_8x7b_match_a_hand_count():
    # Lazy skeleton: shapes and dtypes only, nothing allocated. 4 bits, groups of 64, 2-byte scales.
    model = synthetic.skeleton(synthetic.shape_config("mixtral-8x7b", 4, group_size=64), mx.float16)
    hidden, inter, layers, vocab, kv_dim = 4096, 14336, 32, 32000, 8 * 128
    attention = layers * (2 * hidden * hidden + 2 * hidden * kv_dim)  # q, o + k, v
    experts = layers * 2 * 3 * hidden * inter  # top-2 of 8, each gate + up + down
    router = layers * 8 * hidden
    lm_head = vocab * hidden
    embedding_row = hidden
    norms = (2 * layers + 1) * hidden
    matrices = attention + experts + router + lm_head + embedding_row  # all quantized, as mlx-lm does
    assert roofline.parameter_count_per_token(model, model.config) == matrices + norms
    assert round((matrices + norms) / 1e9, 2) == 12.75
    per_param = 4 / 8 + 2 * 2 / 64  # packed codes, then a 2-byte scale and a 2-byte bias per 64
    expected = matrices * per_param + norms * 2
    assert roofline.weight_bytes_per_token(model, model.config) == pytest.approx(expected, rel=1e-12)
    assert round(expected / 1e9, 2) == 7.17
    # KV cache at depth 4096: keys + values, 8 kv heads x 128, 32 layers, float16.
    assert roofline.kv_cache_bytes(model.config, 4096, 2) == 32 * 2 * kv_dim * 2 * 4096


def test_chip_bandwidth_table_prefers_the_longest_name():
    assert roofline.chip_bandwidth("Apple M2 Max") == 400
    assert roofline.chip_bandwidth("Apple M2") == 100
    assert roofline.chip_bandwidth("Intel(R) Xeon(R)") is None
    assert roofline.chip_bandwidth(None) is None


def test_memory_check_refuses_with_the_numbers():
    with pytest.raises(MixtralError, match=r"needs about 93\.4 GB but this machine offers 16\.0 GB"):
        synthetic.check_fits(93_400_000_000, "x", (16_000_000_000, "available RAM"))
    synthetic.check_fits(1_000, "x", (16_000_000_000, "available RAM"))


def test_bench_refuses_a_model_that_cannot_fit(tmp_path):
    proc = _bench("--synthetic", "mixtral-8x22b", "--bits", "16", "--trials", "1", tmp_path=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs about" in lines[0] and "GB but this machine offers" in lines[0]


def test_bench_refuses_sizes_beyond_the_context(tmp_path):
    proc = _bench("--synthetic", "tiny", "--trials", "1", "--pp", "8", "--tg", "8", "--depth", "0", "40000",
                  tmp_path=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: --depth 40000 with --tg 8 does not fit the model's context of 4096 tokens; choose smaller sizes"


def test_default_depths_beyond_the_context_are_skipped(tmp_path):
    out = tmp_path / "bench.json"
    proc = _bench("--synthetic", "tiny", "--trials", "1", "--pp", "8", "--tg", "8", "--json", str(out),
                  tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "skipping tg8@d4096: beyond the model's context of 4096 tokens" in proc.stderr
    tests = {f["test"] for f in json.loads(out.read_text())["figures"]}
    assert "tg8@d0" in tests and "tg8@d4096" not in tests


def test_wired_limit_is_a_no_op_without_metal(monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)

    def forbidden(*_):
        raise AssertionError("wired limit touched without Metal")

    monkeypatch.setattr(mx, "set_wired_limit", forbidden)
    monkeypatch.setattr(mx, "device_info", forbidden)
    with device.wired_limit():
        pass


def test_wired_limit_sets_and_restores_with_metal(monkeypatch):
    calls = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 123})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 7)
    with device.wired_limit():
        assert calls == [123]
    assert calls == [123, 7]
    with pytest.raises(RuntimeError), device.wired_limit():  # restored on errors too
        raise RuntimeError("boom")
    assert calls == [123, 7, 123, 7]


@pytest.mark.parametrize("length", [1, 3, 40])  # decode (slots split), and sorted prefill (rows split)
def test_experts_split_over_cpu_streams_match_one_part_exactly(length, monkeypatch):
    from mlx_mixtral import model as model_module
    from mlx_mixtral import row_split

    model = synthetic.fill_random(synthetic.skeleton(synthetic.shape_config("tiny", 4)))
    switch = model.layers[0].block_sparse_moe.switch_mlp
    assert isinstance(switch, row_split.RowSplitSwitchGLU)  # the CPU parts are what loading builds
    plain = model_module.SwitchGLU.from_projections(switch.gate_proj, switch.up_proj, switch.down_proj)
    x = mx.random.normal((2, length, 64), key=mx.random.key(1))
    indices = mx.random.randint(0, 8, (2, length, 2), key=mx.random.key(2))
    monkeypatch.setattr(row_split, "parallel_ways", lambda: 2)
    split = switch(x, indices)
    monkeypatch.setattr(row_split, "parallel_ways", lambda: 1)
    whole = switch(x, indices)
    assert split.shape == whole.shape == (2, length, 2, 64)
    assert mx.array_equal(split, whole) and mx.array_equal(plain(x, indices), whole)


@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("ways", [2, 3])
def test_linear_layers_split_over_cpu_streams_match_one_part_exactly(bits, ways, monkeypatch):
    import mlx.nn as nn

    from mlx_mixtral import row_split

    layer = row_split.RowSplitLinear(64, 100, bias=False)  # 100 rows: parts of unequal size for 3 ways
    plain = nn.Linear(64, 100, bias=False)
    plain.weight = layer.weight
    if bits:
        layer = layer.to_quantized(group_size=32, bits=bits)
        assert isinstance(layer, row_split.RowSplitQuantizedLinear)
        plain = plain.to_quantized(group_size=32, bits=bits)
    x = mx.random.normal((2, 5, 64), key=mx.random.key(3))
    monkeypatch.setattr(row_split, "parallel_ways", lambda: ways)
    split = layer(x)
    monkeypatch.setattr(row_split, "parallel_ways", lambda: 1)
    whole = layer(x)
    assert split.shape == whole.shape == (2, 5, 100)
    assert mx.array_equal(split, whole) and mx.array_equal(plain(x), whole)


def test_parallel_ways_follow_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert device.parallel_ways() == (3 if mx.default_device() == mx.cpu else 1)


def test_spans_cover_the_range_in_nearly_equal_parts():
    assert device.spans(2, 2) == [(0, 1), (1, 2)]
    assert device.spans(2, 16) == [(0, 1), (1, 2)]
    assert device.spans(7, 2) == [(0, 3), (3, 7)]
    assert device.spans(5, 1) == [(0, 5)]


def test_bench_fills_a_deep_context_with_random_keys_and_values(tmp_path):
    """--fill random: tg and pp at a depth without prefilling it; only for our own engine."""
    out = tmp_path / "bench.json"
    proc = _bench("--synthetic", "tiny", "--trials", "1", "--pp", "8", "--tg", "4", "--depth", "0", "600",
                  "--fill", "random", "--json", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert {f["test"] for f in result["figures"]} == {"ttft@pp8", "pp8", "tg4@d0", "tg4@d600", "pp8@d600"}
    refused = _bench("--synthetic", "tiny", "--trials", "1", "--pp", "8", "--tg", "4", "--depth", "40",
                     "--fill", "random", "--compare", "mlx-lm", tmp_path=tmp_path)
    assert refused.returncode == 2 and "--fill random is not available for mlx-lm" in refused.stderr
    from benchmarks import bench

    engine = bench.build_synthetic(synthetic.shape_config("tiny", 4), "ours", 16)
    cache = engine.new_cache()
    engine.fill(cache, list(range(600)), random_kv=True)
    assert [c.offset for c in cache] == [600] * len(cache)  # the context really is 600 deep
