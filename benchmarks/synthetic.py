"""Random-weight Mixtral models of real shapes, built in memory, so a machine can be measured
before anything is downloaded.

A model is first built as a *skeleton*: the real module tree whose arrays are lazy placeholders of
the final shapes and dtypes (nothing allocated). Its exact size is then known before a byte is
allocated, which is what the memory check needs; `fill_random` then materialises random values
one layer at a time. What is quantized follows `mlx_lm convert`'s defaults: every linear layer and
the embedding whose input width is a multiple of the group size (router and lm_head included).

Quantized weights are random bit patterns (every code equally likely) with scales and biases
chosen so each dequantized weight is centred with std ~ 1/sqrt(fan_in): generating a normal
float per parameter would take minutes for 8x7B, bits take seconds, and the kernels' speed does
not depend on the values.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_mixtral.config import ModelConfig
from mlx_mixtral.device import compute_dtype, in_parallel, parallel_ways, spans
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.experts.budget import machine_memory
from mlx_mixtral.loading import build_model
from mlx_mixtral.model import Mixtral

_BASE = dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768, num_local_experts=8,
             num_experts_per_tok=2)

SHAPES: dict[str, ModelConfig] = {
    "mixtral-8x7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                head_dim=128, **_BASE),
    "mixtral-8x22b": ModelConfig(vocab_size=32768, hidden_size=6144, intermediate_size=16384,
                                 num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8,
                                 head_dim=128, **{**_BASE, "max_position_embeddings": 65536}),
    "small": ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3584,
                         num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                         head_dim=64, **_BASE),
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        **{**_BASE, "max_position_embeddings": 4096}),
}

GROUP_SIZE = 64  # mlx-lm's default


def shape_config(name: str, bits: int, group_size: int = GROUP_SIZE) -> ModelConfig:
    """The config of a named shape; `bits` 16 means unquantized."""
    if name not in SHAPES:
        raise MixtralError(f"unknown synthetic shape {name!r}; choose from {', '.join(SHAPES)}")
    if bits not in (4, 8, 16):
        raise MixtralError(f"--bits must be 4, 8 or 16 (unquantized), got {bits}")
    quant = None if bits == 16 else {"group_size": group_size, "bits": bits, "mode": "affine"}
    return replace(SHAPES[name], quantization=quant)


class _SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DenseSwiGLU(nn.Module):
    """A dense SwiGLU feed-forward: the `--dense-baseline` stand-in for a Mixtral MoE block.

    Its intermediate width is `k * intermediate_size`, so it holds exactly the parameters one
    token reads from its k experts (minus the router) and MoE vs dense isolates the cost of
    routing. It is stored as k column blocks of `intermediate_size` (a SwiGLU is the sum of its
    column blocks), which run side by side on a multi-core CPU like the k experts do, so both
    models get the same parallelism.
    """

    def __init__(self, hidden: int, intermediate: int, blocks: int):
        super().__init__()
        self.blocks = [_SwiGLU(hidden, intermediate) for _ in range(blocks)]

    def __call__(self, x: mx.array) -> mx.array:
        def part(a: int, b: int) -> mx.array:
            return sum(block(x) for block in self.blocks[a:b])[None]

        work = [lambda a=a, b=b: part(a, b) for a, b in spans(len(self.blocks), parallel_ways())]
        return in_parallel(work, axis=0).sum(axis=0)


def skeleton(config: ModelConfig, float_dtype: mx.Dtype = mx.float32,
             scales_dtype: mx.Dtype | None = None, dense: bool = False) -> Mixtral:
    """The model tree with lazy placeholders of the final shapes/dtypes: nothing is allocated.

    `scales_dtype` (default `float_dtype`) is the dtype of quantization scales and biases.
    `dense` swaps every MoE block for a `DenseSwiGLU` with the same active parameters.
    """
    model = build_model(replace(config, quantization=None))
    model.config = config  # quantized below, the way `mlx_lm convert` would
    if dense:
        for layer in model.layers:
            layer.block_sparse_moe = DenseSwiGLU(config.hidden_size, config.intermediate_size,
                                                 config.num_experts_per_tok)
    q = config.quantization
    if q:
        nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q["mode"],
                    class_predicate=lambda _, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % q["group_size"] == 0)
    scales_dtype = scales_dtype or float_dtype

    def placeholder(path: str, a: mx.array) -> mx.array:
        if not mx.issubdtype(a.dtype, mx.floating):
            return mx.zeros(a.shape, a.dtype)
        is_scale = path.endswith((".scales", ".biases"))
        return mx.zeros(a.shape, scales_dtype if is_scale else float_dtype)

    model.update(tree_unflatten([(p, placeholder(p, a)) for p, a in tree_flatten(model.parameters())]))
    return model


def nbytes(model: nn.Module) -> int:
    """Bytes of all parameters (works on unevaluated skeletons: only shapes and dtypes are read)."""
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


def _randomize(module: nn.Module, config: ModelConfig) -> None:
    """Random values for one module's placeholders (see the module docstring for how)."""
    bits = (config.quantization or {}).get("bits")

    def fill(path: str, a: mx.array) -> mx.array:
        if isinstance(module, nn.RMSNorm) or path.endswith("norm.weight"):
            return mx.random.uniform(0.5, 1.5, a.shape).astype(a.dtype)
        if path.endswith((".biases", ".scales")):
            return mx.zeros(a.shape, a.dtype)  # set together below
        if a.dtype == mx.uint32:
            return mx.random.randint(-(2**31), 2**31 - 1, a.shape, dtype=mx.int32).view(mx.uint32)
        fan_in = a.shape[-1]
        return (mx.random.normal(a.shape) * fan_in**-0.5).astype(a.dtype)

    params = dict(tree_flatten(module.parameters()))
    new = {p: fill(p, a) for p, a in params.items()}
    for p in params:
        if p.endswith(".scales"):
            # codes are uniform on [0, 2^bits): centre them and give the weights std ~ fan_in^-0.5
            fan_in = params[p].shape[-1] * config.quantization["group_size"]
            step = fan_in**-0.5 * (12 / (4**bits - 1)) ** 0.5
            new[p] = mx.full(params[p].shape, step, params[p].dtype)
            bias_path = p[: -len("scales")] + "biases"
            new[bias_path] = mx.full(params[p].shape, -step * (2**bits - 1) / 2, params[p].dtype)
    module.update(tree_unflatten(list(new.items())))
    mx.eval(module.parameters())


def _top_modules(model: Mixtral) -> list[tuple[str, nn.Module]]:
    """(path prefix, module) of every piece `fill_random` fills: the layers, then the rest."""
    out = [(f"model.layers.{i}", layer) for i, layer in enumerate(model.layers)]
    out += [(f"model.{name}", getattr(model.model, name)) for name in ("embed_tokens", "norm")]
    if not model.config.tie_word_embeddings:
        out.append(("lm_head", model.lm_head))
    return out


def fill_random(model: Mixtral, seed: int = 0) -> Mixtral:
    """Replace every placeholder by random values, one layer at a time (peak ~ model size)."""
    mx.random.seed(seed)
    for _, module in _top_modules(model):
        _randomize(module, model.config)
    model.eval()
    return model


def write_folder(config: ModelConfig, folder: Path, scales_dtype: mx.Dtype = mx.bfloat16, seed: int = 0,
                 progress=lambda done, total: None) -> Path:
    """A random model written straight to disk in mlx-lm's layout (one shard per layer, with an
    index), never whole in memory: for shapes larger than this machine's RAM. Scales default to
    bfloat16, as `mlx_lm convert` writes them. The folder appears only when complete."""
    from mlx_mixtral.experts.uncached_io import drop_file_from_page_cache

    model = skeleton(config, mx.float32 if scales_dtype == mx.float32 else mx.bfloat16, scales_dtype)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    weight_map, total = {}, 0
    pieces = _top_modules(model)
    for n, (prefix, module) in enumerate(pieces):
        _randomize(module, config)
        shard = f"model-{n + 1:05d}-of-{len(pieces):05d}.safetensors"
        weights = {f"{prefix}.{p}": a for p, a in tree_flatten(module.parameters())}
        mx.save_safetensors(str(partial / shard), weights, metadata={"format": "mlx"})
        total += sum(a.nbytes for a in weights.values())
        weight_map.update({name: shard for name in weights})
        fd = os.open(partial / shard, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        drop_file_from_page_cache(partial / shard)  # written, not to be kept in RAM
        module.update(tree_unflatten([(p, mx.zeros((1,), a.dtype)) for p, a in tree_flatten(module.parameters())]))
        progress(n + 1, len(pieces))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (partial / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    partial.rename(folder)
    return folder


def check_fits(needed: int, what: str, available: tuple[int, str] | None = None) -> None:
    """Refuse (one line, with the numbers) when `needed` bytes exceed what this machine offers."""
    have, source = available or machine_memory()
    if needed > have:
        raise MixtralError(
            f"{what} needs about {needed / 1e9:.1f} GB but this machine offers {have / 1e9:.1f} GB "
            f"({source}); choose a smaller --synthetic shape or fewer --bits"
        )


def float_dtype() -> mx.Dtype:
    """What a checkpoint stored in bfloat16 (like Mixtral's) computes in on this device."""
    return compute_dtype(mx.bfloat16)


def save_mlx_lm(model: Mixtral, folder: Path, scales_dtype: mx.Dtype | None = None) -> Path:
    """Write `model` in mlx-lm's layout (config.json + safetensors), loadable by both tools.

    `scales_dtype` rewrites quantization scales/biases, e.g. bfloat16 like `mlx_lm convert`'s default.
    """
    folder.mkdir(parents=True, exist_ok=True)
    weights = {}
    for path, a in tree_flatten(model.parameters()):
        if scales_dtype is not None and path.endswith((".scales", ".biases")):
            a = a.astype(scales_dtype)
        weights[path] = a
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return folder


class NullTokenizer:
    """Stands in for a tokenizer where only token ids matter: decodes nothing, has no EOS.

    Both implementations are then timed on the same work (model + sampling), with no
    detokenization on either side.
    """

    eos_token_ids: set[int] = set()

    class _Detok:
        def add_token(self, token: int) -> str:
            return ""

        def finalize(self) -> str:
            return ""

    def detokenizer(self, shown=()) -> "_Detok":
        return self._Detok()

