"""Key/value caches: one per decoder layer, so each new token attends to the past without recomputing it.

Two kinds:
- `KVCache` keeps every position. Its buffer is preallocated and grows in steps, so decoding a
  token writes in place instead of concatenating (which would copy the whole cache each step).
- `SlidingWindowCache` keeps only what a sliding-window model can still attend to (the last
  `window - 1` positions before the newest chunk), in time order, in a buffer that it compacts
  once it fills up: amortised O(1) per token, and keys stay in order so masks stay simple.

Either stores its keys and values in a `kv_format` (float, or quantized to 8 or 4 bits): the
buffers are tuples of parts (one for float; packed ints, scales and biases when quantized), and
everything here (growth, compaction, trimming) treats the parts alike along the position axis.

Both are trimmable (`trim(n)` drops the newest n positions), which lets a conversation continue
from a cached prefix: the chat REPL trims back to where the new prompt diverges and prefills only
the rest.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .kv_format import FLOAT, KVFormat, Parts

_STEP = 256  # positions added per growth; large enough that growth is rare, small enough to waste little


class KVCache:
    """Every position's keys and values: parts shaped `[batch, kv_heads, capacity, ...]`."""

    def __init__(self, fmt: KVFormat = FLOAT) -> None:
        self.format = fmt
        self.keys: Parts | None = None
        self.values: Parts | None = None
        self.offset = 0  # positions seen so far == position of the next token
        self.start = 0  # position of the first key held (0 unless a sliding window dropped some)

    def _held(self) -> int:
        return self.offset - self.start

    def _reserve(self, keys: Parts, values: Parts, used: int, needed: int) -> None:
        """Grow the buffers (in whole steps, keeping the first `used`) so `needed` positions fit."""
        if needed <= self.capacity:
            return
        grow = -(-(needed - used) // _STEP) * _STEP  # on top of the `used` positions kept

        def grown(old: Parts | None, like: Parts) -> Parts:
            zeros = tuple(mx.zeros((*p.shape[:2], grow, *p.shape[3:]), p.dtype) for p in like)
            if old is None:
                return zeros
            return tuple(mx.concatenate([o[:, :, :used], z], axis=2) for o, z in zip(old, zeros))

        self.keys, self.values = grown(self.keys, keys), grown(self.values, values)

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    def _write(self, at: int, keys: Parts, values: Parts) -> tuple[Parts, Parts]:
        """Store the chunk at buffer index `at`; return the held parts, now ending with it."""
        end = at + keys[0].shape[2]
        for buffer, new in zip(self.keys + self.values, keys + values):
            buffer[:, :, at:end] = new
        self.offset += keys[0].shape[2]
        return self.held()

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Parts, Parts]:
        """Append `L` new positions and return the parts of all keys/values held so far."""
        keys, values = self.format.encode(keys), self.format.encode(values)
        held = self._held()
        self._reserve(keys, values, held, held + keys[0].shape[2])
        return self._write(held, keys, values)

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Any) -> mx.array:
        """Store the new keys/values, then attend `queries` over everything held."""
        held_keys, held_values = self.update_and_fetch(keys, values)
        return self.format.attend(queries, held_keys, held_values, scale, mask)

    def mask(self, length: int) -> mx.array | str | None:
        """Attention mask for `length` queries about to be added (None: attend to everything)."""
        return "causal" if length > 1 else None

    def trim(self, n: int) -> int:
        """Forget the newest `n` positions; returns how many were dropped."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    def can_trim_to(self, offset: int) -> bool:
        return 0 <= offset <= self.offset

    @property
    def state(self) -> list[Any]:
        """The arrays to evaluate so the cache holds no pending computation."""
        return [] if self.keys is None else [*self.keys, *self.values]

    @property
    def nbytes(self) -> int:
        """Bytes the buffers take (their whole capacity)."""
        return sum(a.nbytes for a in self.state)

    def held(self) -> tuple[Parts, Parts]:
        """The parts of the keys/values held, positions `start .. offset` (for saving)."""
        if self.keys is None:
            return (), ()
        n = self._held()
        return tuple(k[:, :, :n] for k in self.keys), tuple(v[:, :, :n] for v in self.values)

    def restore(self, keys: Parts, values: Parts, offset: int) -> None:
        """Hold `keys`/`values` (what `held` returned) as the positions ending at `offset`."""
        n = keys[0].shape[2] if keys else 0
        self.keys = tuple(keys) if keys else None
        self.values = tuple(values) if values else None
        self.offset, self.start = offset, offset - n


class SlidingWindowCache(KVCache):
    """Keys/values for a sliding-window model: each query sees itself and the `window - 1` before it.

    `start` is the position of the first key still held. The buffer is compacted (older keys
    dropped) only when a write would overflow it, so most steps write in place.
    """

    def __init__(self, window: int, fmt: KVFormat = FLOAT) -> None:
        super().__init__(fmt)
        self.window = window

    def _start_after(self, length: int) -> int:
        """Where the held keys will begin once `length` new positions are added: where they
        begin now while the buffer has room for them and a window more, else (compacting) the
        oldest key the first new query still sees."""
        if self._held() + length + self.window <= self.capacity:
            return self.start
        return max(self.start, self.offset - (self.window - 1))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Parts, Parts]:
        keys, values = self.format.encode(keys), self.format.encode(values)
        L = keys[0].shape[2]
        new_start = self._start_after(L)
        if new_start != self.start:  # compact: drop keys no query can reach any more
            drop, held = new_start - self.start, self._held()
            self.keys = tuple(k[:, :, drop:held] for k in self.keys)
            self.values = tuple(v[:, :, drop:held] for v in self.values)
            self.start = new_start
        held = self._held()
        # Room for this chunk plus a window's worth, so the next compaction is far away.
        self._reserve(keys, values, held, held + L + self.window)
        return self._write(held, keys, values)

    def mask(self, length: int) -> mx.array | None:
        k_start = self._start_after(length)
        k_end = self.offset + length
        if length == 1 and k_end - k_start <= self.window:
            return None
        q_pos = mx.arange(self.offset, k_end)[:, None]
        k_pos = mx.arange(k_start, k_end)[None, :]
        return (k_pos <= q_pos) & (k_pos > q_pos - self.window)

    def can_trim_to(self, offset: int) -> bool:
        # After trimming, the next query (at `offset`) must still find its window - 1 predecessors.
        return offset <= self.offset and (offset == 0 or self.start <= max(0, offset - self.window + 1))

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        target = self.offset - n
        if not self.can_trim_to(target):
            raise ValueError(
                f"cannot trim a sliding-window cache to position {target}: keys before "
                f"{self.start} are gone; prefill again from the start instead"
            )
        if target == 0:
            self.start = 0
        self.offset = target
        return n


def make_cache(model: Any, fmt: KVFormat = FLOAT) -> list[KVCache]:
    """One fresh cache per decoder layer, sliding when the model's config sets a window, storing
    keys and values in `fmt` (see `kv_format.kv_format`)."""
    config = model.config
    fmt.check(config.head_dim)
    window = config.sliding_window
    if window and window < config.max_position_embeddings:
        return [SlidingWindowCache(window, fmt) for _ in range(config.num_hidden_layers)]
    return [KVCache(fmt) for _ in range(config.num_hidden_layers)]
