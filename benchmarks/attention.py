"""Attention over a long KV cache, one layer of Mixtral-8x7B's shape, float against quantized.

    python -m benchmarks.attention

One decode query (and one 512-token prefill chunk) over 4k and 16k cached positions: MLX's fused
kernel unsplit, our float path (split by KV head over the CPU streams), and 8/4-bit caches.
Median of 10 runs (3 for the chunk) after 2 warm-ups, in milliseconds.
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

from mlx_mixtral.kv_format import FLOAT, QuantizedKV

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def timed(f, n: int = 10) -> float:
    for _ in range(2):
        mx.eval(f())
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        mx.eval(f())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    for depth in (4096, 16384):
        k, v = (mx.random.normal((1, KV_HEADS, depth, HEAD_DIM)) for _ in range(2))
        for length, n in ((1, 10), (512, 3)):
            q = mx.random.normal((1, HEADS, length, HEAD_DIM))
            mask = "causal" if length > 1 else None
            mx.eval(q, k, v)
            row = {"fused": timed(lambda q=q, k=k, v=v, mask=mask: mx.fast.scaled_dot_product_attention(
                       q, k, v, scale=0.1, mask=mask), n),
                   "float split": timed(lambda q=q, k=k, v=v, mask=mask: FLOAT.attend(q, (k,), (v,), 0.1, mask), n)}
            for bits in (8, 4):
                fmt = QuantizedKV(bits)
                kq, vq = fmt.encode(k), fmt.encode(v)
                mx.eval(kq, vq)
                row[f"{bits}-bit"] = timed(lambda fmt=fmt, q=q, kq=kq, vq=vq, mask=mask: fmt.attend(q, kq, vq, 0.1, mask), n)
            print(f"{length:>3} queries over {depth:>5} keys: " + ", ".join(f"{k} {t:.1f} ms" for k, t in row.items()))


if __name__ == "__main__":
    main()
