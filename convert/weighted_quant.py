"""Importance-weighted affine quantization: the same format as `mx.quantize`, better groups.

MLX's affine format stores each group of `group_size` input weights as `bits`-bit codes q with a
scale s and bias z (w ≈ s·q + z); `mx.quantize` takes s and z from the group's min and max
(round-to-nearest, RTN). Here they are chosen to minimise the error weighted by how much each
input channel carries, Σ_j a_j (w_j − s·q_j − z)², where a_j is the mean square of the
calibration activations entering channel j (`calibration`): a channel that carries ten times the
signal counts ten times in the output's error. The search follows llama.cpp's k-quants with an
importance matrix (`make_qkx2_quants`): several candidate scales up to RTN's, each followed by
the closed-form weighted least-squares refit of (s, z) for the codes it gave, keeping per group
whichever has the least weighted error (RTN's own (s, z) is among the candidates, so no group
is ever worse than RTN by this measure). With equal importances it is a plain MSE search.

The codes are packed exactly as `mx.quantize` packs them (a little-endian bit stream in uint32
words, checked against it in the tests), so MLX's kernels, our loader and mlx-lm read the output
unchanged and decoding costs nothing more.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

# Candidate scales: (levels + RMIN + RDELTA·i) / range for i in 0..NSTEP, from one level coarser
# than round-to-nearest up to its own. llama.cpp also tries finer ones, which clip a group's
# extremes before the refit; on our trained yardstick at 2 bits those raised the KL against float
# by 40% (0.0125 without them, 0.0180 with, round-to-nearest 0.0178; benchmarks/RESULTS.md).
RMIN, RDELTA, NSTEP = -1.0, 0.1, 10


def weighted_quantize(w: mx.array, importance: mx.array, group_size: int, bits: int,
                      dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
    """`w` [..., out, in] quantized along `in` in groups, weighted by `importance` (broadcastable
    to [..., 1, in]: one weight per input channel, > 0). Returns (packed codes, scales, biases)
    as `mx.quantize(w, group_size, bits)` shapes them, scales and biases in `dtype`. Stacked
    experts are searched one at a time, so the search's temporaries (a few float32 copies) are
    those of one matrix, not of the whole stack."""
    if w.ndim > 2:
        parts = [weighted_quantize(w[i], importance[i] if importance.ndim == w.ndim else importance, group_size,
                                   bits, dtype) for i in range(w.shape[0])]
        return tuple(mx.stack([p[k] for p in parts]) for k in range(3))
    *lead, rows, cols = w.shape
    groups = cols // group_size
    x = w.astype(mx.float32).reshape(*lead, rows, groups, group_size)
    a = mx.broadcast_to(importance.astype(mx.float32), (*lead, 1, cols)).reshape(*lead, 1, groups, group_size)
    levels = 2**bits - 1
    low = x.min(axis=-1, keepdims=True)
    span = x.max(axis=-1, keepdims=True) - low
    safe = mx.where(span > 0, span, 1.0)
    best_s, best_z = span / levels, low  # round-to-nearest: the first candidate
    best_err = _error(x, a, *_codes_and_error_inputs(x, best_s, best_z, levels))
    for i in range(NSTEP + 1):
        q = mx.clip(mx.round((levels + RMIN + RDELTA * i) / safe * (x - low)), 0, levels)
        s, z = _refit(x, a, q)
        err = _error(x, a, q, s, z)
        better = err < best_err
        best_s, best_z, best_err = mx.where(better, s, best_s), mx.where(better, z, best_z), mx.minimum(err, best_err)
        mx.eval(best_s, best_z, best_err)  # one candidate's temporaries at a time
    scales, biases = best_s.astype(dtype), best_z.astype(dtype)
    q, *_ = _codes_and_error_inputs(x, scales.astype(mx.float32), biases.astype(mx.float32), levels)
    codes = np.array(q.astype(mx.uint8)).reshape(*lead, rows, cols)
    return mx.array(pack(codes, bits)), scales.squeeze(-1), biases.squeeze(-1)


def _codes_and_error_inputs(x: mx.array, s: mx.array, z: mx.array, levels: int) -> tuple[mx.array, mx.array, mx.array]:
    """The codes (s, z) give `x` (a zero scale: every code 0, the group is its bias), with s and z."""
    q = mx.where(s != 0, mx.clip(mx.round((x - z) / mx.where(s != 0, s, 1.0)), 0, levels), 0.0)
    return q, s, z


def _refit(x: mx.array, a: mx.array, q: mx.array) -> tuple[mx.array, mx.array]:
    """The (s, z) minimising Σ a (x − s·q − z)² for fixed codes q (weighted linear regression)."""
    sa = a.sum(axis=-1, keepdims=True)
    sq, sx = (a * q).sum(axis=-1, keepdims=True), (a * x).sum(axis=-1, keepdims=True)
    sqq, sqx = (a * q * q).sum(axis=-1, keepdims=True), (a * q * x).sum(axis=-1, keepdims=True)
    det = sa * sqq - sq * sq
    ok = det > 1e-12 * sa * sqq
    safe = mx.where(ok, det, 1.0)
    s = mx.where(ok, (sa * sqx - sq * sx) / safe, 0.0)
    z = mx.where(ok, (sqq * sx - sq * sqx) / safe, sx / sa)
    return s, z


def _error(x: mx.array, a: mx.array, q: mx.array, s: mx.array, z: mx.array) -> mx.array:
    return (a * mx.square(x - s * q - z)).sum(axis=-1, keepdims=True)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [..., n] (each < 2**bits) as MLX packs them: a little-endian bit stream, uint32 words."""
    unpacked = np.unpackbits(codes.astype(np.uint8)[..., None], axis=-1, count=bits, bitorder="little")
    stream = np.packbits(unpacked.reshape(*codes.shape[:-1], -1), axis=-1, bitorder="little")
    return np.ascontiguousarray(stream).view("<u4")


def weighted_error(w: mx.array, wq: mx.array, scales: mx.array, biases: mx.array, importance: mx.array,
                   group_size: int, bits: int) -> float:
    """Σ_j a_j (w_j − ŵ_j)² over the whole matrix: the measure the search minimises."""
    restored = mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits)
    return float((importance.astype(mx.float32) * mx.square(w.astype(mx.float32) - restored)).sum())
