"""Converting a Mixtral checkpoint to MLX, optionally quantized (or back to float), one layer at a time.

Mixtral-8x7B is 93 GB in bfloat16 and users convert it on 32-64 GB Macs, so the model is never
held whole: each layer's tensors are read lazily, converted and evaluated one module at a time by
the shard writer, and the references to the input are dropped at once. Peak memory is one shard
of output (--max-shard-size) plus one module's input and output, whatever the model's size
(measured in benchmarks/RESULTS.md, "Converter memory").

Everything that can be checked is checked before the first byte is written: the options, that
the destination is free, the config, every shard's header and every tensor's shape, and that the
destination's disk can hold the estimated output.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_mixtral.checkpoint import is_expert_tensor
from mlx_mixtral.config import ModelConfig
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.experts.low_bit import MISS_BITS, MISS_FILE, miss_folder
from mlx_mixtral.model import Mixtral
from mlx_mixtral.progress import progress_bar
from mlx_mixtral.tokenizer import Tokenizer
from mlx_mixtral.units import gb

from .calibration import Calibration, calibration_tokens
from .hf_reader import TOKENIZER_FILES, Source, open_source
from .quant_policy import (
    DEFAULT_EMBED_BITS,
    DEFAULT_LM_HEAD_BITS,
    DEFAULT_ROUTER_BITS,
    MODE,
    QuantPlan,
    QuantPolicy,
    quantizable_modules,
)
from .weighted_quant import weighted_quantize
from .writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter, check_destination, check_free_space, staging_folder

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


@dataclass
class Summary:
    """What a conversion produced, for the closing line and for callers (the benchmarks)."""

    path: Path
    nbytes: int
    shards: int
    bits_per_weight: float
    seconds: float
    peak_rss: int
    peak_mlx: int
    precision: str

    def text(self) -> str:
        return (
            f"Wrote {self.path}: {gb(self.nbytes)} in {self.shards} shard(s), {self.precision}, "
            f"{self.bits_per_weight:.2f} bits per weight, {self.seconds:.1f} s, peak memory "
            f"{gb(self.peak_rss)} RSS ({gb(self.peak_mlx)} in MLX buffers)"
        )


def parse_dtype(name: str) -> mx.Dtype:
    """--dtype's value, checked here (not by argparse) so Python callers get the same one-line error."""
    if name not in DTYPES:
        raise MixtralError(f"--dtype {name}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: mx.Dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def convert(
    hf_path: str | os.PathLike,
    mlx_path: str | os.PathLike,
    *,
    quantize: bool = False,
    bits: int = 4,
    group_size: int = 64,
    dtype: str | None = None,
    force: bool = False,
    dequantize: bool = False,
    router_bits: int | None = DEFAULT_ROUTER_BITS,
    embed_bits: int | None = DEFAULT_EMBED_BITS,
    lm_head_bits: int | None = DEFAULT_LM_HEAD_BITS,
    attention_bits: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    miss_bits: int | None = None,
    calibration: str | os.PathLike | bool | None = None,
) -> Summary:
    """Convert `hf_path` (folder or hub repo id) into an MLX folder at `mlx_path`.

    (Sixteen of its lines are the keyword signature the CLI and the benchmarks pass.)

    `quantize` applies a `QuantPolicy` (bits/group_size for experts and attention, their own
    precision for router, embeddings and lm_head, None meaning float; `attention_bits` None
    means as `bits`); `dequantize` turns a quantized MLX folder back into float. `dtype`
    (default: the source's) is that of float weights and of quantization scales and biases.
    `miss_bits` (2 or 3) also writes a copy of every expert at that many bits into `miss-Nbit/`,
    quantized from the float source, for streaming to read on some misses (`experts.low_bit`).
    `calibration` (with `quantize`: a text file, or True for the text the package ships) chooses
    every quantized linear layer's scales and biases by importance-weighted error
    (`calibration`, `weighted_quant`); the format stays the same. Without it the output is
    round-to-nearest, byte for byte what it always was.
    """
    start = time.perf_counter()
    if quantize and dequantize:
        raise MixtralError("-q and --dequantize: choose one")
    out_dtype = parse_dtype(dtype) if dtype is not None else None
    policy = QuantPolicy(bits=bits, group_size=group_size, router_bits=router_bits, embed_bits=embed_bits,
                         lm_head_bits=lm_head_bits, attention_bits=attention_bits) if quantize else None
    if max_shard_bytes <= 0:
        raise MixtralError(f"--max-shard-size {max_shard_bytes}: must be positive")
    dst = Path(mlx_path).expanduser()
    check_destination(dst, force, Path(hf_path).expanduser())

    source = open_source(hf_path)
    stored = source.quantized()
    if quantize and stored:
        raise MixtralError(f"{source.folder}: is already quantized; convert the float checkpoint, "
                           "or --dequantize this one first")
    if dequantize and not stored:
        raise MixtralError(f"{source.folder}: is not quantized; there is nothing to --dequantize")
    if miss_bits is not None and (stored or miss_bits not in MISS_BITS):
        raise MixtralError(f"--miss-bits {miss_bits}: choose {' or '.join(map(str, MISS_BITS))}, from a float "
                           "checkpoint" + (f" ({source.folder} is quantized)" if stored else ""))
    calibrating = calibration not in (None, False)
    if calibrating and (stored or not quantize):
        raise MixtralError("--calibration chooses how to quantize a float checkpoint: " + (
            f"{source.folder} is already quantized (its rounding is done); calibrate from the float checkpoint it "
            "came from" if stored else "add -q"))
    dequant = stored if dequantize else {}
    keeps_quantization = bool(stored) and not dequantize
    out_dtype = out_dtype or source.float_dtype()
    plan = policy.plan(quantizable_modules(source.model)) if policy else None
    if plan and plan.misfit_message():
        print(plan.misfit_message(), file=sys.stderr)

    calib = _calibration(source, calibration) if calibrating else None
    target = source.model if keeps_quantization else output_model(source.config, plan)
    check_free_space(dst, nbytes(target, out_dtype) + sum(
        (source.folder / n).stat().st_size for n in TOKENIZER_FILES if (source.folder / n).is_file()))
    precision = _describe(plan, keeps_quantization, out_dtype) + (f", calibrated on {calib.size} tokens" if calib else "")
    print(f"Converting {source.folder} ({gb(source.nbytes)}) to {precision}", file=sys.stderr)
    if not any((source.folder / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        print(f"note: {source.folder} has no tokenizer.model (nor tokenizer.json); copy Mixtral's "
              f"into {dst} for mlx_mixtral.load to open it", file=sys.stderr)

    config = source.config
    with staging_folder(dst, force) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        low = ShardWriter(_mkdir(miss_folder(tmp, miss_bits)), max_shard_bytes) if miss_bits else None
        task = "Quantizing" if plan else "Dequantizing" if dequant else "Converting"
        with progress_bar(task, total=config.num_hidden_layers + 1, enabled=progress) as advance:
            deferred: dict[str, mx.array] = {}  # calibrating: lm_head waits for the last layer's output
            for name, weights in source.pieces():
                importance = {}
                if calib is not None and name == "embeddings":
                    calib.embeddings(weights)
                    deferred = {k: weights.pop(k) for k in list(weights) if k.startswith("lm_head.")}
                    final_norm = weights["model.norm.weight"]
                elif calib is not None:
                    importance = calib.layer(int(name.split()[-1]), weights)
                if low is not None:  # first: _convert_piece lets go of the float weights it uses
                    low.add(_low_bit_experts(weights, miss_bits, group_size, out_dtype, importance))
                for outputs in _convert_piece(weights, plan, dequant, out_dtype, importance):
                    writer.add(outputs)  # evaluates them: reads, converts, frees the inputs
                advance()
            if deferred:
                importance = {"lm_head": calib.final(final_norm, config.rms_norm_eps)}
                for outputs in _convert_piece(deferred, plan, dequant, out_dtype, importance):
                    writer.add(outputs)
        shards = writer.close()
        if low is not None:
            low.close()
            spec = {"bits": miss_bits, "group_size": group_size, "mode": MODE}
            (miss_folder(tmp, miss_bits) / MISS_FILE).write_text(json.dumps(spec) + "\n")
        source.copy_tokenizer(tmp)
        quantization = plan.config() if plan else source.config.quantization if keeps_quantization else None
        _write_config(tmp, replace(config, quantization=quantization), out_dtype)  # last: marks it complete

    return Summary(dst, writer.total_bytes, shards, writer.total_bytes * 8 / parameter_count(config),
                   time.perf_counter() - start, _peak_rss(), mx.get_peak_memory(), precision)


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def output_model(config: ModelConfig, plan: QuantPlan | None = None) -> Mixtral:
    """The output's module tree, unallocated (only shapes and dtypes): float, or quantized by `plan`."""
    model = Mixtral(replace(config, quantization=None))
    if plan:
        nn.quantize(model, class_predicate=lambda path, _: _spec_kwargs(plan, path))
    return model


def _spec_kwargs(plan: QuantPlan, path: str) -> dict[str, Any] | bool:
    spec = plan.specs.get(path)
    return {**spec.to_config(), "mode": MODE} if spec else False


def nbytes(model: Mixtral, dtype: mx.Dtype) -> int:
    """Bytes the model takes on disk with its float tensors in `dtype` (packed codes as they are)."""
    return sum(a.size * (dtype.size if mx.issubdtype(a.dtype, mx.floating) else a.itemsize)
               for _, a in tree_flatten(model.parameters()))


def parameter_count(config: ModelConfig) -> int:
    """Weights of the float model: the denominator of bits per weight."""
    return sum(a.size for _, a in tree_flatten(output_model(config).parameters()))


def _describe(plan: QuantPlan | None, keeps_quantization: bool, dtype: mx.Dtype) -> str:
    name = dtype_name(dtype)
    if plan:
        return f"{plan.default.bits}-bit, group size {plan.default.group_size} ({plan.summary()}), {name}"
    return f"kept quantized, {name} scales" if keeps_quantization else name


def _convert_piece(weights: dict[str, mx.array], plan: QuantPlan | None, dequant: dict[str, tuple[int, int, str]],
                   dtype: mx.Dtype, importance: dict[str, mx.array]) -> Iterator[dict[str, mx.array]]:
    """One module's output tensors at a time; inputs are popped so they are freed once used. A
    module with an `importance` (calibration) is quantized by importance-weighted error."""
    modules: dict[str, dict[str, mx.array]] = {}
    for name in list(weights):
        path, _, part = name.rpartition(".")
        modules.setdefault(path, {})[part] = weights.pop(name)
    for path in list(modules):
        parts = modules.pop(path)
        out: dict[str, mx.array] = {}
        spec = plan.specs.get(path) if plan else None
        if spec is not None:
            w, scales, biases = _quantize(parts.pop("weight").astype(dtype), importance.get(path), spec.group_size,
                                          spec.bits, dtype)
            out.update(weight=w, scales=scales, biases=biases)
        elif path in dequant:
            group, nbits, mode = dequant[path]
            w = mx.dequantize(parts.pop("weight"), parts.pop("scales"), parts.pop("biases", None),
                              group_size=group, bits=nbits, mode=mode)
            out["weight"] = w.astype(dtype)
        for part, a in parts.items():  # everything else: float tensors cast, packed codes as they are
            out[part] = a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a
        yield {f"{path}.{part}": a for part, a in out.items()}


def _low_bit_experts(weights: dict[str, mx.array], bits: int, group_size: int, dtype: mx.Dtype,
                     importance: dict[str, mx.array]) -> dict[str, mx.array]:
    """The expert projections of one piece quantized at `bits` (lazy unless calibrated; the inputs
    stay in `weights`)."""
    out = {}
    for name, w in weights.items():
        if is_expert_tensor(name) and name.endswith(".weight"):
            path = name.removesuffix(".weight")
            out[f"{path}.weight"], out[f"{path}.scales"], out[f"{path}.biases"] = _quantize(
                w.astype(dtype), importance.get(path), group_size, bits, dtype)
    return out


def _quantize(w: mx.array, importance: mx.array | None, group_size: int, bits: int,
              dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
    """Round-to-nearest (`mx.quantize`), or importance-weighted where calibration measured one."""
    if importance is None:
        return mx.quantize(w, group_size, bits, mode=MODE)
    return weighted_quantize(w, importance, group_size, bits, dtype)


def _calibration(source: Source, text: str | os.PathLike | bool) -> Calibration:
    """The calibration tokens (read, checked and tokenized before anything is written)."""
    try:
        tokenizer = Tokenizer.from_folder(source.folder)
    except MixtralError as e:
        raise MixtralError(f"--calibration needs the model's tokenizer in {source.folder}: {e}") from None
    tokens = calibration_tokens(None if text is True else text, tokenizer, source.config)
    return Calibration(tokens, source.config)


def _mkdir(folder: Path) -> Path:
    folder.mkdir()
    return folder


def _write_config(folder: Path, config: ModelConfig, dtype: mx.Dtype) -> None:
    """config.json in mlx-lm's spelling; converting again (with either tool) starts from its dtype."""
    out = config.to_dict()
    out["torch_dtype"] = dtype_name(dtype)  # what mlx-lm and transformers read the dtype from
    if "dtype" in out:
        out["dtype"] = dtype_name(dtype)
    (folder / "config.json").write_text(json.dumps(out, indent=2) + "\n")
