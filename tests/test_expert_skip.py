"""Fewer experts per token (`--expert-skip`, issue 29): a token's second expert is left out when
the router weighs it at most a fraction of the first.

At 0 the model is bitwise the model as trained; at 1 it is top-1 routing (the same weights run
with `num_experts_per_tok: 1`); in between exactly the rule's slots are left out (checked
against the router's own weights); streamed, a left-out expert is never read, and the low-bit
copy is read only for a kept expert that misses and counts for little.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_mixtral
from convert.convert import convert
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.experts.expert_cache import ExpertCache
from mlx_mixtral.experts.low_bit import LowBitCopy
from mlx_mixtral.loading import load_model
from mlx_mixtral.model import skip_experts


@pytest.fixture(scope="module")
def folder(hf_checkpoint_factory):
    return hf_checkpoint_factory("gqa")


def test_at_zero_the_model_is_bitwise_unchanged(folder, probe_tokens):
    plain, tokenizer = mlx_mixtral.load(folder, progress=False)
    zero, _ = mlx_mixtral.load(folder, progress=False, expert_skip=0.0)
    tokens = mx.array([probe_tokens])
    assert mx.array_equal(plain(tokens), zero(tokens))
    a = mlx_mixtral.generate(plain, tokenizer, probe_tokens, max_tokens=8)
    assert a == mlx_mixtral.generate(zero, tokenizer, probe_tokens, max_tokens=8)


def test_at_one_it_is_top_1_routing(folder, probe_tokens, tmp_path):
    top1 = tmp_path / "top1"
    shutil.copytree(folder, top1)
    config = json.loads((top1 / "config.json").read_text())
    (top1 / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 1}))
    skipping, _ = mlx_mixtral.load(folder, progress=False, expert_skip=1.0)
    reference, _ = mlx_mixtral.load(top1, progress=False)
    tokens = mx.array([probe_tokens])
    np.testing.assert_allclose(np.array(skipping(tokens)), np.array(reference(tokens)), atol=1e-5, rtol=0)
    plain, _ = mlx_mixtral.load(folder, progress=False)
    assert not np.allclose(np.array(plain(tokens)), np.array(reference(tokens)), atol=1e-3)  # top-2 differs


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_exactly_the_slots_the_rule_names_are_left_out(fraction):
    rng = np.random.default_rng(int(fraction * 10))
    logits = mx.array(rng.normal(0, 2, (50, 8)).astype(np.float32))
    indices = mx.argpartition(-logits, kth=1, axis=-1)[..., :2]
    weights = mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1, precise=True)
    kept_idx, kept_w = skip_experts(indices, weights, fraction)
    w, i, ki, kw = (np.array(a) for a in (weights, indices, kept_idx, kept_w))
    for row in range(50):
        first = int(np.argmax(w[row]))
        second = 1 - first
        if w[row, second] <= fraction * w[row, first]:  # left out: it names the first, weight 0
            assert ki[row].tolist() == [i[row, first]] * 2 and kw[row, first] == 1.0 and kw[row, second] == 0.0
        else:
            assert ki[row].tolist() == i[row].tolist() and np.allclose(kw[row], w[row])
    assert 0 < (ki[:, 0] == ki[:, 1]).sum() < 50  # some left out, some kept


def test_streamed_with_skip_and_miss_copy_reads_what_the_rule_says(folder, probe_tokens, monkeypatch, tmp_path):
    """Decoding token by token at a budget of 2 experts: a second expert left out is never read,
    a kept second expert that misses is read from the 2-bit copy (weight below 0.5), and the
    first expert is read whole."""
    quantized = convert(folder, tmp_path / "q", quantize=True, bits=4, group_size=32, miss_bits=2,
                        progress=False).path
    probe = load_model(quantized, progress=False, max_memory=10**10)
    p = probe.runtime.expert_cache.plan
    probe.runtime.close()
    fraction = 0.6
    model = load_model(quantized, progress=False, max_memory=p.resident + p.staging + 2 * p.expert_bytes,
                       miss_bits=2, expert_skip=fraction)
    cache = model.runtime.expert_cache
    reads: list[tuple[str, int, int]] = []
    real_fetch, real_low = ExpertCache.fetch, LowBitCopy.read
    monkeypatch.setattr(ExpertCache, "fetch", lambda self, layer, experts: (
        reads.extend(("full", layer, e) for e in experts), real_fetch(self, layer, experts))[1])
    monkeypatch.setattr(LowBitCopy, "read", lambda self, layer, e: (reads.append(("low", layer, e)),
                                                                    real_low(self, layer, e))[1])
    decisions: list[tuple[int, int, int | None, bool]] = []  # layer, first, second (None: left out), second weak
    for i, layer in enumerate(model.layers):
        moe = layer.block_sparse_moe
        inner = moe.switch_mlp

        def recording(x, indices, i=i, moe=moe, inner=inner):
            logits = moe.gate(x).reshape(-1, moe.gate.weight.shape[0])
            order = np.argsort(-np.array(logits[0]))[:2]
            w = np.array(mx.softmax(logits[0][mx.array(order)], precise=True))
            left_out = w[1] <= fraction * w[0]
            decisions.append((i, int(order[0]), None if left_out else int(order[1]), bool(w[1] < 0.5)))
            return inner(x, indices)

        moe.switch_mlp = recording
    kv = mlx_mixtral.make_cache(model)
    seen = {"left out": 0, "low": 0}
    for t in probe_tokens:
        reads.clear()
        decisions.clear()
        model(mx.array([[t]]), cache=kv)
        for layer, first, second, weak in decisions:
            here = [(kind, e) for kind, at, e in reads if at == layer]
            assert ("full", first) in here and ("low", first) not in here
            if second is None:
                assert all(e == first for _, e in here), (layer, here)
                seen["left out"] += 1
            elif ("full", second) not in here:
                assert weak and ("low", second) in here
                seen["low"] += 1
    assert seen["left out"] and seen["low"] and cache.snapshot().low_bit_reads == seen["low"], seen
    model.runtime.close()


def test_expert_skip_out_of_range_is_one_line(folder):
    with pytest.raises(MixtralError, match="--expert-skip must be from 0"):
        mlx_mixtral.load(folder, progress=False, expert_skip=1.5)
    run = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "generate", "--model", str(folder), "--prompt", "hi",
                          "--max-tokens", "2", "--expert-skip", "0.3"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
