"""A low-bit copy of the experts, read on some misses (issue 24): what the converter writes, that
it changes nothing unless asked, what it saves, and its one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_mixtral
from convert.convert import convert
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.experts.low_bit import MISS_FILE, miss_folder
from mlx_mixtral.loading import load_model


@pytest.fixture(scope="module")
def folder(hf_checkpoint_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("low-bit") / "model"
    convert(hf_checkpoint_factory("gqa"), out, quantize=True, bits=4, group_size=32, miss_bits=2, progress=False)
    return out


def _tightest(folder) -> int:
    """A budget that holds 2 experts: nearly every request is a miss."""
    model = load_model(folder, progress=False, max_memory=10**10)
    spent = model.runtime.expert_cache.plan
    model.runtime.close()
    return spent.resident + spent.staging + 2 * spent.expert_bytes


def _decode(model, tokens: list[int]) -> mx.array:
    kv = mlx_mixtral.make_cache(model)
    return mx.concatenate([model(mx.array([[t]]), cache=kv) for t in tokens], axis=1)


def test_the_converter_writes_a_whole_low_bit_copy_of_the_experts(folder):
    copy = miss_folder(folder, 2)
    assert json.loads((copy / MISS_FILE).read_text()) == {"bits": 2, "group_size": 32, "mode": "affine"}
    index = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    config = json.loads((folder / "config.json").read_text())
    expected = {f"model.layers.{i}.block_sparse_moe.switch_mlp.{p}.{part}"
                for i in range(config["num_hidden_layers"]) for p in ("gate_proj", "up_proj", "down_proj")
                for part in ("weight", "scales", "biases")}
    assert set(index) == expected
    main = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    low = sum(f.stat().st_size for f in copy.glob("*.safetensors"))
    assert 0 < low < main


def test_without_the_flag_nothing_changes_and_mlx_lm_still_loads_the_folder(folder, probe_tokens, mlx_lm_reference):
    resident, _ = mlx_mixtral.load(folder, progress=False)
    streamed = load_model(folder, progress=False, max_memory=_tightest(folder))
    assert mx.array_equal(_decode(streamed, probe_tokens), resident(mx.array([probe_tokens])))
    streamed.runtime.close()
    theirs = mlx_lm_reference.logits(folder, [probe_tokens])
    np.testing.assert_allclose(np.array(resident(mx.array([probe_tokens])), dtype=np.float32), theirs, atol=1e-3)


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_misses_below_the_threshold_read_the_smaller_copy(folder, probe_tokens, threshold):
    budget = _tightest(folder)
    plain = load_model(folder, progress=False, max_memory=budget)
    _decode(plain, probe_tokens)
    before = plain.runtime.expert_cache.snapshot()
    plain.runtime.close()
    low = load_model(folder, progress=False, max_memory=budget, miss_bits=2, miss_threshold=threshold)
    logits = _decode(low, probe_tokens)
    after = low.runtime.expert_cache.snapshot()
    low.runtime.close()
    assert after.low_bit_reads > 0 and bool(mx.isfinite(logits).all())
    assert after.bytes_read + after.low_bit_bytes < before.bytes_read  # fewer bytes for the same tokens
    if threshold == 1.0:  # every miss: nothing full is read on demand
        assert after.misses == 0


def test_low_bit_errors_are_one_line(folder, hf_checkpoint_factory, tmp_path):
    with pytest.raises(MixtralError, match="needs --max-memory"):
        load_model(folder, progress=False, miss_bits=2)
    with pytest.raises(MixtralError, match="no 3-bit copy"):
        load_model(folder, progress=False, max_memory=10**10, miss_bits=3)
    with pytest.raises(MixtralError, match="float checkpoint"):
        convert(folder, tmp_path / "again", miss_bits=2, progress=False)
    run = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "generate", "--model", str(folder), "--prompt", "hi",
                          "--max-tokens", "2", "--miss-bits", "3", "--max-memory", "1GB"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1 and "--miss-bits 3" in run.stderr


def test_generate_with_miss_bits_says_so(folder):
    run = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "generate", "--model", str(folder), "--prompt", "hi",
                          "--max-tokens", "3", "--miss-bits", "2", "--max-memory", str(_tightest(folder)), "--verbose"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "2-bit copy" in run.stderr
    assert re.search(r"for \d+ misses from the 2-bit copy", run.stderr)  # --verbose's streaming line
