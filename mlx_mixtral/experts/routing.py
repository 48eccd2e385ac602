"""Which experts the router chose: counts per layer and expert, for the `/experts` heatmap.

A streamed model (`streamed_moe`) learns every routing decision on the host anyway and adds it
here, with whether the expert was in memory. A resident model computes routing on the device
without a host round trip, so `watch(model)` wraps its experts in a recorder that keeps the
(lazy) index arrays and reads them back only when the log is looked at.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class RoutingLog:
    """Tokens routed to each (layer, expert), and, when streaming, the cache's hits and misses."""

    def __init__(self, layers: int, experts: int):
        self.usage = np.zeros((layers, experts), dtype=np.int64)
        self.hits = np.zeros((layers, experts), dtype=np.int64)  # per request, not per token
        self.misses = np.zeros((layers, experts), dtype=np.int64)
        self._pending: list[tuple[int, mx.array]] = []

    def add(self, layer: int, ids: np.ndarray) -> None:
        self.usage[layer] += np.bincount(ids.reshape(-1), minlength=self.usage.shape[1])

    def add_lazy(self, layer: int, indices: mx.array) -> None:
        self._pending.append((layer, indices))

    def flush(self) -> None:
        """Read back what a resident model recorded (its arrays were evaluated with the tokens)."""
        pending, self._pending = self._pending, []
        for layer, indices in pending:
            self.add(layer, np.array(indices))

    def reset(self) -> None:
        self._pending.clear()
        for a in (self.usage, self.hits, self.misses):
            a[:] = 0

    @property
    def streamed(self) -> bool:
        return bool(self.hits.sum() or self.misses.sum())


class _Recorder(nn.Module):
    """Wraps a layer's experts: the same call, with the routing kept for the log."""

    def __init__(self, inner: nn.Module, layer: int, log: RoutingLog):
        super().__init__()
        self.inner = inner
        self._layer, self._log = layer, log

    def __call__(self, x: mx.array, indices: mx.array) -> Any:
        self._log.add_lazy(self._layer, indices)
        return self.inner(x, indices)


def log_of(model) -> RoutingLog:
    """The model's routing log, installing recorders on a resident model the first time."""
    log = model.runtime.routing_log
    if log is None:
        config = model.config
        log = RoutingLog(config.num_hidden_layers, config.num_local_experts)
        for i, layer in enumerate(model.layers):
            moe = layer.block_sparse_moe
            moe.replace_experts(_Recorder(moe.switch_mlp, i, log))
        model.runtime.routing_log = log
    log.flush()
    return log
