"""What a quantized KV cache costs in quality and saves in memory, on the trained yardstick.

    python -m benchmarks.kv_quality                 # the model benchmarks/train_small.py trained
    python -m benchmarks.kv_quality --tokens 3072 --generate 512

Quality, two ways, each against the float cache of the same model:
- teacher-forced: held-out text fed in decode-sized chunks, KL(float || quantized) of every
  next-token distribution and how often the top-1 token agrees, reported by depth bucket;
- over a long generation: the float cache greedily writes `--generate` tokens after a held-out
  prompt, then each quantized cache is fed that same text (so the contexts stay equal) and
  scored the same way.
Memory: KV bytes of Mixtral-8x7B at 4k/16k/32k (float16 on a Mac, and each quantized format),
from the byte counts the tests check against real caches, and the bytes the trained model's
caches really took here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlx_mixtral
from benchmarks import synthetic, train_small
from mlx_mixtral import kv_format, make_cache
from mlx_mixtral.experts.budget import kv_cache_bytes

FORMATS = [(8, 64), (8, 32), (4, 64), (4, 32)]
CHUNK = 16  # tokens per step: decode-like, so nearly every query reads quantized past keys


def logprobs(model, ids: list[int], fmt) -> np.ndarray:
    cache = make_cache(model, fmt)
    out = []
    for i in range(0, len(ids), CHUNK):
        logits = model(mx.array([ids[i:i + CHUNK]]), cache=cache)[0]
        out.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
    return np.concatenate(out)


def scores(reference: np.ndarray, other: np.ndarray, buckets: int) -> dict:
    kl = (np.exp(reference) * (reference - other)).sum(-1)
    agree = reference.argmax(-1) == other.argmax(-1)
    cuts = np.linspace(0, len(kl), buckets + 1).astype(int)
    return {"kl": float(kl.mean()), "top1": float(agree.mean()),
            "by_depth": [{"from": int(a), "to": int(b), "kl": float(kl[a:b].mean()), "top1": float(agree[a:b].mean())}
                         for a, b in zip(cuts[:-1], cuts[1:])]}


def greedy(model, prompt: list[int], n: int) -> list[int]:
    cache = make_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[0, -1]
    out = []
    for _ in range(n):
        token = int(mx.argmax(logits))
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=train_small.DEFAULT_OUT / "float32")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens, teacher-forced")
    p.add_argument("--generate", type=int, default=256, help="tokens the float cache generates greedily")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not (args.model / "config.json").exists():
        print(f"error: no model at {args.model}; run python -m benchmarks.train_small first", file=sys.stderr)
        return 2
    model, _ = mlx_mixtral.load(args.model, progress=False)
    heldout = np.load(args.model.parent / "corpus" / "heldout.npy")
    ids = [1] + heldout[: args.tokens - 1].tolist()
    result = {"model": str(args.model), "tokens": len(ids), "chunk": CHUNK, "formats": {}}
    reference = logprobs(model, ids, kv_format(None))
    prompt = ids[:256]
    text = prompt + greedy(model, prompt, args.generate)
    gen_reference = logprobs(model, text, kv_format(None))[len(prompt) - 1:]
    for bits, group in FORMATS:
        fmt = kv_format(bits, group, model.config.head_dim)
        name = f"{bits}-bit g{group}"
        forced = scores(reference, logprobs(model, ids, fmt), 4)
        generated = scores(gen_reference, logprobs(model, text, fmt)[len(prompt) - 1:], 1)
        result["formats"][name] = {"teacher_forced": forced, "generation": {k: generated[k] for k in ("kl", "top1")}}
        print(f"{name:>12}: teacher-forced KL {forced['kl']:.2e} top-1 {forced['top1']:.4f} | "
              f"generation ({args.generate} tokens) KL {generated['kl']:.2e} top-1 {generated['top1']:.4f}")
    mixtral = synthetic.SHAPES["mixtral-8x7b"]
    result["mixtral_8x7b_gb"] = {}
    for ctx in (4096, 16384, 32768):
        row = {"float16": kv_cache_bytes(mixtral, ctx, 2) / 1e9}
        for bits in (8, 4):
            row[f"{bits}-bit g64"] = kv_cache_bytes(mixtral, ctx, 2, kv_format(bits, 64)) / 1e9
        result["mixtral_8x7b_gb"][ctx] = row
        print(f"Mixtral-8x7B KV at {ctx:>5}: " + ", ".join(f"{k} {v:.2f} GB" for k, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
