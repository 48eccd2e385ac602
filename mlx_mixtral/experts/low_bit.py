"""A low-bit copy of the experts, read instead of the full one on some misses (opt-in).

Reading fewer bytes per miss is where the published gains on this problem come from (HOBBIT's
mixed-precision expert offloading; Eliseev & Mazur's 2-3-bit experts): the converter can write a
second copy of every expert at 2 or 3 bits (`python -m convert ... --miss-bits 2`) into
`miss-2bit/` beside the model's own files (mlx-lm and our loader never look there). With
`--max-memory` and `--miss-bits 2`, an expert that is not in memory, and that the tokens asking
for it weight below `threshold` (their router's top-k weight, the largest over a prompt chunk's
tokens), is read from that copy instead: about half the bytes at 2 bits, a third less at 3. The
low-bit expert is used for that request and not cached, so the budget still holds the full
experts the model keeps coming back to. Threshold 0.5 with top-2 routing is "a token's second
choice"; 1.0 is "every miss". Without `--miss-bits` nothing changes: the output is bitwise the
resident model's.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..errors import MixtralError
from .expert_store import ExpertStore

MISS_BITS = (2, 3)
MISS_FILE = "miss.json"  # {"bits", "group_size", "mode"}: written last, so a folder with it is whole
# The rule our measurements chose (benchmarks/RESULTS.md, "A low-bit copy on a miss").
DEFAULT_THRESHOLD = 0.5


def miss_folder(folder: str | Path, bits: int) -> Path:
    return Path(folder) / f"miss-{bits}bit"


@dataclass
class LowBitCopy:
    """The low-bit experts of one model and the rule for when to read them."""

    store: ExpertStore
    quantization: tuple[int, int, str]  # (group_size, bits, mode)
    threshold: float = DEFAULT_THRESHOLD
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="low-bit"))

    def read(self, layer: int, expert: int) -> Future:
        return self._pool.submit(self.store.read, layer, expert)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.store.close()


def open_low_bit(folder: str | Path, config: ModelConfig, bits: int, dtype: mx.Dtype | None = None,
                 threshold: float = DEFAULT_THRESHOLD) -> LowBitCopy:
    """The `bits` copy the converter wrote into `folder`, checked against the model's config."""
    if bits not in MISS_BITS:
        raise MixtralError(f"--miss-bits must be one of {', '.join(map(str, MISS_BITS))}, got {bits}")
    if not 0 < threshold <= 1:
        raise MixtralError(f"the low-bit threshold must be in (0, 1], got {threshold}")
    where = miss_folder(folder, bits)
    meta = where / MISS_FILE
    if not meta.is_file():
        raise MixtralError(f"{folder} has no {bits}-bit copy of its experts ({where.name}/): convert it with "
                           f"`python -m convert ... -q --miss-bits {bits}`, or leave out --miss-bits")
    try:
        spec = json.loads(meta.read_text())
        quantization = (int(spec["group_size"]), int(spec["bits"]), str(spec.get("mode", "affine")))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MixtralError(f"{meta}: not a valid low-bit description ({e}); convert the model again") from None
    store = ExpertStore(Checkpoint(where), config, dtype)
    return LowBitCopy(store, quantization, threshold)
