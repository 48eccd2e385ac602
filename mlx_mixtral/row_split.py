"""The CPU row split: the model's linear layers and experts computed in parallel parts.

MLX's CPU backend runs each kernel on one thread, so on a multi-core CPU a linear layer's output
features are cut into row blocks computed side by side on CPU streams (`device.in_parallel`),
each from a contiguous row block of the weight (and of the scales and biases: all are row-major
in the output feature), a view, not a copy; the experts' independent (token, expert) pairs are cut
the same way. The results are bitwise those of one call. On a GPU there is one part and these
classes behave exactly as MLX's own.

`loading.build_model` builds the model from `CPU_PARTS` (see `model.Parts`), so `model.py`
keeps only the mathematics.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from .device import in_parallel, parallel_ways, spans
from .model import Parts, SwitchGLU


class _RowSplit:
    """Mixed into MLX's linear layers: the output features in `parallel_ways()` row blocks."""

    def __call__(self, x: mx.array) -> mx.array:
        ways = parallel_ways()
        if ways == 1 or "bias" in self:  # our projections are bias-free
            return super().__call__(x)
        return in_parallel([lambda a=a, b=b: self._rows(x, a, b)
                            for a, b in spans(self["weight"].shape[0], ways)], axis=-1)


class RowSplitLinear(_RowSplit, nn.Linear):
    def _rows(self, x: mx.array, a: int, b: int) -> mx.array:
        return x @ self["weight"][a:b].T

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False) -> nn.Module:
        """Called by `nn.quantize`: the quantized layer keeps the split."""
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return RowSplitQuantizedLinear.from_linear(self, group_size, bits, mode)


class RowSplitQuantizedLinear(_RowSplit, nn.QuantizedLinear):
    def _rows(self, x: mx.array, a: int, b: int) -> mx.array:
        biases = self.get("biases")
        return mx.quantized_matmul(
            x, self["weight"][a:b], self["scales"][a:b], None if biases is None else biases[a:b],
            transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode)


class RowSplitSwitchGLU(SwitchGLU):
    """The experts, their (token, expert) pairs cut into one part per core."""

    def pairs(self, run: Callable[[int, int], mx.array], n: int, axis: int) -> mx.array:
        return in_parallel([lambda a=a, b=b: run(a, b) for a, b in spans(n, parallel_ways())], axis=axis)


CPU_PARTS = Parts(linear=RowSplitLinear, experts=RowSplitSwitchGLU)
