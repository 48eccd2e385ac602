"""How much memory a model may use (`--max-memory`), and what that leaves for experts.

A budget covers the weights: what must stay resident (attention, norms, routers, embeddings,
lm_head: ~1 GB of Mixtral-8x7B at 4 bits), the read buffers, and as many experts as fit in the
rest. The KV cache and activations come on top (they grow with the context, not the model).
`auto` asks the machine: on a Mac, Metal's recommended working set (what the GPU may wire);
elsewhere, the RAM available now; minus the KV cache of the context and a margin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..checkpoint import BUFFERS, Checkpoint, is_expert_tensor, memory_dtype
from ..config import ModelConfig
from ..device import compute_dtype, metal_available
from ..errors import MixtralError
from ..kv_format import FLOAT, KVFormat
from ..units import gb, parse_size  # noqa: F401 (budget's sizes are the package's)

AUTO = "auto"
MARGIN_FRACTION = 0.05  # of the machine's memory, kept free for activations and the allocator
MARGIN_BYTES = 512 * 10**6


def machine_memory() -> tuple[int, str]:
    """Bytes the model may occupy on this machine, and where the figure comes from."""
    if metal_available():
        return mx.device_info()["max_recommended_working_set_size"], "Metal's recommended working set"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical RAM"


def kv_cache_bytes(config: ModelConfig, positions: int, itemsize: int | None = None,
                   fmt: KVFormat = FLOAT) -> int:
    """Keys and values of every layer for `positions` positions, stored in `fmt` (default
    itemsize, of floats or of quantization scales: what a half-precision checkpoint computes in here)."""
    itemsize = itemsize or compute_dtype(mx.float16).size
    per_position = fmt.bytes_per_position(config.num_key_value_heads, config.head_dim, itemsize)
    return config.num_hidden_layers * per_position * positions


def auto_budget(config: ModelConfig, context: int | None = None, fmt: KVFormat = FLOAT) -> tuple[int, str]:
    """The budget `--max-memory auto` picks, and how it was reached (one phrase)."""
    have, source = machine_memory()
    tokens = min(context or config.max_position_embeddings, config.max_position_embeddings)
    kv = kv_cache_bytes(config, tokens, fmt=fmt)
    margin = int(have * MARGIN_FRACTION) + MARGIN_BYTES
    budget = have - kv - margin
    how = (f"{gb(have)} {source} - {gb(kv)} KV cache for {tokens} tokens - {gb(margin)} margin")
    return budget, how


def weight_bytes(ckpt: Checkpoint, config: ModelConfig, dtype: mx.Dtype | None = None,
                 experts: bool | None = None) -> int:
    """Bytes the weights take in memory (floats in the compute dtype), from the headers alone.
    `experts`: True counts only expert tensors, False only the others, None all."""
    total = 0
    for header in ckpt.headers.values():
        for name, t in header.items():
            if name.endswith(BUFFERS) or (config.tie_word_embeddings and name == "lm_head.weight"):
                continue
            if experts is not None and is_expert_tensor(name) != experts:
                continue
            total += int(np.prod(t["shape"], dtype=np.int64)) * memory_dtype(t["dtype"], dtype).size
    return total


@dataclass
class Plan:
    """What a budget buys: bytes for cached experts, and what the user should be told."""

    budget: int
    resident: int  # weights that never leave memory
    staging: int  # read buffers
    expert_bytes: int  # one expert
    cache_bytes: int
    total_experts: int
    notes: list[str]

    @property
    def cached_experts(self) -> int:
        return min(self.cache_bytes // self.expert_bytes, self.total_experts)


def plan(budget: int, resident: int, staging: int, expert_bytes: int, config: ModelConfig,
         label: str) -> Plan:
    """Check that `budget` holds what must stay resident plus one token's experts; say what it buys."""
    k = config.num_experts_per_tok
    minimum = resident + staging + k * expert_bytes
    if budget < minimum:
        raise MixtralError(
            f"--max-memory {label} is below the minimum for this model: {gb(minimum)} "
            f"({gb(resident)} resident: attention, routers, norms, embeddings, lm_head; "
            f"{gb(k * expert_bytes)} for {k} experts; {gb(staging)} read buffers)"
        )
    total = config.num_hidden_layers * config.num_local_experts
    p = Plan(budget, resident, staging, expert_bytes, budget - resident - staging, total, [])
    if metal_available():
        limit = mx.device_info()["max_recommended_working_set_size"]
        if budget > limit:
            p.notes.append(f"--max-memory {label} exceeds Metal's recommended working set ({gb(limit)}): "
                           "macOS may page GPU memory out; choose at most that, or --max-memory auto")
    return p
