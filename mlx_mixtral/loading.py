"""`load(path_or_repo) -> (model, tokenizer)`: from a local folder or the Hugging Face hub.

Accepted: a Hugging Face Mixtral checkpoint (experts stored one by one), or a folder converted by
mlx-mixtral or by `mlx_lm convert` (experts stacked, optionally quantized with a `quantization`
block in config.json), or a hub repo id. Everything is checked before a byte of weights is read:
the config, every shard's header, the tensor names and shapes, so a broken download fails in a
second with the file's name instead of after minutes of loading.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import Checkpoint, is_expert_tensor
from .config import ModelConfig
from .device import compute_dtype, streaming_defaults
from .distributed.group import world
from .distributed.sharding import Split, all_sum_over, read_tensor, unpacked_width
from .errors import MixtralError
from .experts.budget import AUTO, auto_budget, gb, parse_size, plan, weight_bytes
from .experts.expert_cache import READERS, ExpertCache
from .experts.expert_store import ExpertStore
from .experts.low_bit import DEFAULT_THRESHOLD, open_low_bit
from .experts.streamed_moe import stream_experts
from .experts.uncached_io import drop_file_from_page_cache, staging_bytes
from .kv_format import FLOAT, KVFormat
from .model import Mixtral
from .progress import progress_bar
from .row_split import CPU_PARTS
from .tokenizer import Tokenizer

# What a model needs from a hub repo; never the original `consolidated.*.pt` or other formats.
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json"]


def resolve(path_or_repo: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (only the needed files, resumable)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MixtralError(f"{path}: is a file; pass the model folder that holds config.json")
        if not os.access(path, os.R_OK | os.X_OK):
            raise MixtralError(f"cannot read the model folder {path}: permission denied; check the folder's permissions")
        return path
    text = str(path_or_repo)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise MixtralError(f"{text}: no such folder (and not a hub repo id like 'owner/name')")
    try:
        from huggingface_hub import snapshot_download  # only for a hub id: its import alone takes ~0.3 s

        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub raises many types: offline, 404, gated, auth
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MixtralError(f"{text}: could not download from the Hugging Face hub ({reason})") from None


def _quantization_predicate(config: ModelConfig, shapes: dict[str, tuple[int, ...]]):
    """Which modules are quantized, and how: per-layer entries first, then what the files hold.

    mlx-lm silently leaves some layers unquantized (widths not divisible by the group size), and
    files may mix bit widths, so bits and group size are read off each tensor's packed shape.
    """
    q = config.quantization or {}

    def predicate(path: str, module: nn.Module) -> Any:
        if path in q:
            return q[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in shapes:
            return False
        in_dims = module.weight.shape[-1]
        packed = shapes[f"{path}.weight"][-1]
        groups = shapes[f"{path}.scales"][-1]
        return {"group_size": in_dims // groups, "bits": packed * 32 // in_dims,
                "mode": q.get("mode", "affine")}

    return predicate


def build_model(config: ModelConfig, shapes: dict[str, tuple[int, ...]] | None = None) -> Mixtral:
    """The module tree for `config`, quantized where the checkpoint (`shapes`) is, built from the
    CPU row split's parts (`row_split`; MLX's own on a GPU). Allocates nothing."""
    model = Mixtral(config, CPU_PARTS)
    if config.quantization:
        q = config.quantization
        nn.quantize(
            model, group_size=q.get("group_size", 64), bits=q.get("bits", 4),
            mode=q.get("mode", "affine"), class_predicate=_quantization_predicate(config, shapes or {}),
        )
    return model


def check_tensors(model: Mixtral, ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]]) -> None:
    """Names and shapes (from the headers) against `model`: a mismatch fails before any loading."""
    expected = {name: tuple(a.shape) for name, a in tree_flatten(model.parameters())}
    for name, shape in expected.items():
        if name not in shapes:
            raise MixtralError(
                f"{ckpt.folder}: tensor {name} is missing from the weights; the checkpoint is "
                "incomplete or does not match config.json"
            )
        if shapes[name] != shape:
            raise MixtralError(
                f"{ckpt.origin.get(name, ckpt.folder)}: tensor {name} has shape {list(shapes[name])}, "
                f"but config.json implies {list(shape)}; the weights do not match the config"
            )
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise MixtralError(
            f"{ckpt.origin.get(extra[0], ckpt.folder)}: unexpected tensor {extra[0]}; "
            "the weights do not match config.json"
        )


def load_model(folder: str | os.PathLike, dtype: mx.Dtype | None = None, progress: bool = True,
               max_memory: int | str | None = None, policy: str | None = None, prefetch: bool | None = None,
               context: int | None = None, kv: KVFormat = FLOAT, miss_bits: int | None = None,
               miss_threshold: float = DEFAULT_THRESHOLD, expert_skip: float = 0.0) -> Mixtral:
    """Build and fill the model, one layer at a time (peak memory ~ the model, not twice it).

    With `max_memory` (bytes, a size like "12GB", or "auto") only the non-expert weights are
    loaded; experts are read from the files on demand into a cache that keeps the weights within
    that budget (see `expert_cache`). `context` sizes the KV cache `auto` leaves room for, stored
    in the `kv` format. Started by `mlx.launch` on N processes, each loads its 1/N (`sharding`).
    `miss_bits` (2 or 3, with `max_memory`): misses weighted below `miss_threshold` read the
    converter's low-bit copy of the expert instead (`experts.low_bit`). `policy` and `prefetch`
    left None are what suits the device (`device.streaming_defaults`). `expert_skip` (0 to 1)
    leaves out a token's experts weighted at most that fraction of its first (`model.skip_experts`):
    0 is the model as trained, 1 top-1 routing; fewer experts computed and read per token.
    """
    if not 0 <= expert_skip <= 1:
        raise MixtralError(f"--expert-skip must be from 0 (off) to 1 (top-1 routing), got {expert_skip}")
    model = _load(Path(folder), dtype, progress, max_memory, policy, prefetch, context, kv, miss_bits, miss_threshold)
    for layer in model.layers:
        layer.block_sparse_moe.skip = expert_skip
    return model


def _load(folder: Path, dtype: mx.Dtype | None, progress: bool, max_memory: int | str | None, policy: str | None,
          prefetch: bool | None, context: int | None, kv: KVFormat, miss_bits: int | None,
          miss_threshold: float) -> Mixtral:
    group = world()
    if group.size() > 1:
        if max_memory is not None:
            raise MixtralError("--max-memory (streaming experts) does not combine with several processes; "
                               "leave it out: each process holds 1/N of the model")
        return _load_sharded(folder, group, dtype, progress)
    config = ModelConfig.from_file(folder / "config.json")
    ckpt = Checkpoint(folder)
    shapes = ckpt.mlx_shapes(config)
    model = build_model(config, shapes)
    check_tensors(model, ckpt, shapes)
    cache = None
    if miss_bits is not None and max_memory is None:
        raise MixtralError("--miss-bits reads a low-bit copy of experts that are not in memory: it needs --max-memory")
    if max_memory is not None:
        low_bit = open_low_bit(folder, config, miss_bits, dtype, miss_threshold) if miss_bits is not None else None
        default_policy, default_prefetch = streaming_defaults()
        cache = _expert_cache(ckpt, config, dtype, max_memory, policy or default_policy,
                              default_prefetch if prefetch is None else prefetch, context, kv)
        if low_bit is not None and cache.plan.cached_experts >= cache.plan.total_experts:
            # Every expert fits: a miss is only each expert's first read, and the low-bit copy
            # would make those tokens differ from the resident model for no lasting saving.
            low_bit.close()
            low_bit = None
            cache.plan.notes.append(f"--miss-bits {miss_bits}: the budget holds every expert, so the low-bit copy "
                                    "is never read (the output is the resident model's)")
        stream_experts(model, cache, low_bit)
    pieces = ckpt.iter_weights(config)
    with progress_bar("Loading", total=config.num_hidden_layers + 1, enabled=progress) as advance:
        for _, weights in pieces:
            cast = []
            for name, a in weights.items():
                if cache is not None and is_expert_tensor(name):
                    continue  # never read: streamed on demand
                if mx.issubdtype(a.dtype, mx.floating):
                    a = a.astype(dtype or compute_dtype(a.dtype))
                cast.append((name, a))
            model.load_weights(cast, strict=False)
            mx.eval([a for _, a in cast])
            advance()
    model.runtime.fingerprint_of = ckpt.fingerprint  # what saved KV caches are checked against
    if cache is not None:  # the resident part: give it back
        for f in ckpt.files:
            drop_file_from_page_cache(f)
    model.eval()
    return model


def _load_sharded(folder: Path, group: Any, dtype: mx.Dtype | None, progress: bool) -> Mixtral:
    """This rank's slice of the model in `folder` (see `sharding`), its blocks' outputs summed over
    `group`: each tensor read by offset, only the part this rank keeps."""
    config = ModelConfig.from_file(folder / "config.json")
    split = Split.plan(config, group.rank(), group.size())
    ckpt = Checkpoint(folder)
    full_shapes = ckpt.mlx_shapes(config)
    check_tensors(build_model(config, full_shapes), ckpt, full_shapes)  # the files match the config
    local = split.local_config(config)
    shapes = {}
    for name, shape in full_shapes.items():
        cut = split.slices(name, config)
        if cut is None:
            shapes[name] = shape
            continue
        axis, a, b = cut
        unpacked = unpacked_width(name, axis, config)
        s = list(shape)
        if (s[axis] * a) % unpacked or (s[axis] * b) % unpacked:
            raise MixtralError(f"{folder}: splitting over {group.size()} processes would cut a quantization "
                               f"group of {name} ({shape[axis]} columns for {unpacked} values); use fewer processes")
        s[axis] = s[axis] * (b - a) // unpacked
        shapes[name] = tuple(s)
    model = build_model(local, shapes)
    names = [n for n, _ in tree_flatten(model.parameters())]
    with progress_bar(f"Loading 1/{group.size()} (rank {group.rank()})", total=len(names),
                      enabled=progress) as advance:
        for name in names:
            cut = split.slices(name, config)
            axis, a, b = cut if cut is not None else (None, 0, 0)
            array = read_tensor(ckpt, name, config, axis, a, b, dtype)
            model.load_weights([(name, array)], strict=False)
            mx.eval(array)
            advance()
    combine = all_sum_over(group)
    for layer in model.layers:
        layer.combine = combine
    model.runtime.split = split
    model.runtime.fingerprint_of = lambda: f"{ckpt.fingerprint()}:rank{split.rank}/{split.size}"
    model.eval()
    return model


def _expert_cache(ckpt: Checkpoint, config: ModelConfig, dtype: mx.Dtype | None, max_memory: int | str,
                  policy: str, prefetch: bool, context: int | None, kv: KVFormat) -> ExpertCache:
    """The expert cache a budget buys, after checking the budget holds what must stay resident."""
    if isinstance(max_memory, str) and max_memory.strip().lower() == AUTO:
        budget, how = auto_budget(config, context, kv)
        label = f"auto ({gb(budget)} = {how})"
    else:
        budget = parse_size(max_memory)
        label = str(max_memory) if isinstance(max_memory, str) else gb(budget)
    store = ExpertStore(ckpt, config, dtype, readers=READERS)
    # staging buffers: one per reading thread (slice readers; expert readers only wait on them)
    staging = READERS * staging_bytes(store.largest_read)
    resident = weight_bytes(ckpt, config, dtype, experts=False)
    the_plan = plan(budget, resident, staging, store.max_expert_bytes, config, label)
    return ExpertCache(store, the_plan.cache_bytes, policy=policy, readers=READERS, prefetch=prefetch,
                       plan=the_plan, per_token=config.num_hidden_layers * config.num_experts_per_tok)


def would_fit(folder: Path, context: int | None = None, kv: KVFormat = FLOAT) -> tuple[bool, str]:
    """Whether the whole model fits this machine's memory (`auto`'s budget), and a line saying why."""
    config = ModelConfig.from_file(folder / "config.json")
    need = weight_bytes(Checkpoint(folder), config)
    budget, how = auto_budget(config, context, kv)
    return need <= budget, f"the model takes {gb(need)} and this machine offers {gb(budget)} ({how})"


def load(path_or_repo: str | os.PathLike, dtype: mx.Dtype | None = None, progress: bool = True,
         max_memory: int | str | None = None, policy: str | None = None,
         prefetch: bool | None = None, miss_bits: int | None = None,
         expert_skip: float = 0.0) -> tuple[Mixtral, Tokenizer]:
    """Load a Mixtral model and its tokenizer from a folder or a hub repo id.

    `dtype` overrides the compute dtype of floating weights (default: `compute_dtype`).
    `max_memory` ("12GB", bytes, or "auto") streams the experts from disk within that budget;
    `policy` ("lfu", "lru" or "cyclic") chooses which cached expert to evict, `prefetch` whether
    the next layer's likely experts are read ahead (None: what suits the device, see
    `device.streaming_defaults`: cyclic without prefetch on a GPU, LFU with prefetch on the CPU);
    `miss_bits` (2 or 3) reads the converter's low-bit
    copy of an expert for misses a token weights little; `expert_skip` (0 to 1) leaves out a
    token's experts weighted at most that fraction of its first. Without `max_memory` the model is
    fully resident.
    """
    folder = resolve(path_or_repo)
    tokenizer = Tokenizer.from_folder(folder)  # cheap; fail before the long part
    return load_model(folder, dtype=dtype, progress=progress, max_memory=max_memory, policy=policy,
                      prefetch=prefetch, miss_bits=miss_bits, expert_skip=expert_skip), tokenizer
