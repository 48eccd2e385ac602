"""Peak memory of a long prefill: chunks sized by memory (`generate.prefill_chunk`) against fixed chunks.

    python -m benchmarks.long_prefill                          # 16k tokens, small shape, 2 layers
    python -m benchmarks.long_prefill --tokens 16384 --layers 8 --fixed 512 2048

Where attention scores are materialised (MLX's CPU backend; quantized attention everywhere), a
chunk of L queries over K held keys takes 2 x heads x L x (K + L) x 4 bytes of scores and
probabilities, so a fixed chunk costs more memory the deeper it goes: at 16k that is gigabytes.
`generate.prefill` shrinks chunks to keep them within SCORES_BUDGET. This feeds the same random
prompt both ways into a synthetic model (random weights of the `--shape`, fewer layers to keep it
short: the scores are per layer, so the layer count changes the weights, not the spike) and
reports the peak above what was resident before: the KV cache it built, and the rest, which is
one chunk's activations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks import synthetic
from mlx_mixtral import kv_format, make_cache
from mlx_mixtral.generate import SCORES_BUDGET, prefill


def run(model, tokens: list[int], fmt, fixed: int | None) -> dict:
    """Prefill `tokens`; `fixed`: that many tokens per chunk, else chunks sized by memory."""
    cache = make_cache(model, fmt)
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    start = time.perf_counter()
    chunks: list[int] = []
    if fixed is None:
        prefill(model, tokens, cache, step=2048, progress=chunks.append)  # memory decides below 2048
    else:
        prompt = mx.array(tokens)[None]
        for i in range(0, len(tokens), fixed):
            model.model(prompt[:, i:i + fixed], cache)
            mx.eval([c.state for c in cache])
            chunks.append(min(fixed, len(tokens) - i))
    seconds = time.perf_counter() - start
    kv = sum(c.nbytes for c in cache)
    peak = mx.get_peak_memory() - base
    return {"chunks": "memory-sized" if fixed is None else f"fixed {fixed}", "n_chunks": len(chunks),
            "smallest_chunk": min(chunks), "largest_chunk": max(chunks), "seconds": seconds,
            "tok_s": len(tokens) / seconds, "peak_above_resident_gb": peak / 1e9, "kv_cache_gb": kv / 1e9,
            "activations_gb": (peak - kv) / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(synthetic.SHAPES), default="small")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default: %(default)s)")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8, 16))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--fixed", type=int, nargs="*", default=[2048],
                   help="fixed chunk sizes to compare (default: 2048, mlx-lm's prefill step)")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    config = replace(synthetic.shape_config(args.shape, args.bits), num_hidden_layers=args.layers,
                     max_position_embeddings=max(args.tokens + 1, 32768))
    model = synthetic.fill_random(synthetic.skeleton(config, synthetic.float_dtype()))
    weights = synthetic.nbytes(model)
    fmt = kv_format(args.kv_bits, None, config.head_dim)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, args.tokens).tolist()
    rows = [run(model, tokens, fmt, fixed) for fixed in [None, *args.fixed]]
    result = {"shape": args.shape, "layers": args.layers, "bits": args.bits, "tokens": args.tokens,
              "kv": fmt.describe(), "heads": config.num_attention_heads, "weights_gb": weights / 1e9,
              "scores_budget_gb": SCORES_BUDGET / 1e9, "device": str(mx.default_device()), "runs": rows}

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prefill of {args.tokens} tokens: {args.shape} shape, {args.layers} layers, "
                        f"{args.bits}-bit weights ({weights / 1e9:.2f} GB), {fmt.describe()} KV, {mx.default_device()}")
    for col in ("chunks", "sizes", "peak above resident", "KV cache", "activations", "tok/s"):
        table.add_column(col, justify="left" if col == "chunks" else "right")
    for r in rows:
        table.add_row(r["chunks"], f"{r['smallest_chunk']}-{r['largest_chunk']} (x{r['n_chunks']})",
                      f"{r['peak_above_resident_gb']:.2f} GB", f"{r['kv_cache_gb']:.2f} GB",
                      f"{r['activations_gb']:.2f} GB", f"{r['tok_s']:.1f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
