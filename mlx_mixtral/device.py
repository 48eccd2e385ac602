"""The little that differs between devices, kept in one place.

On Apple silicon, macOS may page out ("unwire") GPU buffers that have not been touched for a
while; for a model that fills most of unified memory that turns each token into a disk read. While
generating we raise MLX's wired-memory limit to what Metal recommends and restore it afterwards.
Everywhere else (no Metal: Linux CPU, CUDA) this is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx


def metal_available() -> bool:
    return bool(getattr(mx, "metal", None)) and mx.metal.is_available()


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
