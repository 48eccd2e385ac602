"""The little that differs between devices, kept in one place.

The CPU backend runs each kernel on one thread, so independent work is spread over side streams
(one thread each) to use more than one core; GPUs need no such help.

On Apple silicon, macOS may page out ("unwire") GPU buffers that have not been touched for a
while; for a model that fills most of unified memory that turns each token into a disk read. While
generating we raise MLX's wired-memory limit to what Metal recommends and restore it afterwards.
Everywhere else (no Metal: Linux CPU, CUDA) this is a no-op.

The compute dtype also differs: half precision on a GPU, float32 on the CPU (`compute_dtype`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

import mlx.core as mx


def metal_available() -> bool:
    return bool(getattr(mx, "metal", None)) and mx.metal.is_available()


def streaming_defaults() -> tuple[str, bool]:
    """The expert cache's eviction policy and whether it reads ahead, when the user names neither.

    Decided by where the model computes. On a GPU (Metal on a Mac, CUDA) a token's compute takes
    a fraction of the time its missed experts take to read from the SSD, so bytes read set the
    pace: "cyclic" without prefetch reads the fewest (the README's model of Mixtral's routing:
    prefetch's wrong guesses read 37-51% more, cyclic hits 4-7 points more than LRU). On the CPU
    backend a token's compute (seconds) hides the reads, and LFU with prefetch measured fastest
    (benchmarks/RESULTS.md, the streaming sweep)."""
    return ("cyclic", False) if mx.default_device() == mx.gpu else ("lfu", True)


@contextmanager
def wired_limit() -> Iterator[None]:
    """Keep the model's buffers wired while the body runs (Metal only)."""
    if not metal_available():
        yield
        return
    limit = mx.device_info()["max_recommended_working_set_size"]
    previous = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(previous)


def compute_dtype(stored: mx.Dtype) -> mx.Dtype:
    """The dtype to compute in for weights (or quantization scales) stored as `stored`.

    On a GPU (Metal, CUDA) half precision is the fast path, so stored float16/bfloat16 stay as
    they are. On the CPU backend `mx.gather_mm` only accepts float32 and quantized matmuls with
    bfloat16 scales run ~8x slower than with float32, so floats are widened to float32 there.
    """
    if mx.default_device() == mx.cpu and stored in (mx.float16, mx.bfloat16):
        return mx.float32
    return stored


def fused_attention(quantized: bool) -> bool:
    """Whether attention over a long context runs without materialising its scores.

    MLX's GPU backends (Metal, CUDA) have fused attention kernels for float keys and values; the
    CPU backend, and attention over quantized keys (two quantized matmuls) everywhere, write the
    [heads, queries, keys] scores to memory, so prefill chunks must be sized to fit them.
    """
    return mx.default_device() == mx.gpu and not quantized


def parallel_ways() -> int:
    """Into how many parts independent work should be split.

    On the CPU backend each MLX stream is served by its own thread and the big kernels (quantized
    and gathered matmuls, the bundled BLAS) are single-threaded, so parts on separate streams run
    on separate cores: one part per core. A GPU already spreads every kernel over all its cores:
    one part.
    """
    return _usable_cores() if mx.default_device() == mx.cpu else 1


def _usable_cores() -> int:
    """Cores this process may run on (a container or `taskset` may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


@lru_cache(maxsize=None)
def _cpu_streams(count: int) -> tuple[mx.Stream, ...]:
    """Created once: each stream owns a thread for the life of the process."""
    return tuple(mx.new_stream(mx.cpu) for _ in range(count))


def in_parallel(work: Sequence[Callable[[], mx.array]], axis: int) -> mx.array:
    """Build the pieces of `work` (lazily), the first on the current stream, each other one on a
    CPU side stream of its own, and join them along `axis`."""
    if len(work) == 1:
        return work[0]()
    streams = _cpu_streams(len(work) - 1)
    parts = [work[0]()]
    for stream, piece in zip(streams, work[1:]):
        with mx.stream(stream):
            parts.append(piece())
    return mx.concatenate(parts, axis=axis)


@contextmanager
def part_stream(i: int) -> Iterator[None]:
    """Run the body's operations as part `i` of independent work: part 0 on the current stream,
    the others spread over the CPU side streams (see `in_parallel`); on a GPU, all on one."""
    ways = parallel_ways()
    if ways == 1 or i % ways == 0:
        yield
        return
    with mx.stream(_cpu_streams(ways - 1)[i % ways - 1]):
        yield


def spans(n: int, parts: int) -> list[tuple[int, int]]:
    """`[0, n)` cut into at most `parts` contiguous, nearly equal, non-empty spans."""
    parts = max(1, min(parts, n))
    cuts = [n * i // parts for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))
