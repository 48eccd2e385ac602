"""Where each expert's weights lie in a checkpoint's files, and reading one expert into memory.

Any folder we load works as it is, with no re-conversion: in mlx-lm's layout (ours, `mlx_lm
convert`'s, mlx-community's) a projection's experts are stacked `[experts, out, in]` and the
expert axis is the outermost, so expert e's rows (and those of its scales and biases) are one
contiguous byte range, the e-th of `experts` equal parts of the tensor; in Hugging Face's layout
each expert's `w1/w2/w3` is a tensor of its own. Either way an expert is a few ranges read by
offset (`uncached_io`), never the whole file.

An expert is handed out as `{"gate_proj.weight": [1, out, in], ...}`: a one-expert stack, so the
very kernels of the resident model (`gather_qmm` / `gather_mm`) run on it, with the same result.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..checkpoint import (
    HF_EXPERT_NAMES,
    PROJECTIONS,
    SAFETENSORS_DTYPES,
    TENSOR_PARTS,
    Checkpoint,
    TensorBytes,
    memory_dtype,
    tensor_from_bytes,
)
from ..config import ModelConfig
from ..errors import MixtralError
from .uncached_io import UncachedFile


@dataclass(frozen=True)
class _Slice:
    """One tensor of one expert: `key` ("gate_proj.weight"), where its bytes are, what they hold."""

    key: str
    where: TensorBytes  # shape without the expert axis
    target: mx.Dtype  # dtype in memory


class ExpertStore:
    """Every expert of every layer, by byte range; `read(layer, expert)` loads one."""

    def __init__(self, ckpt: Checkpoint, config: ModelConfig, dtype: mx.Dtype | None = None,
                 readers: int = 4):
        self.num_layers = config.num_hidden_layers
        self.num_experts = config.num_local_experts
        self._slices: dict[tuple[int, int], list[_Slice]] = {}
        names = {name for header in ckpt.headers.values() for name in header}
        for layer in range(self.num_layers):
            for expert in range(self.num_experts):
                self._slices[layer, expert] = [
                    self._slice(ckpt, names, layer, expert, proj, part, dtype)
                    for proj in PROJECTIONS for part in TENSOR_PARTS
                    if self._source(names, layer, expert, proj, part) is not None
                ]
        files = {s.where.file for slices in self._slices.values() for s in slices}
        self._files = {f: UncachedFile(f) for f in sorted(files)}
        # An expert's slices (3 large weights, 6 small scales/biases) are read side by side: a
        # decode step asks for only k experts per layer, too few to keep the disk's queue full.
        self._slice_pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="slice-reader")
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.read_seconds = 0.0  # summed over reading threads

    @staticmethod
    def _source(names: set[str], layer: int, expert: int, proj: str, part: str) -> tuple[str, bool] | None:
        """(tensor name, whether it is stacked over experts), or None if this part does not exist."""
        moe = f"model.layers.{layer}.block_sparse_moe."
        stacked = f"{moe}switch_mlp.{proj}.{part}"
        if stacked in names:
            return stacked, True
        single = f"{moe}experts.{expert}.{HF_EXPERT_NAMES[proj]}.{part}"
        return (single, False) if single in names else None

    def _slice(self, ckpt: Checkpoint, names: set[str], layer: int, expert: int, proj: str, part: str,
               dtype: mx.Dtype | None) -> _Slice:
        name, stacked = self._source(names, layer, expert, proj, part)
        t = ckpt.byte_range(name)
        if t.dtype not in SAFETENSORS_DTYPES:
            raise MixtralError(f"{t.file}: tensor {name} has dtype {t.dtype}, which cannot be streamed")
        if stacked:
            size = t.nbytes // self.num_experts
            t = TensorBytes(t.file, t.offset + expert * size, size, t.dtype, t.shape[1:])
        return _Slice(f"{proj}.{part}", t, memory_dtype(t.dtype, dtype))

    def nbytes(self, layer: int, expert: int) -> int:
        """Bytes expert `expert` of `layer` takes in memory (after any widening to the compute dtype)."""
        return sum(int(np.prod(s.where.shape)) * s.target.size for s in self._slices[layer, expert])

    @property
    def max_expert_bytes(self) -> int:
        """The largest expert in memory (mixed recipes may size layers differently)."""
        return max(self.nbytes(layer, e) for layer, e in self._slices)

    def disk_bytes(self, layer: int, expert: int) -> int:
        return sum(s.where.nbytes for s in self._slices[layer, expert])

    @property
    def largest_read(self) -> int:
        return max(s.where.nbytes for slices in self._slices.values() for s in slices)

    def read(self, layer: int, expert: int) -> dict[str, mx.array]:
        """Expert `expert` of `layer`, as one-expert stacks `[1, ...]` in the compute dtype.

        Safe to call from several threads at once. Each array is evaluated on the thread that made
        it: an MLX operation left pending there (a dtype conversion) would belong to that thread's
        stream, which the model's thread cannot evaluate ("There is no Stream(cpu, N) in current
        thread").
        """
        start = time.perf_counter()
        slices = self._slices[layer, expert]
        arrays = list(self._slice_pool.map(lambda s: self._read_slice(s, layer, expert), slices))
        with self._lock:
            self.bytes_read += sum(s.where.nbytes for s in slices)
            self.read_seconds += time.perf_counter() - start
        return {s.key: a for s, a in zip(slices, arrays)}

    def _read_slice(self, s: _Slice, layer: int, expert: int) -> mx.array:
        t = s.where
        try:
            raw = self._files[t.file].read(t.offset, t.nbytes)
        except OSError as e:
            raise MixtralError(f"{t.file}: cannot read expert {expert} of layer {layer} ({e.strerror or e}); "
                               "download or convert the model again") from None
        array = tensor_from_bytes(raw, t.dtype, s.target, (1, *t.shape))
        mx.eval(array)
        return array

    def close(self) -> None:
        self._slice_pool.shutdown(wait=True)
        for f in self._files.values():
            f.close()

    @property
    def files(self) -> list[Path]:
        return list(self._files)
