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

import os
import select
import signal
import sys
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .checkpoint import Checkpoint, TensorBytes
from .config import ModelConfig
from .errors import MixtralError
from .expert_store import _HF_NAMES, SAFETENSORS_DTYPES, _to_mlx, memory_dtype


CONNECT_TIMEOUT = float(os.environ.get("MLX_MIXTRAL_CONNECT_TIMEOUT", "60"))  # seconds to find every peer
_group = None


def world() -> Any:
    """This process's group: size 1 unless started by `mlx.launch` (or another MLX launcher).

    Joining waits for every peer; one that never comes (a wrong host, a firewall, a process that
    died at start) ends this process with a one-line error after CONNECT_TIMEOUT, not a hang.
    """
    global _group
    if _group is None:
        launched = any(k in os.environ for k in ("MLX_HOSTFILE", "MLX_RANK", "OMPI_COMM_WORLD_RANK"))
        watcher = _watch_connect(CONNECT_TIMEOUT) if launched else None
        _group = mx.distributed.init()
        if watcher is not None:
            fd, pid = watcher
            os.write(fd, b"1")
            os.close(fd)
            os.waitpid(pid, 0)
        if _group.size() > 1:
            signal.signal(signal.SIGTERM, _terminated)
    return _group


def _watch_connect(timeout: float) -> tuple[int, int]:
    """A forked watcher that ends this process with a one-line error unless told, through a pipe,
    within `timeout` s that every peer connected. (MLX joins holding the GIL, so no Python thread
    or signal handler of ours could run meanwhile; the watcher only sleeps and writes.)"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        ready, _, _ = select.select([r], [], [], timeout)
        if not ready:
            os.write(2, (f"error: could not reach every process of this run within {timeout:.0f} s (check the "
                         "hosts, that each one started, and the network; MLX_MIXTRAL_CONNECT_TIMEOUT sets the "
                         "wait)\n").encode())
            os.kill(os.getppid(), signal.SIGKILL)
        os._exit(0)
    os.close(r)
    return w, pid


def _terminated(signum, frame) -> None:
    """mlx.launch stops the others when one process ends: say so, in one line."""
    print(f"error: process {_group.rank()} stopped: another process of this run ended (its error is above); "
          "any reply is incomplete", file=sys.stderr, flush=True)
    os._exit(1)


def single_process(what: str) -> None:
    """Refuse, in one line, a front door that cannot run split over processes."""
    if world().size() > 1:
        raise MixtralError(f"{what} runs in one process, not under mlx.launch; start it on its own")


def peer_lost(e: BaseException) -> bool:
    """Whether `e` is MLX's report of a peer that died or dropped off the network mid-run."""
    message = str(e)
    return isinstance(e, RuntimeError) and ("[ring]" in message or "peer" in message.lower())


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


class AllSum(nn.Module):
    """A block whose output is this rank's share of a sum: `all_sum` over the ranks completes it."""

    def __init__(self, block: nn.Module, group: Any):
        super().__init__()
        self.block = block
        self._group = group

    def __call__(self, *args: Any) -> mx.array:
        return mx.distributed.all_sum(self.block(*args), group=self._group)

    # Transparent otherwise: `layer.block_sparse_moe.switch_mlp` is the wrapped block's, for reading
    # and for replacing (the routing log installs its recorders there).
    def __getattr__(self, key: str) -> Any:
        try:
            return super().__getattr__(key)
        except AttributeError:
            block = self.get("block")
            if block is None:
                raise
            return getattr(block, key)

    def __setattr__(self, key: str, value: Any) -> None:
        if "block" not in self or key.startswith("_"):  # while constructing, and private state
            super().__setattr__(key, value)
        else:
            setattr(self["block"], key, value)


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
    per_expert = f"{head}.block_sparse_moe.experts.{{}}.{_HF_NAMES.get(proj)}.{part}"  # Hugging Face layout
    if sep and per_expert.format(0) in ckpt.origin:
        sources = [ckpt.byte_range(per_expert.format(e)) for e in range(config.num_local_experts)]
        # Each expert's tensor is one stacked row: the same (negative) axis, one dimension fewer.
        raw, stored = np.stack([_read(w, axis, a, b, unpacked) for w in sources]), sources[0].dtype
    else:
        where = ckpt.byte_range(name)
        raw, stored = _read(where, axis, a, b, unpacked), where.dtype
    return _to_mlx(memoryview(raw).cast("B"), stored, memory_dtype(stored, dtype), raw.shape)


def agreed_seed(model: Any, seed: int | None) -> int | None:
    """The sampling seed to use: `seed` as given for a model in one process; split over
    processes, one seed for all of them (`seed`, or rank 0's random pick), so that processes
    sampling the same logits pick the same tokens."""
    if getattr(model, "split", None) is None or seed is not None:
        return seed
    group = world()
    mine = int.from_bytes(os.urandom(4), "little") >> 1 if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array([mine], mx.int32), group=group).item())