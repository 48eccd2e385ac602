"""Tensor parallelism over MLX's own `mx.distributed`: N processes (Macs), 1/N of every layer each.

Started by `mlx.launch` (ring over TCP or Thunderbolt, JACCL, MPI), every rank runs the same
command; `mx.distributed.init()` tells it its rank. Each rank holds

* attention: a contiguous block of query heads, with the key/value heads their GQA groups use
  (split when the KV heads divide by N; when N divides by them, e.g. MQA, each rank keeps its
  one group's KV head, replicated), and the matching input columns of o_proj;
* every expert, cut along its intermediate dimension: gate/up rows, down columns. Every rank
  works on every token, so routing never leaves a rank idle;
* router, norms, embeddings and lm_head whole (replicated: the router must agree everywhere,
  and the rest is small next to the experts).

The two halves of each block meet in one `all_sum` each: attention's output, then the MoE's
(after the router's weighting, so one hidden-sized vector per token crosses the link, not k).
Each rank reads only its own slices of the safetensors files, by offset (`np.memmap`: only the
pages of its slices are touched), so memory per rank is ~1/N of the weights. Quantized folders
split on quantization-group boundaries, or the split is refused in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import numpy as np

from ..checkpoint import HF_EXPERT_NAMES, SAFETENSORS_DTYPES, Checkpoint, TensorBytes, memory_dtype, tensor_from_bytes
from ..config import ModelConfig
from ..errors import MixtralError


@dataclass(frozen=True)
class Split:
    """What rank `rank` of `size` holds: query heads [q0, q1), KV heads [k0, k1), intermediate [i0, i1)."""

    rank: int
    size: int
    q0: int
    q1: int
    k0: int
    k1: int
    i0: int
    i1: int

    @classmethod
    def plan(cls, config: ModelConfig, rank: int, size: int) -> Split:
        """The split of `config` over `size` ranks, or a one-line error saying why there is none."""
        H, KV, inter = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
        if H % size:
            raise MixtralError(f"cannot split {H} attention heads over {size} processes: use a process count "
                               f"that divides {H}")
        if KV % size and size % KV:
            raise MixtralError(f"cannot split {KV} key/value heads over {size} processes (GQA groups must stay "
                               f"whole): use a process count that divides {KV}, or a multiple of it")
        if inter % size:
            raise MixtralError(f"cannot split the experts' intermediate size {inter} over {size} processes: use a "
                               f"process count that divides {inter}")
        per_group = H // KV  # query heads per KV head
        q0, q1 = rank * H // size, (rank + 1) * H // size
        k0, k1 = q0 // per_group, (q1 - 1) // per_group + 1
        i0, i1 = rank * inter // size, (rank + 1) * inter // size
        return cls(rank, size, q0, q1, k0, k1, i0, i1)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The config of this rank's slice: its heads and intermediate width, the rest the same."""
        return replace(config, num_attention_heads=self.q1 - self.q0, num_key_value_heads=self.k1 - self.k0,
                       intermediate_size=self.i1 - self.i0)

    def slices(self, name: str, config: ModelConfig) -> tuple[int, int, int] | None:
        """(axis, start, stop) in unquantized elements of MLX-layout tensor `name` that this rank
        keeps, or None to keep it whole."""
        D = config.head_dim
        if ".self_attn." in name:
            if ".q_proj." in name:
                return 0, self.q0 * D, self.q1 * D
            if ".k_proj." in name or ".v_proj." in name:
                return 0, self.k0 * D, self.k1 * D
            if ".o_proj." in name:
                return -1, self.q0 * D, self.q1 * D
        if ".block_sparse_moe.switch_mlp." in name:
            if ".down_proj." in name:
                return -1, self.i0, self.i1
            return -2, self.i0, self.i1  # gate/up: [experts, intermediate, hidden]
        return None


def all_sum_over(group: Any) -> Callable[[mx.array], mx.array]:
    """`DecoderLayer.combine` under tensor parallelism: each process computed its share of a
    sublayer's output (its heads, its slice of every expert); the sum over processes completes it."""
    def combine(y: mx.array) -> mx.array:
        return mx.distributed.all_sum(y, group=group)
    return combine


def _read(where: TensorBytes, axis: int | None, start: int, stop: int, unpacked: int) -> np.ndarray:
    """Elements [start, stop) along `axis` (counted in unpacked elements: a packed or grouped
    axis holds `where.shape[axis]` of `unpacked`) of a tensor, read through a memory map."""
    np_dtype = SAFETENSORS_DTYPES[where.dtype][0]
    a = np.memmap(where.file, dtype=np_dtype, mode="r", offset=where.offset, shape=where.shape)
    if axis is None:
        return np.array(a)
    width = where.shape[axis]  # load_sharded checked that the cut falls between groups and words
    index = [slice(None)] * a.ndim
    index[axis] = slice(start * width // unpacked, stop * width // unpacked)
    return np.ascontiguousarray(a[tuple(index)])


def unpacked_width(name: str, axis: int, config: ModelConfig) -> int:
    """How many values the full tensor `name` holds along `axis` before packing or grouping."""
    D = config.head_dim
    if axis == 0 or axis == -2:  # output rows: never packed
        return {"q_proj": config.num_attention_heads * D, "k_proj": config.num_key_value_heads * D,
                "v_proj": config.num_key_value_heads * D}.get(name.split(".")[-2], config.intermediate_size)
    return config.num_attention_heads * D if ".o_proj." in name else config.intermediate_size


def read_tensor(ckpt: Checkpoint, name: str, config: ModelConfig, axis: int | None, a: int, b: int,
                dtype: mx.Dtype | None, unpacked: int | None = None) -> mx.array:
    """Tensor `name` (MLX layout), or its slice, read by offset; Hugging Face experts are stacked."""
    if unpacked is None:  # how many values `axis` holds unpacked (given for an axis the split does not cut)
        unpacked = unpacked_width(name, axis, config) if axis is not None else 1
    head, sep, tail = name.partition(".block_sparse_moe.switch_mlp.")
    proj, _, part = tail.partition(".")
    per_expert = f"{head}.block_sparse_moe.experts.{{}}.{HF_EXPERT_NAMES.get(proj)}.{part}"  # Hugging Face layout
    if sep and per_expert.format(0) in ckpt.origin:
        sources = [ckpt.byte_range(per_expert.format(e)) for e in range(config.num_local_experts)]
        # Each expert's tensor is one stacked row: the same (negative) axis, one dimension fewer.
        raw, stored = np.stack([_read(w, axis, a, b, unpacked) for w in sources]), sources[0].dtype
    else:
        where = ckpt.byte_range(name)
        raw, stored = _read(where, axis, a, b, unpacked), where.dtype
    return tensor_from_bytes(memoryview(raw).cast("B"), stored, memory_dtype(stored, dtype), raw.shape)
