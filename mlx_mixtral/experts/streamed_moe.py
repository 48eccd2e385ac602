"""A layer's experts read from disk on demand: a drop-in for the model's `SwitchGLU`.

The model calls `switch_mlp(x, indices)` and gets `[..., k, hidden]` back, whether the experts
are resident or streamed; `stream_experts(model, cache)` swaps every layer's `SwitchGLU` for a
`StreamedSwitchGLU`, so `model.py` stays the model.

How a streamed layer runs:
1. The router's choice is read back to the host (the one synchronisation streaming needs), and
   with it the next layer's router applied to this layer's hidden state: a guess of the experts
   the next layer will want, whose reads start now and overlap this layer's compute.
2. The (token, expert) pairs are sorted by expert, as the resident prefill does, so a prompt
   chunk reads each expert once, however many of its tokens chose it.
3. Each needed expert is pinned in the cache (read if absent); its rows go through the same
   kernels the resident model uses, on a one-expert stack (`gather_qmm` / `gather_mm` with
   expert index 0), which gives bitwise the same rows. Experts that are already in memory are
   computed first, while the others are still being read; parts spread over CPU streams.
4. The outputs are evaluated before the experts are unpinned, so an evicted expert's memory is
   really free: the budget holds. When a chunk needs more experts than fit at once, they go in
   batches of what fits.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..checkpoint import PROJECTIONS
from ..device import part_stream
from ..model import QuantizedSwitchLinear, SwitchGLU, SwitchLinear
from .expert_cache import ExpertCache
from .low_bit import LowBitCopy

Quantization = tuple[int, int, str] | None  # (group_size, bits, mode) of a projection, or float


def _quantization(template: nn.Module) -> Quantization:
    if isinstance(template, QuantizedSwitchLinear):
        return template.group_size, template.bits, template.mode
    return None


def _projection(arrays: dict[str, mx.array], proj: str, quantization: Quantization) -> nn.Module:
    """One projection of one expert, as the resident model's layer class would hold it."""
    if quantization is not None:
        return QuantizedSwitchLinear(arrays[f"{proj}.weight"], arrays[f"{proj}.scales"],
                                     arrays.get(f"{proj}.biases"), *quantization)
    return SwitchLinear.from_weight(arrays[f"{proj}.weight"])


class StreamedSwitchGLU(nn.Module):
    """The experts of layer `layer`, fetched through `cache`; same call and result as `SwitchGLU`."""

    def __init__(self, layer: int, template: SwitchGLU, cache: ExpertCache,
                 next_router: Callable[[mx.array], mx.array] | None, top_k: int,
                 router: Callable[[mx.array], mx.array] | None = None, low_bit: LowBitCopy | None = None):
        super().__init__()
        self._layer, self._cache, self._next_router, self._top_k = layer, cache, next_router, top_k
        # Only plain settings are kept: the template's (never loaded) arrays must not linger.
        self._quantization = {p: _quantization(getattr(template, p)) for p in PROJECTIONS}
        self._hidden = template.down_proj["weight"].shape[1]
        self._router, self._low_bit = router, low_bit  # (the router only serves the low-bit rule)

    def _expert(self, arrays: dict[str, mx.array], low_bit: bool = False) -> SwitchGLU:
        quantization = {p: self._low_bit.quantization for p in PROJECTIONS} if low_bit else self._quantization
        return SwitchGLU.from_projections(*(_projection(arrays, p, quantization[p]) for p in PROJECTIONS))

    def _low_bit_experts(self, x: mx.array, indices: mx.array, experts: np.ndarray, order: np.ndarray,
                         starts: np.ndarray) -> set[int]:
        """The experts to read from the low-bit copy: not in memory, and weighted below the
        threshold by every token that chose them (weights: softmax over the chosen logits)."""
        chosen_logits = mx.take_along_axis(self._router(x), indices, axis=-1).astype(mx.float32)
        weights = np.array(mx.softmax(chosen_logits, axis=-1)).reshape(-1)[order]
        largest = np.maximum.reduceat(weights, starts)
        return {int(e) for e, w in zip(experts, largest)
                if w < self._low_bit.threshold and not self._cache.present(self._layer, int(e))}

    def _compute(self, x: mx.array, chosen: list[int], futures: dict, token_of: np.ndarray,
                 starts: np.ndarray, counts: np.ndarray, low: set[int]) -> list[mx.array]:
        """The rows of each expert in `chosen`, evaluated: those in memory first, then each one
        as its read completes, spread over CPU streams. Those in `low` come from the low-bit copy."""
        ready = sorted(range(len(chosen)), key=lambda i: not futures[chosen[i]].done())
        out: list[mx.array | None] = [None] * len(chosen)
        for n, i in enumerate(ready):
            e = chosen[i]
            arrays = futures[e].result() if e in low else self._cache.wait(self._layer, e, futures[e])
            glu = self._expert(arrays, low_bit=e in low)
            a, m = int(starts[i]), int(counts[i])
            # Every op of a part on the part's own stream: a part that waits on an op queued on
            # another stream runs after that stream's earlier parts (measured: 2x slower).
            with part_stream(n):
                xs = x.reshape(-1, 1, x.shape[-1])[mx.array(token_of[a: a + m])]
                out[i] = glu.glu(xs, mx.zeros((m,), mx.uint32), True)
            mx.async_eval(out[i])
        mx.eval(out)
        return out

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        k = indices.shape[-1]
        lead = indices.shape[:-1]
        guess = None
        if self._next_router is not None:
            logits = self._next_router(x)
            guess = mx.argpartition(-logits, kth=self._top_k - 1, axis=-1)[..., : self._top_k]
            mx.eval(indices, guess)
        else:
            mx.eval(indices)
        ids = np.array(indices).reshape(-1)
        self._cache.log.add(self._layer, ids)
        order = np.argsort(ids, kind="stable")
        experts, starts, counts = np.unique(ids[order], return_index=True, return_counts=True)
        token_of = order // k  # the token of each (token, expert) pair, sorted by expert
        low = self._low_bit_experts(x, indices, experts, order, starts) if self._low_bit is not None else set()
        parts: list[mx.array] = []
        batch = max(1, self._cache.slots)
        for b in range(0, len(experts), batch):
            chosen = [int(e) for e in experts[b: b + batch]]
            cached = [e for e in chosen if e not in low]
            futures = self._cache.fetch(self._layer, cached)
            for e in low.intersection(chosen):
                futures[e] = self._low_bit.read(self._layer, e)
                self._cache.stats.low_bit_reads += 1
                self._cache.stats.low_bit_bytes += self._low_bit.store.disk_bytes(self._layer, e)
            try:
                if b == 0 and guess is not None:  # after our own reads are queued: they come first
                    self._cache.prefetch(self._layer + 1, np.unique(np.array(guess)).tolist())
                out = self._compute(x, chosen, futures, token_of, starts[b:], counts[b:], low)
            finally:  # also on Ctrl-C or a failed read: nothing stays pinned
                self._cache.release(self._layer, cached)
            parts.extend(out)
        y = mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return y[mx.array(inverse)].reshape(*lead, k, self._hidden)


def stream_experts(model, cache: ExpertCache, low_bit: LowBitCopy | None = None) -> None:
    """Replace every layer's resident experts by streamed ones (before any expert weight is loaded);
    with `low_bit`, some misses read its low-bit copy instead (`low_bit`)."""
    layers = model.layers
    top_k = model.config.num_experts_per_tok
    for i, layer in enumerate(layers):
        moe = layer.block_sparse_moe
        nxt = layers[i + 1].block_sparse_moe.gate if i + 1 < len(layers) else None
        moe.replace_experts(StreamedSwitchGLU(i, moe.switch_mlp, cache, nxt, top_k, moe.gate, low_bit))
    cache.low_bit = low_bit
    model.runtime.expert_cache = cache
    model.runtime.routing_log = cache.log
