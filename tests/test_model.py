"""The MLX model against transformers' MixtralForCausalLM, and cached decoding against full passes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_mixtral
from mlx_mixtral.sampling import SamplingParams

from checkpoints import PROBE_NEW_TOKENS, PROBE_TOKENS, TINY_CONFIGS, bf16_logit_atol


def _logits(model, tokens, cache=None) -> np.ndarray:
    return np.array(model(mx.array(tokens), cache=cache).astype(mx.float32))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(name, hf_checkpoint_factory, hf_reference):
    path = hf_checkpoint_factory(name)
    model, _ = mlx_mixtral.load(path, progress=False)
    batch = [PROBE_TOKENS, PROBE_TOKENS[:1] + PROBE_TOKENS[:0:-1]]  # two different sequences
    ours = _logits(model, batch)
    ref = hf_reference.logits(path, batch)
    assert ours.shape == ref.shape == (2, len(PROBE_TOKENS), 32000)
    assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_greedy_continuation_matches_transformers(name, hf_checkpoint_factory, hf_reference):
    path = hf_checkpoint_factory(name)
    model, tokenizer = mlx_mixtral.load(path, progress=False)
    ours = [r.token for r in mlx_mixtral.stream_generate(
        model, tokenizer, PROBE_TOKENS, max_tokens=PROBE_NEW_TOKENS, stop_on_eos=False, prefill_step=7)]
    assert ours == hf_reference.greedy(path, PROBE_TOKENS, PROBE_NEW_TOKENS)


@pytest.mark.parametrize("shards,dtype", [(3, "float32"), (1, "bfloat16"), (3, "bfloat16")])
def test_sharded_and_bfloat16_checkpoints(shards, dtype, hf_checkpoint_factory, hf_reference):
    path = hf_checkpoint_factory("gqa", dtype=dtype, shards=shards)
    assert len(list(path.glob("*.safetensors"))) >= (2 if shards > 1 else 1)
    model, _ = mlx_mixtral.load(path, progress=False)
    # transformers runs in float32 on the same (bf16-rounded) weights; how close we are depends on
    # whether this device computes in bf16 (conftest.bf16_logit_atol)
    ours = _logits(model, [PROBE_TOKENS])
    reference = hf_reference.logits(path, [PROBE_TOKENS])
    assert np.abs(ours - reference).max() < (bf16_logit_atol(reference) if dtype == "bfloat16" else 1e-4)


def test_legacy_config_with_top_level_rope_theta(hf_checkpoint_factory, hf_reference):
    path = hf_checkpoint_factory("rope_theta", config_style="legacy")
    model, _ = mlx_mixtral.load(path, progress=False)
    assert model.config.rope_theta == 1e4
    assert np.abs(_logits(model, [PROBE_TOKENS]) - hf_reference.logits(path, [PROBE_TOKENS])).max() < 1e-4


@pytest.mark.parametrize("name", ["gqa", "sliding_window", "head_dim"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_cached_decoding_matches_full_forward(name, chunk, hf_checkpoint_factory):
    model, tokenizer = mlx_mixtral.load(hf_checkpoint_factory(name), progress=False)
    rng = np.random.default_rng(0)
    tokens = [1] + rng.integers(3, 32000, 99).tolist()  # 100 > 16: crosses the sliding window
    full = _logits(model, [tokens])
    cache = mlx_mixtral.make_cache(model)
    pieces = []
    i = 0
    while i < len(tokens):  # chunked prefill, then single-token steps
        step = chunk if i < 60 else 1
        pieces.append(_logits(model, [tokens[i : i + step]], cache))
        i += step
    assert cache[0].offset == len(tokens)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-4)


def test_last_only_gives_the_final_position(hf_checkpoint_factory):
    model, _ = mlx_mixtral.load(hf_checkpoint_factory("gqa"), progress=False)
    full = _logits(model, [PROBE_TOKENS])
    last = np.array(model(mx.array([PROBE_TOKENS]), last_only=True))
    assert last.shape == (1, 1, 32000)
    np.testing.assert_allclose(last[0, 0], full[0, -1], atol=1e-5)


def test_generation_is_repeatable_with_a_seed(hf_checkpoint_factory):
    model, tokenizer = mlx_mixtral.load(hf_checkpoint_factory("gqa"), progress=False)
    params = SamplingParams(temp=1.0, top_p=0.9)

    def run(seed):
        return [r.token for r in mlx_mixtral.stream_generate(
            model, tokenizer, PROBE_TOKENS, max_tokens=16, sampling=params, seed=seed, stop_on_eos=False)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_sliding_window_far_beyond_the_window(hf_checkpoint_factory, hf_reference):
    """100 tokens with a window of 16: every position past 16 must forget the early ones, as HF does."""
    path = hf_checkpoint_factory("sliding_window")
    model, _ = mlx_mixtral.load(path, progress=False)
    tokens = [1] + np.random.default_rng(1).integers(3, 32000, 99).tolist()
    assert np.abs(_logits(model, [tokens]) - hf_reference.logits(path, [tokens])).max() < 1e-4
