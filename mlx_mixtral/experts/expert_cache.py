"""The experts held in memory under a byte budget, read from disk on background threads.

`fetch(layer, experts)` pins the experts one layer needs now and starts reading those it lacks;
`release` unpins them once their outputs are evaluated. `prefetch(layer, experts)` starts reading
experts a later layer will probably need (the next layer's router applied to the current hidden
state, as Eliseev & Mazur 2023 do) while the current layer computes. When a new expert does not
fit, an unpinned one is evicted by the policy:

- `lru`: the least recently used;
- `lfu`: the least often used so far, which keeps each layer's favourite experts resident when
  routing is skewed. Ties go to the least recently used, except under pressure: when the cache
  holds fewer experts than one token uses (`per_token`), the most recently used goes. Every
  token then evicts what the next one needs, a loop larger than the cache, which LRU order
  turns into 0% hits; evicting the newest keeps a stable set resident instead, and the hits
  stay near what the capacity allows (benchmarks/RESULTS.md: "No thrash").
- `cyclic`: the expert whose layer comes round last (ties: the least recently used). Layers run
  in a fixed order, so the experts of the layer just computed are the ones needed furthest in
  the future: Belady's rule with the one part of the future that is known. With routing like
  Mixtral's it hits most (benchmarks/RESULTS.md, "Streaming for the smallest Macs").

Entries are whole experts (gate, up and down projections together), because a routed token
always needs all three. The cache never holds more than `capacity` bytes, pending reads
included; the caller must not pin more than `slots` experts at once.
"""

from __future__ import annotations

import ctypes
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx

from ..errors import MixtralError
from .budget import Plan
from .expert_store import ExpertStore
from .low_bit import LowBitCopy
from .routing import RoutingLog

POLICIES = ("lru", "lfu", "cyclic")
# Measured (benchmarks/RESULTS.md): 87.8% hits against LRU's 75.0% on the full-shape random model
# at 10 and 14 GB; 63.7% against 60.8% (25% of the experts cached) and 87.2% against 85.2% (50%)
# on the trained model with prefetch. Without prefetch LRU does as well or better.
DEFAULT_POLICY = "lfu"
READERS = 4  # reads in flight at once: SSDs need a queue to reach their bandwidth
# MLX keeps freed buffers for reuse; the evicted experts' would pile up outside the budget
# (measured at 6 GB: peak RSS 7.66 GB, 6.15 GB with this cap). A few experts' worth is reused.
FREED_EXPERTS_KEPT = 4
# glibc serves an allocation below its (growing) mmap threshold from heap arenas that do not
# shrink; expert tensors (~30 MB) are just below its 32 MB ceiling. A fixed threshold maps them
# and gives them back when freed (measured at 6 GB: peak RSS 6.46 GB, 6.13 GB with it).
MMAP_THRESHOLD = 1 << 20


GLIBC_MMAP_THRESHOLD = 128 * 1024  # glibc's initial M_MMAP_THRESHOLD, put back on close


def _give_freed_memory_back(expert_bytes: int) -> Callable[[], None]:
    """Keep memory freed by evictions from lingering outside the budget. These are process-wide
    settings: the returned function puts them back (MLX's cache limit as it was; glibc's mmap
    threshold to its initial 128 KiB, since glibc cannot be asked for the current value)."""
    previous = mx.set_cache_limit(min(mx.get_memory_limit(), FREED_EXPERTS_KEPT * expert_bytes))
    mallopt = _glibc_mallopt()
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)

    def restore() -> None:
        mx.set_cache_limit(previous)
        if mallopt is not None:
            mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD)

    return restore


M_MMAP_THRESHOLD = -3  # in <malloc.h>


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None on other C libraries (macOS's returns freed memory by itself)."""
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


@dataclass
class StreamStats:
    """What the cache did since the last `reset`: per expert request (one layer, one forward)."""

    requests: int = 0
    hits: int = 0  # in memory when asked
    prefetched: int = 0  # being read (or read) by a prefetch when asked
    misses: int = 0  # read on demand
    wait_s: float = 0.0  # time the model waited for reads
    prefetch_issued: int = 0
    predicted: int = 0  # of the experts a layer asked for, those the previous layer's guess named
    evictions: int = 0
    bytes_read: int = 0
    read_s: float = 0.0  # summed over the reading threads
    elapsed_s: float = 0.0  # wall time since the reset
    low_bit_reads: int = 0  # misses served from the low-bit copy (`low_bit`), not counted in `misses`
    low_bit_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        """Requests served without a demand read: hits plus completed or in-flight prefetches."""
        return (self.hits + self.prefetched) / self.requests if self.requests else 0.0

    @property
    def prefetch_recall(self) -> float:
        return self.predicted / self.requests if self.requests else 0.0


@dataclass
class _Entry:
    future: Future
    nbytes: int
    pins: int = 0
    uses: int = 0
    last_use: int = 0
    by_prefetch: bool = False


class ExpertCache:
    """Experts in memory, at most `capacity` bytes of them, filled from `store`."""

    def __init__(self, store: ExpertStore, capacity: int, policy: str = DEFAULT_POLICY,
                 readers: int = READERS, prefetch: bool = True, plan: Plan | None = None, per_token: int = 0):
        if policy not in POLICIES:
            raise MixtralError(f"unknown expert cache policy {policy!r}; choose from {', '.join(POLICIES)}")
        self.store, self.capacity, self.policy = store, capacity, policy
        self.prefetch_enabled = prefetch
        self.expert_bytes = store.max_expert_bytes
        self.slots = capacity // self.expert_bytes  # experts that fit at once
        self.pressed = self.slots < per_token  # fewer slots than a token's experts (all layers, top-k)
        self.plan = plan  # what the budget bought, as `budget.plan` worked it out (for the front doors)
        self._restore: Callable[[], None] | None = _give_freed_memory_back(self.expert_bytes)
        self.log = RoutingLog(store.num_layers, store.num_experts)
        self.stats = StreamStats()
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._used = 0
        self.peak_used = 0  # the most the cache ever held, pending reads included
        self._tick = 0
        self._layer = 0  # the layer fetched last (`cyclic` measures distances from it)
        self._guess: dict[int, set[int]] = {}  # layer -> experts its predecessor expects it to need
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="expert-reader")
        self._reset_at = time.perf_counter()
        self._read_base = (0, 0.0)
        self.low_bit: LowBitCopy | None = None  # read instead on some misses (`stream_experts`)

    # -- what the model calls ---------------------------------------------------------------------
    def fetch(self, layer: int, experts: Iterable[int]) -> dict[int, Future]:
        """Pin `experts` of `layer` and return a future of each one's arrays (done if cached).

        Those present are pinned before room is made for the others, so a miss never evicts an
        expert the same request is about to use (one a prefetch just read, say)."""
        experts = list(experts)
        self._layer = layer
        guess = self._guess.pop(layer, None)
        out: dict[int, Future] = {}
        with self._lock:
            for e in sorted(dict.fromkeys(experts), key=lambda e: (layer, e) not in self._entries):  # present first
                key = (layer, e)
                entry = self._entries.get(key)
                if entry is None:
                    self._make_room(self.store.nbytes(layer, e))
                    entry = self._start(key, by_prefetch=False)
                    self.stats.misses += 1
                    self.log.misses[layer, e] += 1
                else:
                    if entry.by_prefetch and entry.uses == 0:
                        self.stats.prefetched += 1
                    else:
                        self.stats.hits += 1
                    self.log.hits[layer, e] += 1
                self.stats.requests += 1
                self.stats.predicted += guess is not None and e in guess
                entry.pins += 1
                entry.uses += 1
                self._tick += 1
                entry.last_use = self._tick
                out[e] = entry.future
        return {e: out[e] for e in experts}

    def present(self, layer: int, expert: int) -> bool:
        """Whether the expert is in memory or being read (a fetch would not be a miss)."""
        with self._lock:
            return (layer, expert) in self._entries

    def wait(self, layer: int, expert: int, future: Future) -> dict[str, mx.array]:
        """A fetched expert's arrays, blocking until read. A read error surfaces here, and the
        failed entry is forgotten, so a later request reads again."""
        start = time.perf_counter()
        try:
            return future.result()
        except BaseException:
            if future.done() and future.exception() is not None:
                with self._lock:
                    entry = self._entries.pop((layer, expert), None)
                    if entry is not None:
                        self._used -= entry.nbytes
            raise
        finally:
            self.stats.wait_s += time.perf_counter() - start

    def release(self, layer: int, experts: Iterable[int]) -> None:
        with self._lock:
            for e in experts:
                entry = self._entries.get((layer, e))
                if entry is not None:  # (a failed read's entry is already gone)
                    entry.pins -= 1

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Start reading experts `layer` will probably need, where they fit without evicting a
        pinned expert; remember the guess to measure its recall."""
        experts = set(experts)
        self._guess[layer] = experts
        if not self.prefetch_enabled:
            return
        with self._lock:
            for e in sorted(experts):
                key = (layer, e)
                if key in self._entries:
                    continue
                if not self._make_room(self.store.nbytes(layer, e), must=False):
                    return
                self._start(key, by_prefetch=True)
                self.stats.prefetch_issued += 1

    # -- bookkeeping ------------------------------------------------------------------------------
    def _start(self, key: tuple[int, int], by_prefetch: bool) -> _Entry:
        entry = _Entry(self._pool.submit(self.store.read, *key), self.store.nbytes(*key),
                       by_prefetch=by_prefetch)
        self._entries[key] = entry
        self._used += entry.nbytes
        self.peak_used = max(self.peak_used, self._used)
        return entry

    def _victim(self) -> tuple[int, int] | None:
        candidates = [(k, v) for k, v in self._entries.items() if v.pins == 0]
        if not candidates:
            return None
        if self.policy == "lfu":
            newest_first = -1 if self.pressed else 1  # see the module docstring
            return min(candidates, key=lambda kv: (kv[1].uses, newest_first * kv[1].last_use))[0]
        if self.policy == "cyclic":  # how many layers until this one comes round again, the most goes
            layers = self.store.num_layers
            return max(candidates, key=lambda kv: ((kv[0][0] - self._layer - 1) % layers, -kv[1].last_use))[0]
        return min(candidates, key=lambda kv: kv[1].last_use)[0]

    def _make_room(self, nbytes: int, must: bool = True) -> bool:
        """Evict until `nbytes` more fit. A prefetch (`must=False`) evicts only experts already
        used at least once since being read, never another prefetch still unused."""
        while self._used + nbytes > self.capacity:
            key = self._victim()
            if key is None or (not must and self._entries[key].uses == 0):
                if must:
                    raise RuntimeError("expert cache: every cached expert is pinned")  # caller's bug
                return False
            entry = self._entries.pop(key)
            if not entry.future.done():  # an unused prefetch still reading: let it finish
                entry.future.result()
            self._used -= entry.nbytes
            self.stats.evictions += 1
        return True

    # -- reporting --------------------------------------------------------------------------------
    @property
    def cached_experts(self) -> int:
        return len(self._entries)

    def reset_stats(self) -> None:
        """Start counting afresh (a new reply, a new benchmark run)."""
        self.stats = StreamStats()
        self.log.reset()
        self._reset_at = time.perf_counter()
        self._read_base = (self.store.bytes_read, self.store.read_seconds)

    def snapshot(self) -> StreamStats:
        """The stats so far, with the disk figures filled in."""
        s = self.stats
        s.bytes_read = self.store.bytes_read - self._read_base[0]
        s.read_s = self.store.read_seconds - self._read_base[1]
        s.elapsed_s = time.perf_counter() - self._reset_at
        return s

    def close(self) -> None:
        """Stop the readers, close the files and put the process-wide memory settings back."""
        self._pool.shutdown(wait=True)
        self.store.close()
        if self.low_bit is not None:
            self.low_bit.close()
        if self._restore is not None:
            self._restore, restore = None, self._restore
            restore()
