"""Options that must change nothing where they do not apply, checked at the edge where they
become no-ops: the output bitwise the plain resident model's, and nothing read that the option
would have read.

* `--miss-bits` concerns misses only: with a budget that holds every expert the low-bit copy is
  never read (not even for an expert's first use), and a hit never reads it at any budget.
* `--max-memory` with room for everything, `--cache-policy` and `--prefetch` change what is read
  and when, never the numbers.
* A `--max-context` at or above what a generation needs, stop strings that never occur, and
  asking for logprobs change nothing in the reply.
* Sampling fields at their neutral values are greedy decoding itself.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

import mlx_mixtral
from convert.convert import convert
from mlx_mixtral.experts.low_bit import LowBitCopy
from mlx_mixtral.loading import load_model
from mlx_mixtral.sampling import SamplingParams


@pytest.fixture(scope="module")
def folder(hf_checkpoint_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("noop") / "model"
    convert(hf_checkpoint_factory("gqa"), out, quantize=True, bits=4, group_size=32, miss_bits=2, progress=False)
    return out


@pytest.fixture(scope="module")
def resident(folder):
    return mlx_mixtral.load(folder, progress=False)


def _decode(model, tokens: list[int]) -> mx.array:
    kv = mlx_mixtral.make_cache(model)
    return mx.concatenate([model(mx.array([[t]]), cache=kv) for t in tokens], axis=1)


def _budget(folder, experts: int | None) -> int:
    """A budget holding `experts` experts (None: all of them, exactly)."""
    model = load_model(folder, progress=False, max_memory=10**10)
    p = model.runtime.expert_cache.plan
    model.runtime.close()
    return p.resident + p.staging + (p.total_experts if experts is None else experts) * p.expert_bytes


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_miss_bits_with_every_expert_held_is_the_resident_model(folder, resident, probe_tokens, threshold):
    model = load_model(folder, progress=False, max_memory=_budget(folder, None), miss_bits=2, miss_threshold=threshold)
    logits = _decode(model, probe_tokens)
    stats = model.runtime.expert_cache.snapshot()
    notes = model.runtime.expert_cache.plan.notes
    model.runtime.close()
    assert stats.low_bit_reads == 0 and stats.low_bit_bytes == 0
    assert mx.array_equal(logits, resident[0](mx.array([probe_tokens])))
    assert any("never read" in line for line in notes)


def test_a_hit_never_reads_the_low_bit_copy(folder, probe_tokens, monkeypatch):
    """At a budget that holds some experts, every low-bit read is of an expert not in memory."""
    model = load_model(folder, progress=False, max_memory=_budget(folder, 6), miss_bits=2, miss_threshold=1.0)
    cache = model.runtime.expert_cache
    reads: list[bool] = []
    real = LowBitCopy.read
    monkeypatch.setattr(LowBitCopy, "read", lambda self, layer, e: (reads.append(cache.present(layer, e)),
                                                                    real(self, layer, e))[1])
    _decode(model, probe_tokens * 3)  # the same tokens again: their experts are often held by then
    stats = cache.snapshot()
    model.runtime.close()
    assert reads and not any(reads)
    assert stats.hits > 0  # there were hits, and none of them read the low-bit copy


@pytest.mark.parametrize("policy, prefetch", [("lfu", True), ("lru", False), ("cyclic", False), ("cyclic", True)])
@pytest.mark.parametrize("experts", [None, 3])
def test_streaming_options_change_what_is_read_never_the_numbers(folder, resident, probe_tokens, policy, prefetch,
                                                                 experts):
    model = load_model(folder, progress=False, max_memory=_budget(folder, experts), policy=policy, prefetch=prefetch)
    logits = _decode(model, probe_tokens)
    model.runtime.close()
    assert mx.array_equal(logits, resident[0](mx.array([probe_tokens])))


def test_options_of_generation_that_do_not_apply_change_nothing(resident, probe_tokens):
    model, tokenizer = resident
    plain = [r.token for r in mlx_mixtral.stream_generate(model, tokenizer, probe_tokens, max_tokens=12)]
    config = model.config
    same = [
        dict(max_context=config.max_position_embeddings),  # the model's own
        dict(max_context=len(probe_tokens) + 13),  # just enough
        dict(stop=["\u2603never\u2603"]),
        dict(logprobs=3),
        dict(sampling=SamplingParams(temp=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                                     frequency_penalty=0.0, presence_penalty=0.0)),
        dict(sampling=SamplingParams(temp=0.0, top_k=5, top_p=0.5, min_p=0.3)),  # filters: greedy ignores them
        dict(seed=123),
    ]
    for extra in same:
        got = [r.token for r in mlx_mixtral.stream_generate(model, tokenizer, probe_tokens, max_tokens=12, **extra)]
        assert got == plain, extra
