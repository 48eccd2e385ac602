"""The KV state of a prompt, in memory and on disk.

In memory, `PromptCache` is a model's per-layer KV cache together with the exact token ids it
holds. A new prompt reuses the longest prefix of ids the cache shares with it: the rest is trimmed
(or, where a sliding window already dropped keys the prefix needs, the cache starts afresh) and
only the remainder is fed. The chat keeps one across turns; `cache-prompt` files keep one on disk.

On disk, `save` writes one safetensors file: every layer's held keys and values (in their KV
format: float or quantized parts, bit for bit), the ids, and what they belong to: the model (a
fingerprint of its config and weights files), the tokenizer, the KV format and dtype, and a
checksum of the arrays. `load` checks all of it before anything is used, so a cache from another
model, conversion or tokenizer, or a truncated or corrupt file, is refused in one line and never
half-loaded. Writes go to a temporary file in the same folder, renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .cache import make_cache
from .checkpoint import MAX_HEADER_BYTES, read_header
from .errors import MixtralError
from .files import in_place, reason, regular_file, write_whole
from .kv_format import FLOAT, KVFormat, kv_format

FORMAT, VERSION = "mlx-mixtral-prompt-cache", "3"


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """A model's per-layer KV cache together with the exact token ids it holds."""

    def __init__(self, model, fmt: KVFormat = FLOAT) -> None:
        self.model = model
        self.format = fmt
        self.cache = make_cache(model, fmt)
        self.ids: list[int] = []

    def reset(self) -> None:
        """Forget everything (the next prompt is prefilled from scratch)."""
        self.cache = make_cache(self.model, self.format)
        self.ids = []

    def prepare(self, prompt: list[int]) -> list[int]:
        """Make the cache hold a prefix of `prompt`; return the rest, which the caller must feed.

        At least one id is always left to feed, since the next token needs the logits of the last.
        """
        keep = min(common_prefix_length(self.ids, prompt), len(prompt) - 1)
        if all(c.can_trim_to(keep) for c in self.cache):
            for c in self.cache:
                c.trim(c.offset - keep)
            self.ids = self.ids[:keep]
        else:  # a sliding window already dropped keys the kept prefix still needs
            self.reset()
        return prompt[len(self.ids):]

    def fork(self, keep: int) -> PromptCache:
        """A new cache holding the first `keep` ids of this one, which stays as it is (a server
        starts one conversation from another's shared prefix without destroying it). Where a
        sliding window already dropped keys that prefix needs, the new cache starts empty."""
        other = PromptCache(self.model, self.format)
        if keep <= 0 or not all(c.can_trim_to(keep) for c in self.cache):
            return other
        for mine, theirs in zip(self.cache, other.cache):
            keys, values = mine.held()
            n = keep - mine.start
            # Views of this cache's buffers: the first write to the fork grows it into its own.
            theirs.restore(tuple(k[:, :, :n] for k in keys), tuple(v[:, :, :n] for v in values), keep)
        other.ids = self.ids[:keep]
        return other

    def record(self, fed: list[int], generated: list[int]) -> None:
        """After generation: the cache holds a prefix of what it held, plus `fed`, plus `generated`.

        `cache[0].offset` says how long that prefix is (the last generated id may not have been
        fed back). Anything inconsistent (layers that disagree) is not trusted: start afresh.
        """
        seen = self.ids + fed + generated
        offsets = {c.offset for c in self.cache}
        if len(offsets) != 1 or offsets.pop() > len(seen):
            self.reset()
            return
        self.ids = seen[: self.cache[0].offset]

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held (what a saved file takes, give or take its header)."""
        return sum(p.nbytes for c in self.cache for parts in c.held() for p in parts)

    @property
    def allocated(self) -> int:
        """Bytes the cache's buffers take in memory (held positions plus room to grow)."""
        return sum(c.nbytes for c in self.cache)


def _kv_dtype(model) -> str:
    """The dtype the model computes keys in (that of its k_proj weights, or of their scales)."""
    k_proj = model.layers[0].self_attn.k_proj
    weights = k_proj.get("scales", k_proj["weight"])
    return str(weights.dtype)


def _digest(arrays: dict[str, mx.array], metadata: dict[str, str]) -> str:
    """A checksum of everything a reader uses: every metadata field (model, tokenizer and format
    fingerprints, KV format, offsets, token ids, the cached text) and every array's name, dtype,
    shape and bytes."""
    h = hashlib.sha256()
    fields = {k: v for k, v in metadata.items() if k != "digest"}
    h.update(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"\0{name}\0{a.dtype}\0{tuple(a.shape)}\0".encode())
        h.update(np.asarray(mx.view(a, mx.uint8)).data)
    return h.hexdigest()


def _fingerprint(model) -> str:
    fp = model.runtime.fingerprint
    if fp is None:
        raise MixtralError("this model was not loaded from a folder, so a KV cache of it cannot be "
                           "saved or checked; load it with mlx_mixtral.load")
    return fp


def save(path: str | os.PathLike, prompt_cache: PromptCache, tokenizer, extra: dict[str, Any] | None = None) -> Path:
    """Write `prompt_cache` to `path` atomically (with `extra`, JSON-able, given back by `load`)."""
    path = Path(path).expanduser()
    cache = prompt_cache.cache
    arrays: dict[str, mx.array] = {}
    for i, c in enumerate(cache):
        keys, values = c.held()
        for kind, parts in (("keys", keys), ("values", values)):
            for j, part in enumerate(parts):
                arrays[f"layers.{i}.{kind}.{j}"] = mx.contiguous(part)  # held parts are slices of buffers
    mx.eval(list(arrays.values()))
    fmt = prompt_cache.format
    metadata = {
        "format": FORMAT, "version": VERSION,
        "model": _fingerprint(prompt_cache.model), "tokenizer": tokenizer.fingerprint,
        "chat_format": tokenizer.chat_format.fingerprint,
        "kv_bits": json.dumps(fmt.bits), "kv_group_size": json.dumps(fmt.group_size),
        "kv_dtype": _kv_dtype(prompt_cache.model),
        "offset": str(cache[0].offset), "start": str(cache[0].start),
        "ids": json.dumps(prompt_cache.ids), "extra": json.dumps(extra or {}),
    }
    metadata["digest"] = _digest(arrays, metadata)
    if not path.parent.is_dir():
        raise MixtralError(f"cannot save the KV cache to {path}: no folder {path.parent}")
    if not os.access(path.parent, os.W_OK) and not in_place(path):  # MLX's own writer would only say "cannot open"
        raise MixtralError(f"cannot save the KV cache to {path}: the folder is not writable: choose another place")
    return write_whole(path, "KV cache", lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata=metadata),
                       suffix=".safetensors")


def peek(path: str | os.PathLike) -> dict[str, Any]:
    """The `extra` saved with a prompt cache, read from its header alone (before a model loads).
    Unchecked until `load` verifies the checksum: only for choosing how to encode the prompt."""
    path = regular_file(path, "prompt cache")
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > min(path.stat().st_size - 8, MAX_HEADER_BYTES):
                raise ValueError("header size")
            metadata = json.loads(f.read(n)).get("__metadata__", {})
        if metadata.get("format") != FORMAT:
            raise MixtralError(f"{path} is not an mlx-mixtral prompt cache")
        return json.loads(metadata["extra"])
    except OSError as e:
        raise MixtralError(f"cannot read {path}: {reason(e)}") from None
    except (ValueError, KeyError, AttributeError, TypeError):
        raise MixtralError(f"{path} is not a complete prompt cache (truncated or corrupt); make it again") from None


def load(path: str | os.PathLike, model, tokenizer, fmt: KVFormat | None = None) -> tuple[PromptCache, dict[str, Any]]:
    """The prompt cache saved at `path`, checked against `model`, `tokenizer` and (if given) the
    KV format asked for; `(cache, extra)`. Any mismatch or damage raises MixtralError (one line)."""
    path = regular_file(path, "prompt cache")
    damaged = f"{path} is not a complete prompt cache (truncated or corrupt); make it again"
    try:
        read_header(path)
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except (MixtralError, RuntimeError, ValueError, OSError):
        raise MixtralError(damaged) from None
    if metadata.get("format") != FORMAT:
        raise MixtralError(f"{path} is not an mlx-mixtral prompt cache")
    if metadata.get("version") != VERSION:
        raise MixtralError(f"{path} is a prompt cache of format version {metadata.get('version')}; "
                           f"this mlx-mixtral reads version {VERSION}: make it again")
    if _digest(arrays, metadata) != metadata.get("digest"):  # nothing below is trusted before this
        raise MixtralError(f"{path} is corrupt (its checksum does not match); make it again")
    remake = "make it again with this one"
    if metadata.get("model") != _fingerprint(model):
        raise MixtralError(f"{path} was saved for another model (or another conversion of it); {remake}")
    if metadata.get("tokenizer") != tokenizer.fingerprint:
        raise MixtralError(f"{path} was saved with another tokenizer; {remake}")
    if metadata.get("chat_format") != tokenizer.chat_format.fingerprint:
        raise MixtralError(f"{path} was saved under another chat format ({metadata.get('chat_format')}, this "
                           f"model's is {tokenizer.chat_format.fingerprint}); {remake}")
    if metadata.get("kv_dtype") != _kv_dtype(model):
        raise MixtralError(f"{path} holds keys computed in {metadata.get('kv_dtype')}, but this model "
                           f"computes in {_kv_dtype(model)} here (another device or --dtype); {remake}")
    try:
        saved = kv_format(json.loads(metadata["kv_bits"]), json.loads(metadata["kv_group_size"]),
                          model.config.head_dim)
        offset, start = int(metadata["offset"]), int(metadata["start"])
        ids = json.loads(metadata["ids"])
        extra = json.loads(metadata["extra"])
    except (KeyError, ValueError, TypeError, MixtralError):
        raise MixtralError(damaged) from None
    if fmt is not None and fmt != saved:
        raise MixtralError(f"{path} holds a {saved.describe()} KV cache, not the {fmt.describe()} one asked "
                           "for: leave out --kv-bits/--kv-group-size to use it as saved, or make it again")
    result = PromptCache(model, saved)
    layers = _layers(arrays, len(result.cache))
    expected = _part_shapes(model, saved, offset - start)
    if (not isinstance(ids, list) or len(ids) != offset or not 0 <= start <= offset or layers is None
            or any([tuple(p.shape) for p in parts] != expected for layer in layers for parts in layer)):
        raise MixtralError(damaged)
    for c, (keys, values) in zip(result.cache, layers):
        c.restore(keys, values, offset)
    result.ids = ids
    return result, extra


def _layers(arrays: dict[str, mx.array], n_layers: int) -> list[tuple[tuple, tuple]] | None:
    """Per layer (keys parts, values parts) from the saved names; None if any layer is missing."""
    out = []
    for i in range(n_layers):
        parts = []
        for kind in ("keys", "values"):
            j, got = 0, []
            while f"layers.{i}.{kind}.{j}" in arrays:
                got.append(arrays[f"layers.{i}.{kind}.{j}"])
                j += 1
            parts.append(tuple(got))
        out.append(tuple(parts))
    if len(arrays) != sum(len(k) + len(v) for k, v in out):
        return None
    return out


def _part_shapes(model, fmt: KVFormat, positions: int) -> list[tuple[int, ...]]:
    """The shapes `positions` held positions take in `fmt` for this model (one batch row)."""
    config = model.config
    probe = mx.zeros((1, config.num_key_value_heads, 1, config.head_dim))
    return [(*p.shape[:2], positions, *p.shape[3:]) for p in fmt.encode(probe)] if positions else []
