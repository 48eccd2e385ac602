"""The machine's side of expert streaming: how fast its disk reads, and where memory went.

`read_bandwidth` reads random large, aligned ranges of the model's own files the way the expert
streamer does (`uncached_io`, the same number of threads), so "streaming achieved X% of the disk"
compares like with like and the page cache cannot flatter either figure. `peak_rss` and
`page_cache` report the two kinds of memory a streamed model can use: the process's own, and
what the kernel holds for the model files outside it.
"""

from __future__ import annotations

import random
import resource
import sys
import threading
import time
from pathlib import Path

from mlx_mixtral.experts.expert_cache import READERS
from mlx_mixtral.experts.uncached_io import ALIGN, UncachedFile, page_cache_bytes

CHUNK = 32 << 20  # about one 4-bit Mixtral-8x7B expert projection


def read_bandwidth(files: list[Path], seconds: float = 5.0, threads: int = READERS, seed: int = 0) -> float:
    """Bytes per second read from `files` by `threads` threads for about `seconds`."""
    handles = [UncachedFile(f) for f in files]
    sizes = [f.stat().st_size for f in files]
    chunk = min(CHUNK, max(sizes) // ALIGN * ALIGN)  # small models: whole files
    total = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(n: int) -> None:
        rng = random.Random(seed + n)
        while time.perf_counter() < stop:
            i = rng.randrange(len(handles))
            if sizes[i] < chunk:
                continue
            offset = rng.randrange(0, sizes[i] - chunk + 1) // ALIGN * ALIGN
            handles[i].read(offset, chunk)
            with lock:
                total[0] += chunk

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    for h in handles:
        h.close()
    return total[0] / elapsed


def peak_rss() -> int:
    """This process's peak resident set, in bytes (ru_maxrss is KB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def page_cache(files: list[Path]) -> int | None:
    """Bytes of `files` in the OS page cache now, or None where that cannot be asked."""
    held = [page_cache_bytes(f) for f in files]
    return None if any(h is None for h in held) else sum(held)
