"""Expert-cache figures from routing like the real Mixtral's, for Macs we cannot run here.

Random weights route nothing like a trained Mixtral, so the hit rates a full-shape random model
shows are not what a user will see. This module instead

1. generates routing traces matched to the Mixtral paper's published statistics (Jiang et al.
   2024, arXiv 2401.04088, section 5 and Table 5): near-uniform expert load per layer, and the
   per-layer rates at which consecutive tokens repeat their first-choice expert and share either
   choice (interpolated by depth between the reported layers 0, 15 and 31);
2. replays a trace through a simulator of `experts.expert_cache` (same pinning, prefetch and
   eviction rules; policies lru, lfu with its pressure rule, lfu as it was before that rule,
   and cyclic) at Mixtral-8x7B's and 8x22B's shapes (32 x 8 and 56 x 8 experts, top-2), with
   and without a low-bit copy read for second-choice misses;
3. turns hits into bytes read per token and expected tok/s on a Mac's SSD:
   1 / (GB read per token / SSD GB/s + compute per token).

    python -m benchmarks.routing_sim --tokens 600 --json FILE
    python -m benchmarks.routing_sim --tokens 600 --levers 9      # other ways to cut bytes, 16 GB Mac
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Table 5 of the paper, midpoints of the ranges over its datasets: (relative depth, first-choice
# repetition, first-or-second-choice repetition). Random assignment gives 12.5% and 46.4%.
PAPER_REPETITION = [(0.0, 0.1425, 0.474), (15 / 31, 0.26, 0.643), (1.0, 0.23, 0.4905)]


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs of a model: its expert grid, an expert's bytes on disk (4-bit
    weights with bf16 scales and biases per 64: 4.5 bits a weight), the bytes that stay resident,
    and the compute of one token on a Mac (the weights a token touches over memory bandwidth)."""

    name: str
    layers: int
    experts: int
    top_k: int
    expert_gb: float
    resident_gb: float
    compute_ms: float


# 8x7B: 3 x 4096 x 14336 weights an expert; 1.0 GB resident (README); 66 ms a token on an
# M-series Mac (RESULTS: the 7.97 GB a token touches over ~120 GB/s). 8x22B: 3 x 6144 x 16384;
# embeddings, lm_head and attention 5.3B weights -> 3.0 GB; a token touches 3.0 + 2 x 56 x 0.170
# = 22 GB, over a Max-class Mac's ~400 GB/s (a 64 GB Mac is a Max) -> 55 ms, rounded up to 60.
MIXTRAL_8X7B = Shape("Mixtral-8x7B", 32, 8, 2, 3 * 4096 * 14336 * 4.5 / 8 / 1e9, 1.0, 66.0)
MIXTRAL_8X22B = Shape("Mixtral-8x22B", 56, 8, 2, 3 * 6144 * 16384 * 4.5 / 8 / 1e9, 3.0, 60.0)
STAGING_GB = 0.12  # read buffers (README)


def layer_rates(layers: int) -> list[tuple[float, float]]:
    """(first-choice repetition, either-choice repetition) of each layer, interpolated by depth."""
    depths = [d for d, _, _ in PAPER_REPETITION]
    out = []
    for layer in range(layers):
        x = layer / max(1, layers - 1)
        out.append((float(np.interp(x, depths, [r for _, r, _ in PAPER_REPETITION])),
                    float(np.interp(x, depths, [r for _, _, r in PAPER_REPETITION]))))
    return out


def fit(first: float, either: float, experts: int = 8) -> tuple[float, float]:
    """(a, b) of the Markov router below that give these repetition rates, in closed form.

    Token t+1 keeps token t's first choice with probability a, else draws its first choice
    uniformly (so P(first repeats) = a + (1 - a) / E). Its second choice is one of token t's two
    experts (the one not already taken) with probability b, else uniform over the other E - 1.
    P(either repeats) = r1 + (1 - r1) (1/(E-1) + (E-2)/(E-1) (b + (1 - b) 2/(E-1))).
    """
    e = experts
    a = (first - 1 / e) / (1 - 1 / e)
    shared = (either - first) / (1 - first)  # P(share | first not repeated)
    x = (shared - 1 / (e - 1)) / ((e - 2) / (e - 1))  # P(second shares | first new, not t's second)
    b = (x - 2 / (e - 1)) / (1 - 2 / (e - 1))
    return min(max(a, 0.0), 1.0), min(max(b, 0.0), 1.0)


def paper_trace(layers: int, tokens: int, experts: int = 8, seed: int = 0) -> np.ndarray:
    """[tokens, layers, 2] expert ids (first, second choice) with the paper's repetition rates."""
    rng = np.random.default_rng(seed)
    params = [fit(r1, r2, experts) for r1, r2 in layer_rates(layers)]
    out = np.zeros((tokens, layers, 2), dtype=np.int64)
    for layer, (a, b) in enumerate(params):
        prev = rng.choice(experts, 2, replace=False)
        for t in range(tokens):
            first = prev[0] if rng.random() < a else rng.integers(experts)
            if rng.random() < b and first != prev[1] and first in prev:
                second = prev[1] if first == prev[0] else prev[0]
            elif rng.random() < b and first not in prev:
                second = prev[rng.integers(2)]
            else:
                second = rng.choice([e for e in range(experts) if e != first])
            prev = np.array([first, second])
            out[t, layer] = prev
    return out


def measured_rates(trace: np.ndarray) -> list[tuple[float, float]]:
    """Per layer: how often consecutive tokens repeat the first choice, and share either."""
    a, b = trace[:-1], trace[1:]
    first = (a[:, :, 0] == b[:, :, 0]).mean(0)
    either = ((a[:, :, :, None] == b[:, :, None, :]).any(axis=(2, 3))).mean(0)
    return list(zip(first.tolist(), either.tolist()))


# --------------------------------------------------------------------------------------------
# The cache, simulated (the rules of experts.expert_cache.ExpertCache)
# --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    uses: int = 0
    last_use: int = 0
    pinned: bool = False


@dataclass
class Simulated:
    """Counters of one replay, per expert request."""

    requests: int = 0
    hits: int = 0
    misses: int = 0  # full reads on demand
    low_bit: int = 0  # misses read from the low-bit copy instead
    prefetch_reads: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


@dataclass
class CacheSim:
    """`experts.expert_cache.ExpertCache`'s rules on (layer, expert) keys: a request pins its
    experts (present ones first), a miss evicts by the policy, a prefetch only fills room or
    replaces experts used since read. Policies: "lru"; "lfu" (ties to the least recent, but to
    the most recent when `slots` < `per_token`: the pressure rule); "lfu-before" (no pressure
    rule). `low_bit`: a miss of a token's second choice ("second") or any miss ("all") reads the
    low-bit copy, uncached."""

    slots: int
    policy: str
    per_token: int
    low_bit: str | None = None
    layer: int = 0  # the layer requested last (`cyclic`)
    entries: dict[tuple[int, int], _Entry] = field(default_factory=dict)
    tick: int = 0
    stats: Simulated = field(default_factory=Simulated)

    def _victim(self, must: bool) -> tuple[int, int] | None:
        candidates = [(k, v) for k, v in self.entries.items() if not v.pinned and (must or v.uses > 0)]
        if not candidates:
            return None
        if self.policy == "lru":
            return min(candidates, key=lambda kv: kv[1].last_use)[0]
        if self.policy == "cyclic":
            layers = self.per_token // 2
            return max(candidates, key=lambda kv: ((kv[0][0] - self.layer - 1) % layers, -kv[1].last_use))[0]
        pressed = self.slots < self.per_token
        newest_first = -1 if self.policy == "lfu" and pressed else 1
        return min(candidates, key=lambda kv: (kv[1].uses, newest_first * kv[1].last_use))[0]

    def _room(self, must: bool) -> bool:
        while len(self.entries) >= self.slots:
            key = self._victim(must)
            if key is None:
                return False
            del self.entries[key]
        return True

    def request(self, layer: int, chosen: np.ndarray) -> None:
        self.layer = layer
        used = []
        for e in sorted(chosen.tolist(), key=lambda e: (layer, e) not in self.entries):
            entry = self.entries.get((layer, e))
            self.stats.requests += 1
            if entry is None and (self.low_bit == "all" or (self.low_bit == "second" and e == chosen[1])):
                self.stats.low_bit += 1
                continue
            if entry is None:
                self._room(True)
                entry = self.entries[(layer, e)] = _Entry()
                self.stats.misses += 1
            else:
                self.stats.hits += 1
            entry.pinned = True
            entry.uses += 1
            self.tick += 1
            entry.last_use = self.tick
            used.append(e)
        for e in used:
            self.entries[(layer, e)].pinned = False

    def prefetch(self, layer: int, guess: list[int]) -> None:
        for e in sorted(guess):
            if (layer, e) in self.entries:
                continue
            if not self._room(False):
                return
            self.entries[(layer, e)] = _Entry()  # a prefetch: not used yet (uses 0)
            self.stats.prefetch_reads += 1


def _guesses(trace: np.ndarray, recall: float, experts: int, seed: int) -> Iterator[list[int]]:
    """The next layer's router applied early: each true expert named with probability `recall`,
    else a wrong one (Eliseev & Mazur's speculative guess; our trained yardstick measures 57%)."""
    rng = np.random.default_rng(seed + 1)
    for t in range(trace.shape[0]):
        for layer in range(trace.shape[1]):
            true = trace[t, layer].tolist()
            yield [e if rng.random() < recall else int(rng.choice([x for x in range(experts) if x not in true]))
                   for e in true]


def replay(trace: np.ndarray, slots: int, policy: str, prefetch_recall: float | None, low_bit: str | None = None,
           warmup: int = 100, seed: int = 0) -> Simulated:
    """Counts of `trace` ([tokens, layers, k]) through a cache of `slots` experts; the first
    `warmup` tokens fill the cache and are not counted."""
    tokens, layers, k = trace.shape
    experts = int(trace.max()) + 1
    sim = CacheSim(slots, policy, layers * k, low_bit)
    guesses = _guesses(np.roll(trace, -1, axis=1), prefetch_recall or 0, experts, seed)
    for t in range(tokens):
        if t == warmup:
            sim.stats = Simulated()
        for layer in range(layers):
            sim.request(layer, trace[t, layer])
            guess = next(guesses)
            if prefetch_recall is not None and layer + 1 < layers:
                sim.prefetch(layer + 1, guess)
    return sim.stats


# --------------------------------------------------------------------------------------------
# Per Mac
# --------------------------------------------------------------------------------------------

MACS = {  # Mac memory -> the --max-memory the README suggests for it (GPU working set less KV and system)
    MIXTRAL_8X7B.name: {8: 3.5, 16: 9.0, 24: 14.0, 32: 19.0},
    MIXTRAL_8X22B.name: {64: 44.0, 96: 66.0},
}
SSDS = (3.0, 7.0)


def slots_for(shape: Shape, budget_gb: float) -> int:
    return max(0, math.floor((budget_gb - shape.resident_gb - STAGING_GB) / shape.expert_gb))


LOW_BIT_SIZE = {2: 2.5 / 4.5, 3: 3.5 / 4.5}  # a low-bit expert's bytes over a 4-bit one's (scales per 64)


def row(shape: Shape, mac: int, budget: float, stats: Simulated, tokens: int, low_bits: int | None = None) -> dict:
    """Hit rate, GB read per token and expected tok/s at each SSD speed."""
    reads = stats.misses + stats.prefetch_reads + stats.low_bit * LOW_BIT_SIZE.get(low_bits, 0.0)
    gb = reads / tokens * shape.expert_gb
    out = {"model": shape.name, "mac_gb": mac, "budget_gb": budget, "slots": slots_for(shape, budget),
           "experts": shape.layers * shape.experts, "hit_rate": stats.hit_rate, "gb_per_token": gb,
           "low_bits": low_bits}
    for ssd in SSDS:
        out[f"tok_s_{ssd:g}"] = 1000 / (gb / ssd * 1000 + shape.compute_ms)
    return out


def mixed_cache_reads(trace: np.ndarray, slots: int, low_size: float, warmup: int = 100) -> float:
    """Experts read per token (in full-expert units) when second-choice misses read a low-bit copy
    of `low_size` that is cached too (HOBBIT's mixed-precision cache), LRU over `slots` worth of
    bytes; a first choice needs the full expert."""
    last_use: dict[tuple[int, int, bool], int] = {}
    size: dict[tuple[int, int, bool], float] = {}
    used, tick, reads = 0.0, 0, 0.0
    tokens, layers, _ = trace.shape
    for t in range(tokens):
        for layer in range(layers):
            pinned = set()
            for e, low in ((int(trace[t, layer, 0]), False), (int(trace[t, layer, 1]), True)):
                tick += 1
                have = [k for k in ((layer, e, False), (layer, e, True)) if k in last_use and (low or not k[2])]
                if have:
                    last_use[have[0]] = tick
                    pinned.add(have[0])
                    continue
                key, nbytes = (layer, e, low), low_size if low else 1.0
                reads += nbytes if t >= warmup else 0.0
                while used + nbytes > slots:
                    victim = min((k for k in last_use if k not in pinned), key=last_use.get)
                    used -= size.pop(victim)
                    del last_use[victim]
                last_use[key], size[key] = tick, nbytes
                used += nbytes
                pinned.add(key)
    return reads / (tokens - warmup)


def levers(shape: Shape, budget: float, tokens: int, skips: tuple[float, ...] = ()) -> None:
    """What else could cut the bytes at one budget (cyclic, no prefetch): caching the low-bit copies,
    or every expert at 3 or 2 bits (more of them fit, each read is smaller), and with them
    `--expert-skip` leaving out the given shares of second choices (the yardstick's rates)."""
    trace = paper_trace(shape.layers, tokens + 100, shape.experts)
    slots = slots_for(shape, budget)

    def line(what: str, gb: float) -> None:
        print(f"  {what:55} {gb:5.2f} GB/token, {1000 / (gb / 7 * 1000 + shape.compute_ms):.2f} tok/s at 7 GB/s")

    print(f"{shape.name} at {budget} GB, cyclic, no prefetch:")
    line(f"4-bit experts, exact ({slots} slots)", replay(trace, slots, "cyclic", None).misses / tokens * shape.expert_gb)
    line("2-bit copy for second-choice misses", row(shape, 0, budget, replay(trace, slots, "cyclic", None, "second"),
                                                     tokens, 2)["gb_per_token"])
    line("2-bit copies of second choices cached too (LRU by bytes)",
         mixed_cache_reads(trace, slots, LOW_BIT_SIZE[2]) * shape.expert_gb)
    for bits in (3, 2):
        each = shape.expert_gb * (bits + 0.5) / 4.5
        fit = max(0, math.floor((budget - shape.resident_gb - STAGING_GB) / each))
        line(f"every expert at {bits} bits ({fit} slots)", replay(trace, fit, "cyclic", None).misses / tokens * each)
        for share in skips:  # --expert-skip: a left-out second choice names the first expert again
            left = trace.copy()
            drop = np.random.default_rng(1).random(left.shape[:2]) < share
            left[..., 1] = np.where(drop, left[..., 0], left[..., 1])
            line(f"  and {share:.0%} of second choices left out", replay(left, fit, "cyclic", None).misses / tokens * each)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--recall", type=float, default=0.57, help="prefetch recall (the trained yardstick's)")
    p.add_argument("--levers", type=float, default=None, metavar="GB",
                   help="instead: the other ways to read fewer bytes, for 8x7B at this budget (9 for a 16 GB Mac)")
    p.add_argument("--skip-shares", type=float, nargs="*", default=[],
                   help="with --levers: shares of second choices --expert-skip leaves out (from calibrated_quality)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.levers is not None:
        levers(MIXTRAL_8X7B, args.levers, args.tokens, tuple(args.skip_shares))
        return
    results = []
    for shape in (MIXTRAL_8X7B, MIXTRAL_8X22B):
        trace = paper_trace(shape.layers, args.tokens + 100, shape.experts)
        rates = measured_rates(trace)
        load = np.bincount(trace.reshape(-1), minlength=shape.experts) / trace.size
        print(f"{shape.name}: trace repetition first/either: layer 0 {rates[0][0]:.3f}/{rates[0][1]:.3f}, "
              f"middle {rates[len(rates) // 2][0]:.3f}/{rates[len(rates) // 2][1]:.3f}, "
              f"last {rates[-1][0]:.3f}/{rates[-1][1]:.3f}; expert load {load.min():.3f}-{load.max():.3f}")
        for mac, budget in MACS[shape.name].items():
            slots = slots_for(shape, budget)
            for policy in ("lfu", "lfu-before", "lru", "cyclic"):
                for recall in (args.recall, None):
                    for low_bits in (None, 2, 3) if policy in ("lfu", "lru", "cyclic") else (None,):
                        stats = replay(trace, slots, policy, recall, low_bit="second" if low_bits else None)
                        r = row(shape, mac, budget, stats, args.tokens, low_bits)
                        r.update(policy=policy, prefetch=recall is not None)
                        results.append(r)
                        low = f", 2nd-choice misses {low_bits}-bit" if low_bits else ""
                        print(f"  {mac:3d} GB Mac, {budget:4.1f} GB, {slots:3d}/{r['experts']} slots, {policy:10} "
                              f"prefetch {'on ' if recall else 'off'}{low}: hits {r['hit_rate']:6.1%}, "
                              f"{r['gb_per_token']:5.2f} GB/token, {r['tok_s_3']:.2f} / {r['tok_s_7']:.2f} tok/s",
                              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
