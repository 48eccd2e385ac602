"""Which weights the converter quantizes, and to how many bits.

Experts and attention hold 99.4% of Mixtral's parameters, so they get the requested bits: that is
where the memory goes. Attention (2.9% of the parameters, but every token passes through all of
it) may take more bits than the experts (`attention_bits`), the recipe for 3-bit experts. Three
small kinds of weights have their own precision, because the bytes they would save are few and
the error they would add is not:

- the router gate (8 x 4096 per layer, 0.002% of the parameters) picks each token's experts; its
  error sends tokens to other experts, which no later layer can undo. Kept in float: that costs
  ~1 MB over 8-bit, and 4 bits were measured to multiply the output's KL divergence by 9;
- the embedding table and the lm_head (0.3% each) sit at both ends of the network, where an error
  reaches every token. 8 bits: as good as float within the measurement's noise, 120 MB smaller
  each; 4 bits were measured to multiply the KL by 9 (lm_head) and 20 (embeddings).

Figures: benchmarks/quant_quality.py, in benchmarks/RESULTS.md, "Quantization quality".

The result is written as mlx-lm's `quantization` block: the default `{group_size, bits, mode}`
plus one entry per module that differs (`{group_size, bits}`, or `false` for float), which both
mlx-lm and `mlx_mixtral.load` read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import mlx.nn as nn

from mlx_mixtral.errors import MixtralError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine quantization packs
SUPPORTED_GROUP_SIZES = (32, 64, 128)
MODE = "affine"
_LAYER = re.compile(r"layers\.\d+\.")

# Per-kind defaults: bits, or None for float (kept in --dtype).
DEFAULT_ROUTER_BITS: int | None = None
DEFAULT_EMBED_BITS: int | None = 8
DEFAULT_LM_HEAD_BITS: int | None = 8


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized."""

    bits: int
    group_size: int

    def to_config(self) -> dict[str, int]:
        return {"group_size": self.group_size, "bits": self.bits}


def module_kind(path: str) -> str:
    """"router", "embed", "lm_head", "attention" or "body" (the experts) for a module path."""
    if ".self_attn." in path:
        return "attention"
    if path.endswith("block_sparse_moe.gate"):
        return "router"
    if path.endswith("embed_tokens"):
        return "embed"
    if path == "lm_head":
        return "lm_head"
    return "body"


def quantizable_modules(model: nn.Module) -> dict[str, int]:
    """Path -> input width (the axis quantization groups run along) of every quantizable module."""
    return {path: m.weight.shape[-1] for path, m in model.named_modules() if hasattr(m, "to_quantized")}


def parse_precision(text: str, flag: str, allowed: tuple[int, ...] = SUPPORTED_BITS) -> int | None:
    """A precision flag's value: "float" -> None, else one of the `allowed` bit widths."""
    if text == "float":
        return None
    if text.isdigit() and int(text) in allowed:
        return int(text)
    raise MixtralError(f"{flag} {text}: expected {'|'.join(map(str, allowed))}|float")


@dataclass(frozen=True)
class QuantPolicy:
    """The requested bits for the body, and a precision (bits, or None = float) per small kind.

    `attention_bits` None means "as `bits`". Any supported width is accepted here so the
    benchmark can measure it; the CLI offers the router only 8 bits or float.
    """

    bits: int = 4
    group_size: int = 64
    router_bits: int | None = DEFAULT_ROUTER_BITS
    embed_bits: int | None = DEFAULT_EMBED_BITS
    lm_head_bits: int | None = DEFAULT_LM_HEAD_BITS
    attention_bits: int | None = None

    def __post_init__(self) -> None:
        """Refuse, in one line, what MLX cannot quantize."""
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise MixtralError(f"--q-group-size {self.group_size} is not supported; "
                               f"use one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
        for flag, bits in (("--q-bits", self.bits), ("--router-bits", self.router_bits),
                           ("--embed-bits", self.embed_bits), ("--lm-head-bits", self.lm_head_bits),
                           ("--attention-bits", self.attention_bits)):
            if bits is not None and bits not in SUPPORTED_BITS:
                raise MixtralError(f"{flag} {bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")

    @property
    def default(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size)

    def bits_for(self, path: str) -> int | None:
        kind = module_kind(path)
        if kind == "attention":
            return self.bits if self.attention_bits is None else self.attention_bits
        return {"router": self.router_bits, "embed": self.embed_bits,
                "lm_head": self.lm_head_bits}.get(kind, self.bits)

    def plan(self, in_dims: dict[str, int]) -> QuantPlan:
        """Decide every quantizable module (path -> input width) of a model."""
        specs: dict[str, QuantSpec | None] = {}
        misfits: dict[str, int] = {}
        for path, width in in_dims.items():
            bits = self.bits_for(path)
            if bits is not None and width % self.group_size:
                misfits[path] = width
                bits = None
            specs[path] = None if bits is None else QuantSpec(bits, self.group_size)
        return QuantPlan(self.default, specs, misfits)


@dataclass(frozen=True)
class QuantPlan:
    """Each module's QuantSpec (None: float), and those kept float only for their width."""

    default: QuantSpec
    specs: dict[str, QuantSpec | None]
    misfits: dict[str, int]

    def config(self) -> dict[str, Any]:
        """mlx-lm's `quantization` block: defaults, then every module that differs."""
        block: dict[str, Any] = {**self.default.to_config(), "mode": MODE}
        for path, spec in self.specs.items():
            if spec != self.default:
                block[path] = spec.to_config() if spec else False
        return block

    def misfit_message(self) -> str | None:
        """One line naming what stays float because its width does not split into groups."""
        if not self.misfits:
            return None
        kinds = dict.fromkeys(f"{_LAYER.sub('layers.*.', path)} (input width {width})"
                              for path, width in self.misfits.items())
        return (
            f"note: kept {len(self.misfits)} weights in float because their input width is not a "
            f"multiple of --q-group-size {self.default.group_size}: {', '.join(kinds)}"
        )

    def summary(self) -> str:
        """How the small kinds ended up, e.g. "router float, embeddings 8-bit, lm_head 8-bit", and
        attention when it differs from the default."""
        seen: dict[str, QuantSpec | None] = {}
        for path, spec in self.specs.items():
            seen.setdefault(module_kind(path), spec)
        if seen.get("attention", self.default) == self.default:
            seen.pop("attention", None)
        names = {"attention": "attention", "router": "router", "embed": "embeddings", "lm_head": "lm_head"}
        return ", ".join(f"{label} {f'{seen[kind].bits}-bit' if seen[kind] else 'float'}"
                         for kind, label in names.items() if kind in seen)
