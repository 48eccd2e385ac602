"""What a low-bit copy on a miss costs in quality and saves in bytes, on the trained yardstick.

The model `benchmarks/train_small.py` trained is converted to 4 bits with our defaults, once with
a 2-bit and once with a 3-bit copy of its experts (`--miss-bits`), and streamed under tight
budgets. Held-out windows are decoded one token at a time (teacher-forced, as in cache_hits), for
each miss rule: a miss whose router weight is below the threshold reads the low-bit copy (0.3;
0.5 = a token's second choice; 1.0 = every miss). Against the resident 4-bit model's logits:
held-out perplexity, mean KL(resident || streamed) per token, top-1 agreement; and the expert
bytes read per token (full and low-bit reads, on disk).

`--calibration` converts with the shipped calibration text (importance-weighted scales for the
main weights and the copies alike); `--skips 0.2 0.3` adds rows with `--expert-skip` on top of
the 2-bit copy for second choices (a left-out second expert is not read at all).

    python -m benchmarks.low_bit_quality [--tokens 128] [--slots 4 8 12] [--calibration] [--skips ...]
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
from benchmarks.cache_hits import PROMPTS, budgets_for
from convert.convert import convert
from mlx_mixtral.cache import make_cache
from mlx_mixtral.loading import load_model

THRESHOLDS = (0.3, 0.5, 1.0)


def _log_softmax(logits: mx.array) -> np.ndarray:
    x = logits.astype(mx.float32)
    return np.array(x - mx.logsumexp(x, axis=-1, keepdims=True))


def decode(folder: Path, tokens: np.ndarray, **load) -> tuple[np.ndarray, dict]:
    """Log-probabilities [P, T, V] of `tokens` fed one position at a time, and the reads made."""
    model = load_model(folder, progress=False, **load)
    cache = model.runtime.expert_cache
    if cache is not None:
        cache.reset_stats()
    out = []
    for row in tokens:
        kv = make_cache(model)
        out.append(np.concatenate([_log_softmax(model(mx.array(row[None, t:t + 1]), cache=kv))[0]
                                   for t in range(len(row) - 1)]))
    stats = {}
    if cache is not None:
        s = cache.snapshot()
        positions = tokens.shape[0] * (tokens.shape[1] - 1)
        stats = {"gb_per_token": (s.bytes_read + s.low_bit_bytes) / positions / 1e9,
                 "full_mb_per_token": s.bytes_read / positions / 1e6, "low_mb_per_token": s.low_bit_bytes / positions / 1e6,
                 "hit_rate": s.hit_rate, "low_bit_share": s.low_bit_reads / max(1, s.low_bit_reads + s.misses)}
        model.runtime.close()
    return np.stack(out), stats


def quality(reference: np.ndarray, got: np.ndarray, targets: np.ndarray) -> dict:
    nll = -np.take_along_axis(got, targets[..., None], axis=-1).mean()
    kl = (np.exp(reference) * (reference - got)).sum(-1).mean()
    top1 = (reference.argmax(-1) == got.argmax(-1)).mean()
    return {"ppl": float(np.exp(nll)), "kl": float(kl), "top1": float(top1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", type=Path, default=train_small.DEFAULT_OUT, metavar="DIR")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, nargs="+", default=[4, 8, 12])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--calibration", action="store_true", help="convert with the shipped calibration text")
    parser.add_argument("--skips", type=float, nargs="*", default=[], help="--expert-skip fractions to add")
    args = parser.parse_args()
    src = args.trained / "float32"
    if not (src / "model.safetensors").is_file():
        raise SystemExit(f"error: {src} has no trained model; run python -m benchmarks.train_small first")
    tokens = train_small.eval_windows(np.load(args.trained / "corpus" / "heldout.npy"), args.tokens, PROMPTS)
    targets = tokens[:, 1:]
    work = Path(tempfile.mkdtemp(prefix="low_bit-"))
    rows = []
    try:
        folders = {bits: convert(src, work / f"4bit-miss{bits}", quantize=True, dtype="bfloat16", miss_bits=bits,
                                 progress=False, calibration=args.calibration or None).path for bits in (2, 3)}
        reference, _ = decode(folders[2], tokens)
        rows.append({"slots": None, "bits": None, "threshold": None, **quality(reference, reference, targets)})
        for slots, budget in budgets_for(folders[2], args.slots).items():
            base, reads = decode(folders[2], tokens, max_memory=budget)
            rows.append({"slots": slots, "bits": 4, "threshold": None, **quality(reference, base, targets), **reads})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            for bits, folder in folders.items():
                for threshold in THRESHOLDS:
                    got, reads = decode(folder, tokens, max_memory=budget, miss_bits=bits, miss_threshold=threshold)
                    rows.append({"slots": slots, "bits": bits, "threshold": threshold,
                                 **quality(reference, got, targets), **reads})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            for skip in args.skips:
                got, reads = decode(folders[2], tokens, max_memory=budget, miss_bits=2, expert_skip=skip)
                rows.append({"slots": slots, "bits": 2, "threshold": 0.5, "skip": skip,
                             **quality(reference, got, targets), **reads})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"{PROMPTS} held-out windows x {args.tokens} tokens decoded one at a time; the trained model, 4-bit, "
          f"32 experts{', calibrated' if args.calibration else ''}\n")
    print("| cached experts | low-bit copy | rule | MB read / token (full + low-bit) | vs no copy | perplexity "
          "| KL vs resident | top-1 agreement |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    base = None
    for r in rows:
        if r["slots"] is None:
            print(f"| all (resident) | - | - | 0 | | {r['ppl']:.2f} | 0 | 100% |")
            continue
        mb = r["gb_per_token"] * 1e3
        if r["bits"] == 4:
            base = mb
        rule = "-" if r["threshold"] is None else {0.5: "second choice (w < 0.5)", 1.0: "every miss"}.get(
            r["threshold"], f"w < {r['threshold']}") + (f", --expert-skip {r['skip']}" if r.get("skip") else "")
        print(f"| {r['slots']} | {'-' if r['bits'] == 4 else str(r['bits']) + '-bit'} | {rule} | {mb:.2f} "
              f"({r['full_mb_per_token']:.2f} + {r['low_mb_per_token']:.2f}) | {mb / base - 1:+.0%} | {r['ppl']:.2f} "
              f"| {r['kl']:.4f} | {r['top1']:.1%} |")


if __name__ == "__main__":
    main()
