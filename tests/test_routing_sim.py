"""The routing model and cache simulator behind the per-Mac figures (benchmarks/routing_sim.py):
traces with the paper's repetition rates, and a simulator that counts what the real cache counts."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.routing_sim import fit, layer_rates, measured_rates, paper_trace, replay


def test_the_router_model_has_the_rates_it_was_fitted_to():
    assert fit(1 / 8, 1 - 15 / 28) == pytest.approx((0.0, 0.0), abs=1e-9)  # chance: 12.5% and 46.4%
    trace = paper_trace(32, 6000, seed=1)
    rates = measured_rates(trace)
    for (first, either), (want_first, want_either) in zip(rates, layer_rates(32)):
        assert first == pytest.approx(want_first, abs=0.03)
        # the generator cannot go below 0.53 with a first-choice rate of 0.23 (the last layers)
        assert either == pytest.approx(max(want_either, 0.53 if want_first > 0.2 else 0), abs=0.04)
    load = np.bincount(trace.reshape(-1), minlength=8) / trace.size
    assert load.min() > 0.11 and load.max() < 0.14  # near uniform, as the paper reports


class _Store:
    num_layers, num_experts, max_expert_bytes = 4, 8, 100

    def __init__(self):
        self.bytes_read, self.read_seconds = 0, 0.0

    def nbytes(self, layer, expert):
        return 100

    def read(self, layer, expert):
        return {}

    def close(self):
        pass


@pytest.mark.parametrize("policy, slots", [("lru", 5), ("lfu", 5), ("lfu", 12), ("lfu-before", 5), ("cyclic", 5),
                                          ("cyclic", 12)])
def test_the_simulator_counts_what_the_cache_counts(policy, slots):
    from mlx_mixtral.experts.expert_cache import ExpertCache

    trace = paper_trace(4, 120, seed=2)
    real = ExpertCache(_Store(), capacity=slots * 100, policy=policy.removesuffix("-before"), prefetch=False,
                       per_token=0 if policy == "lfu-before" else 8)
    for t in range(trace.shape[0]):
        for layer in range(4):
            chosen = trace[t, layer].tolist()
            [f.result() for f in real.fetch(layer, chosen).values()]
            real.release(layer, chosen)
    counted = real.snapshot()
    real.close()
    simulated = replay(trace, slots, policy, None, warmup=0)
    assert (simulated.hits, simulated.misses) == (counted.hits, counted.misses)
    assert simulated.requests == counted.requests == 120 * 8


def test_cyclic_hits_most_with_mixtrals_routing():
    """The claim behind the README's per-Mac suggestion: with routing like Mixtral's, evicting the
    expert whose layer comes round last beats LRU and LFU, under pressure and above it."""
    trace = paper_trace(32, 400, seed=3)
    for slots in (44, 79):
        hits = {policy: replay(trace, slots, policy, None).hit_rate for policy in ("lru", "lfu", "cyclic")}
        assert hits["cyclic"] > max(hits["lru"], hits["lfu"]) + 0.03, (slots, hits)
