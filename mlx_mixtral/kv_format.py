"""How a KV cache stores keys and values, and how attention reads them back.

Two formats, one interface (`encode` a new chunk into parts, `attend` over the parts held):
- `FloatKV`: keys and values as computed (one part each), attended with MLX's fused kernel.
- `QuantizedKV`: each head vector quantized in groups (three parts: packed ints, scales, biases),
  as llama.cpp and mlx-lm do. Attention multiplies the queries straight into the packed keys and
  the probabilities into the packed values (`mx.quantized_matmul`), so no float copy of the whole
  cache is made each step: 8 bits take 53% of a float16 cache's bytes and 4 bits 28% (group 64).

On the CPU backend each kernel runs on one thread, so attention is split by key/value head over
the CPU streams (`device.in_parallel`): every query head reads only its own group's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .device import in_parallel, parallel_ways, spans
from .errors import MixtralError

KV_BITS = (4, 8)  # what --kv-bits offers: the widths whose quality benchmarks/RESULTS.md measures
KV_GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts
DEFAULT_KV_GROUP_SIZE = 64

Parts = tuple[mx.array, ...]


def _by_kv_heads(q: mx.array, keys: Parts, values: Parts, attend_heads) -> mx.array:
    """`attend_heads(q_part, keys_part, values_part)` over spans of key/value heads, side by side."""
    n_kv = keys[0].shape[1]
    rep = q.shape[1] // n_kv
    if n_kv == 1 or parallel_ways() == 1:
        return attend_heads(q, keys, values)
    return in_parallel([
        lambda a=a, b=b: attend_heads(q[:, a * rep:b * rep], tuple(k[:, a:b] for k in keys),
                                      tuple(v[:, a:b] for v in values))
        for a, b in spans(n_kv, parallel_ways())], axis=1)


class FloatKV:
    """Keys and values kept in the dtype they are computed in."""

    bits: int | None = None
    group_size: int | None = None

    def check(self, head_dim: int) -> None:
        """Any head size can be stored as computed."""

    def encode(self, x: mx.array) -> Parts:
        return (x,)

    def attend(self, q: mx.array, keys: Parts, values: Parts, scale: float, mask: Any) -> mx.array:
        return _by_kv_heads(q, keys, values, lambda q, k, v: mx.fast.scaled_dot_product_attention(
            q, k[0], v[0], scale=scale, mask=mask))

    def bytes_per_position(self, heads: int, head_dim: int, itemsize: int) -> int:
        return 2 * heads * head_dim * itemsize

    def describe(self) -> str:
        return "float"


@dataclass(frozen=True)
class QuantizedKV:
    """Keys and values quantized to `bits` in groups of `group_size` along each head vector."""

    bits: int
    group_size: int = DEFAULT_KV_GROUP_SIZE

    def __post_init__(self) -> None:
        """Refuse, in one line, a width or group size MLX cannot quantize to."""
        if self.bits not in KV_BITS:
            raise MixtralError(f"--kv-bits must be one of {', '.join(map(str, KV_BITS))}, not {self.bits}")
        if self.group_size not in KV_GROUP_SIZES:
            raise MixtralError(f"--kv-group-size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, "
                               f"not {self.group_size}")

    def check(self, head_dim: int) -> None:
        """Refuse, in one line, a group size this model's heads cannot take."""
        if head_dim % self.group_size:
            fits = [g for g in KV_GROUP_SIZES if head_dim % g == 0]
            hint = (f"use --kv-group-size {fits[-1]}" if fits else
                    f"its heads are too small to quantize (groups hold {KV_GROUP_SIZES[0]} or more values); "
                    "leave out --kv-bits")
            raise MixtralError(f"--kv-group-size {self.group_size} does not divide this model's head_dim "
                               f"{head_dim}: {hint}")

    def encode(self, x: mx.array) -> Parts:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def attend(self, q: mx.array, keys: Parts, values: Parts, scale: float, mask: Any) -> mx.array:
        B, n_q, L, D = q.shape
        T = keys[0].shape[2]
        if isinstance(mask, str):  # "causal": the L queries are the last L of the T positions
            mask = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]

        def heads(q: mx.array, k: Parts, v: Parts) -> mx.array:
            n_kv = k[0].shape[1]
            rep = q.shape[1] // n_kv
            # [B, kv, rep, L, D] against [B, kv, 1, T, D]: each query group meets its own keys.
            qg = (q * scale).reshape(B, n_kv, rep, L, D)
            k = tuple(mx.expand_dims(p, 2) for p in k)
            v = tuple(mx.expand_dims(p, 2) for p in v)
            scores = mx.quantized_matmul(qg, *k, transpose=True, group_size=self.group_size, bits=self.bits)
            if mask is not None:
                scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
            probs = mx.softmax(scores, axis=-1, precise=True)
            out = mx.quantized_matmul(probs, *v, transpose=False, group_size=self.group_size, bits=self.bits)
            return out.reshape(B, n_kv * rep, L, D)

        return _by_kv_heads(q, keys, values, heads)

    def bytes_per_position(self, heads: int, head_dim: int, itemsize: int) -> int:
        packed = head_dim * self.bits // 8
        scales_and_biases = 2 * (head_dim // self.group_size) * itemsize
        return 2 * heads * (packed + scales_and_biases)

    def describe(self) -> str:
        return f"{self.bits}-bit (groups of {self.group_size})"


KVFormat = FloatKV | QuantizedKV
FLOAT = FloatKV()


def kv_format(bits: int | None, group_size: int | None = None, head_dim: int | None = None) -> KVFormat:
    """The format `--kv-bits`/`--kv-group-size` ask for (float when `bits` is None), checked
    against `head_dim` when given."""
    if bits is None:
        if group_size is not None:
            raise MixtralError("--kv-group-size needs --kv-bits (the float cache has no groups)")
        return FLOAT
    fmt = QuantizedKV(bits, group_size or DEFAULT_KV_GROUP_SIZE)
    if head_dim is not None:
        fmt.check(head_dim)
    return fmt
