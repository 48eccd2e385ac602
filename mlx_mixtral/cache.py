"""Key/value caches: one per decoder layer, so each new token attends to the past without recomputing it.

Two kinds:
- `KVCache` keeps every position. Its buffer is preallocated and grows in steps, so decoding a
  token writes in place instead of concatenating (which would copy the whole cache each step).
- `SlidingWindowCache` keeps only what a sliding-window model can still attend to (the last
  `window - 1` positions before the newest chunk), in time order, in a buffer that it compacts
  once it fills up: amortised O(1) per token, and keys stay in order so masks stay simple.

Both are trimmable (`trim(n)` drops the newest n positions), which lets a conversation continue
from a cached prefix: the chat REPL trims back to where the new prompt diverges and prefills only
the rest.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

_STEP = 256  # positions added per growth; large enough that growth is rare, small enough to waste little


class KVCache:
    """Every position's keys and values, `[batch, kv_heads, capacity, head_dim]`."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # positions seen so far == position of the next token

    def _reserve(self, keys: mx.array, values: mx.array, used: int, needed: int) -> None:
        """Grow the buffers (in whole steps, keeping the first `used`) so `needed` positions fit."""
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if needed <= capacity:
            return
        B, H, _, Dk = keys.shape
        Dv = values.shape[3]
        grow = -(-(needed - used) // _STEP) * _STEP  # on top of the `used` positions kept
        new_k = mx.zeros((B, H, grow, Dk), keys.dtype)
        new_v = mx.zeros((B, H, grow, Dv), values.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys[..., :used, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :used, :], new_v], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append `L` new positions and return all keys/values so far, `[B, H, offset + L, D]`."""
        L = keys.shape[2]
        self._reserve(keys, values, self.offset, self.offset + L)
        self.keys[..., self.offset : self.offset + L, :] = keys
        self.values[..., self.offset : self.offset + L, :] = values
        self.offset += L
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

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
        return [] if self.keys is None else [self.keys, self.values]


class SlidingWindowCache(KVCache):
    """Keys/values for a sliding-window model: each query sees itself and the `window - 1` before it.

    `start` is the position of the first key still held. The buffer is compacted (older keys
    dropped) only when a write would overflow it, so most steps write in place.
    """

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window
        self.start = 0

    def _held(self) -> int:
        return self.offset - self.start

    def _start_after(self, length: int) -> int:
        """Where the held keys will begin once `length` new positions are added."""
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if self._held() + length <= capacity:
            return self.start
        return max(self.start, self.offset - (self.window - 1))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        L = keys.shape[2]
        new_start = self._start_after(L)
        if new_start != self.start:  # compact: drop keys no query can reach any more
            drop = new_start - self.start
            held = self._held()
            self.keys = self.keys[..., drop:held, :]
            self.values = self.values[..., drop:held, :]
            self.start = new_start
        held = self._held()
        # Room for this chunk plus a window's worth, so the next compaction is far away.
        self._reserve(keys, values, held, held + L + self.window)
        self.keys[..., held : held + L, :] = keys
        self.values[..., held : held + L, :] = values
        self.offset += L
        return self.keys[..., : held + L, :], self.values[..., : held + L, :]

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


def make_cache(model: Any) -> list[KVCache]:
    """One fresh cache per decoder layer, sliding when the model's config sets a window."""
    config = model.config
    window = config.sliding_window
    if window and window < config.max_position_embeddings:
        return [SlidingWindowCache(window) for _ in range(config.num_hidden_layers)]
    return [KVCache() for _ in range(config.num_hidden_layers)]
