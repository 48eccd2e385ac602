"""Expert-cache hit rates on real text: the trained model against random weights of its shape.

Streaming figures elsewhere (benchmarks/streaming.py) come from random weights, whose routing has
little token-to-token locality. Here the model `benchmarks/train_small.py` trained (8 experts
top-2 per layer, 4 layers: 32 experts) is converted to 4 bits with our defaults, loaded with
`--max-memory` budgets that leave room for a given number of cached experts, and fed held-out
Python source one token at a time, as decoding does (teacher-forced: the routing of real text,
not of whatever a small model would generate). For every cache size and policy it reports the
cache's own counters: hit rate (hits and prefetched experts over requests) and prefetch recall,
with and without prefetch, and, as a bound no policy can beat, the hit rate of Belady's offline
optimum (evicts the expert needed farthest in the future) on the same request stream.

The same is done on a random model of the same shape with decisive routing (quant_quality's
weights), so the gap between them says how far the random-weight figures are from a trained
model's.

    python -m benchmarks.cache_hits [--tokens 512] [--slots 4 8 16 24]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks import train_small
from benchmarks.quant_quality import random_model, run_model
from convert.convert import convert
from mlx_mixtral.cache import make_cache
from mlx_mixtral.config import ModelConfig
from mlx_mixtral.experts.expert_cache import POLICIES
from mlx_mixtral.loading import load_model

PROMPTS = 4  # held-out windows, decoded one after another with a fresh KV cache each
PER_TOKEN = 8  # experts a token uses in the trained model (4 layers x top-2)


def decode(folder: Path, tokens: np.ndarray, budget: int, policy: str, prefetch: bool, before: bool = False) -> dict:
    """Feed `tokens` [P, T] one position at a time through the model streamed under `budget`.
    `before`: LFU as it was before its pressure rule (ties always to the least recent)."""
    model = load_model(folder, progress=False, max_memory=budget, policy=policy, prefetch=prefetch)
    cache = model.runtime.expert_cache
    if before:
        cache.pressed = False
    try:
        cache.reset_stats()
        for row in tokens:
            kv = make_cache(model)
            for t in range(len(row)):
                mx.eval(model(mx.array(row[None, t:t + 1]), cache=kv))
        s = cache.snapshot()
        return {"hit_rate": s.hit_rate, "prefetch_recall": s.prefetch_recall, "requests": s.requests,
                "slots": cache.plan.cached_experts}
    finally:
        cache.close()


def budgets_for(folder: Path, slot_counts: list[int]) -> dict[int, int]:
    """The --max-memory that leaves exactly n experts' worth of cache, for each n (resident and
    read buffers as `load_model` plans them)."""
    model = load_model(folder, progress=False, max_memory=10**12)
    p = model.runtime.expert_cache.plan
    model.runtime.expert_cache.close()
    return {n: p.resident + p.staging + n * p.expert_bytes for n in slot_counts}


def belady(requests: list[tuple[int, list[int]]], slots: int) -> float:
    """Hit rate of the offline optimum over (layer, experts needed together) requests."""
    keys = [[(layer, e) for e in experts] for layer, experts in requests]
    next_use: list[dict] = [{} for _ in keys]
    upcoming: dict = {}
    for i in range(len(keys) - 1, -1, -1):
        next_use[i] = {key: upcoming.get(key, len(keys)) for key in keys[i]}
        for key in keys[i]:
            upcoming[key] = i
    held: dict = {}  # key -> index of its next use
    hits = total = 0
    for i, group in enumerate(keys):
        for key in group:
            total += 1
            if key in held:
                hits += 1
            elif len(held) >= slots:
                victim = max((k for k in held if k not in group), key=held.get)
                del held[victim]
            held[key] = next_use[i][key]
    return hits / total


def routing_trace(folder: Path, tokens: np.ndarray) -> list[tuple[int, list[int]]]:
    """Each (token, layer)'s expert set, in decode order, from the resident model."""
    model = load_model(folder, progress=False)
    trace = []
    for row in tokens:
        _, chosen = run_model(model, mx.array(row[None]))
        for t in range(len(row)):
            trace += [(layer, c[0, t].tolist()) for layer, c in enumerate(chosen)]
    return trace


def measure(name: str, folder: Path, tokens: np.ndarray, slot_counts: list[int]) -> list[dict]:
    trace = routing_trace(folder, tokens)
    rows = []
    for slots, budget in budgets_for(folder, slot_counts).items():
        row = {"model": name, "slots": slots, "belady": belady(trace, slots)}
        for policy in POLICIES:
            for prefetch in (True, False):
                r = decode(folder, tokens, budget, policy, prefetch)
                assert r["slots"] == slots, r
                row[f"{policy}{'' if prefetch else '_noprefetch'}"] = r["hit_rate"]
                if prefetch:
                    row[f"{policy}_recall"] = r["prefetch_recall"]
            if policy == "lfu" and slots < PER_TOKEN:  # under pressure: the rule before it, too
                for prefetch in (True, False):
                    r = decode(folder, tokens, budget, policy, prefetch, before=True)
                    row[f"lfu_before{'' if prefetch else '_noprefetch'}"] = r["hit_rate"]
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", type=Path, default=train_small.DEFAULT_OUT, metavar="DIR")
    parser.add_argument("--tokens", type=int, default=128, help="tokens decoded per prompt")
    parser.add_argument("--slots", type=int, nargs="+", default=[4, 8, 16, 24],
                        help="cached experts (the model has 32; a token needs 2 per layer)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    src = args.trained / "float32"
    if not (src / "model.safetensors").is_file():
        raise SystemExit(f"error: {src} has no trained model; run python -m benchmarks.train_small first")
    heldout = np.load(args.trained / "corpus" / "heldout.npy")
    tokens = train_small.eval_windows(heldout, args.tokens - 1, PROMPTS)
    work = Path(tempfile.mkdtemp(prefix="cache_hits-"))
    try:
        trained = convert(src, work / "trained-4bit", quantize=True, dtype="bfloat16", progress=False).path
        config = ModelConfig.from_file(src / "config.json")
        rand_src = random_model(work / "random", 0, config)
        rand = convert(rand_src, work / "random-4bit", quantize=True, dtype="bfloat16", progress=False).path
        rows = measure("trained", trained, tokens, args.slots) + measure("random", rand, tokens, args.slots)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    total = config.num_hidden_layers * config.num_local_experts
    print(f"{PROMPTS} held-out windows x {args.tokens} tokens decoded one at a time; "
          f"{total} experts in all, 4-bit\n")
    print("| model | cached experts | LFU | LRU | cyclic | LFU, no prefetch | LRU, no prefetch | cyclic, no prefetch "
          "| optimum (Belady) | prefetch recall (LFU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['slots']} ({r['slots'] / total:.0%}) | {r['lfu']:.1%} | {r['lru']:.1%} "
              f"| {r['cyclic']:.1%} | {r['lfu_noprefetch']:.1%} | {r['lru_noprefetch']:.1%} "
              f"| {r['cyclic_noprefetch']:.1%} | {r['belady']:.1%} | {r['lfu_recall']:.1%} |")
    pressed = [r for r in rows if "lfu_before" in r]
    if pressed:
        print("\nUnder pressure (fewer slots than a token's experts): LFU before / after its pressure rule\n")
        print("| model | cached experts | LFU before | LFU now | LFU before, no prefetch | LFU now, no prefetch | optimum |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in pressed:
            print(f"| {r['model']} | {r['slots']} | {r['lfu_before']:.1%} | {r['lfu']:.1%} "
                  f"| {r['lfu_before_noprefetch']:.1%} | {r['lfu_noprefetch']:.1%} | {r['belady']:.1%} |")


if __name__ == "__main__":
    main()
