"""How close generation runs to the memory-bandwidth roofline.

Decoding one token must read every weight the token uses at least once, so
`tokens/s <= bandwidth / bytes_per_token`. Conventions for the bytes one token reads:

- every attention projection, the router, both RMSNorms of every layer, the final norm, and the
  lm_head: read in full;
- the experts: `k / E` of each stacked `[E, out, in]` tensor (the k experts the token is routed to);
- the embedding: one row (`1 / vocab` of it), unless it is tied to the lm_head (then in full);
- quantized tensors at their stored size: packed codes plus one scale and one bias per group;
- plus the KV cache of the context so far (keys and values of every layer).

For Mixtral 8x7B that is 12.75B parameters per token (12.62B without the lm_head); at 4 bits with
groups of 64 and 2-byte scales and biases (mlx-lm's layout with float16/bfloat16 scales, which
also quantizes the router, embedding and lm_head) it is 0.5625 bytes per parameter: 7.17 GB.
These are counted from the model's actual arrays, so float32 scales (what the CPU backend computes
with) count 4 bytes each.
"""

from __future__ import annotations

import platform
import subprocess
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_mixtral.config import ModelConfig
from mlx_mixtral.experts.budget import kv_cache_bytes  # noqa: F401 (part of this module's interface)
from mlx_mixtral.model import Mixtral

# Unified-memory bandwidth in GB/s (Apple's published figures), for the chip name in
# `sysctl machdep.cpu.brand_string`. Longest names first so "M2 Max" wins over "M2".
CHIP_BANDWIDTH_GBS: dict[str, float] = {
    "M1 Ultra": 800, "M1 Max": 400, "M1 Pro": 200, "M1": 68.25,
    "M2 Ultra": 800, "M2 Max": 400, "M2 Pro": 200, "M2": 100,
    "M3 Ultra": 819, "M3 Max": 400, "M3 Pro": 150, "M3": 100,
    "M4 Max": 546, "M4 Pro": 273, "M4": 120,
    "M5": 153,
}


def parameter_count_per_token(model: nn.Module, config: ModelConfig) -> float:
    """Parameters one token reads (unquantized count: packed codes are unpacked).

    `model` is any module tree with Mixtral's parameter names (ours or mlx-lm's).
    """
    return _per_token(model, config, lambda path, a: _logical_size(model, path, a))


def weight_bytes_per_token(model: nn.Module, config: ModelConfig) -> float:
    """Bytes of weights one token reads, at their stored dtypes (see the module docstring); a
    streamed model's experts count as k cached experts per layer."""
    total = _per_token(model, config, lambda path, a: a.nbytes)
    cache = model.runtime.expert_cache if isinstance(model, Mixtral) else None
    if cache is not None:
        total += config.num_hidden_layers * config.num_experts_per_tok * cache.expert_bytes
    return total


def _per_token(model: nn.Module, c: ModelConfig, size) -> float:
    total = 0.0
    for path, a in tree_flatten(model.parameters()):
        if ".switch_mlp." in path:
            share = c.num_experts_per_tok / c.num_local_experts
        elif path.startswith("model.embed_tokens.") and not c.tie_word_embeddings:
            share = 1 / c.vocab_size
        else:
            share = 1.0
        total += share * size(path, a)
    return total


def _logical_size(model: nn.Module, path: str, a: mx.array) -> int:
    """Parameter count of `path`: packed uint32 codes hold 32 / bits each; scales/biases count 0."""
    if path.endswith((".scales", ".biases")):
        return 0
    if a.dtype == mx.uint32:
        module_path = path.rsplit(".", 1)[0]
        bits = dict(model.named_modules())[module_path].bits
        return a.size * 32 // bits
    return a.size


def chip_name() -> str | None:
    """The Apple chip ("Apple M2 Max"), or None off macOS or when sysctl is unavailable."""
    if platform.system() != "Darwin":
        return None
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def chip_bandwidth(name: str | None) -> float | None:
    """Published bandwidth (GB/s) of an Apple chip name, or None when not in the table."""
    if not name:
        return None
    for chip in sorted(CHIP_BANDWIDTH_GBS, key=len, reverse=True):
        if chip in name:
            return CHIP_BANDWIDTH_GBS[chip]
    return None


def measured_copy_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """GB/s of a large numpy copy (bytes read + bytes written), best of `repeats`.

    The reference where no published figure applies (Linux, unknown chips). numpy's memcpy
    streams at what the memory system delivers (~30 GB/s here); MLX's CPU kernels reach only a
    few GB/s on a plain copy, so they would make a poor ceiling.
    """
    a = np.ones(mb * (1 << 20) // 4, dtype=np.float32)
    b = np.zeros_like(a)  # touched, so page faults are not timed
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def reference_bandwidth() -> tuple[float, str]:
    """(GB/s, what it is): the chip's published bandwidth on a known Mac, else a measured copy."""
    name = chip_name()
    published = chip_bandwidth(name)
    if published:
        return published, f"{name} (published)"
    return measured_copy_bandwidth(), "measured numpy copy"
