"""Reading a folder of safetensors files, Hugging Face's or mlx-lm's, into MLX-layout tensors.

Shared by the loader and the converter so both accept exactly the same inputs and reject broken
ones with the same one-line errors. Tensors are loaded lazily (`mx.load` reads bytes only when an
array is evaluated) and handed out once (`take`), so evaluating a layer frees its source bytes and
peak memory stays near the size of the output, not twice it.

Hugging Face stores each expert separately (`experts.E.w1/w2/w3`: gate, down, up); MLX stacks them
per projection as `switch_mlp.{gate,up,down}_proj` `[experts, out, in]`, the layout `mx.gather_mm`
wants and mlx-lm writes. Folders already in MLX layout pass through unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .config import ModelConfig
from .device import compute_dtype
from .errors import MixtralError
from .files import atomic_write, reason

INDEX_FILE = "model.safetensors.index.json"
# The expert tensors' names, the one place they are spelled: MLX stacks a layer's experts as
# `block_sparse_moe.switch_mlp.{gate,up,down}_proj.{weight,scales,biases}` ([experts, out, in]);
# Hugging Face keeps one tensor per expert, `block_sparse_moe.experts.N.{w1,w3,w2}.weight`.
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
HF_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
TENSOR_PARTS = ("weight", "scales", "biases")
MAX_HEADER_BYTES = 100 << 20  # a safetensors header (ours or any file's) larger than this is corrupt
# Buffers some checkpoints carry that are not weights (RoPE frequencies, recomputed from rope_theta).
BUFFERS = ("rotary_emb.inv_freq",)
HASH_CHUNK = 16 << 20  # bytes read at a time while hashing a weights file
MEMO_ENTRIES = 2000  # weights files whose digests are remembered
_MLX_EXPERT_NAMES = {hf: mlx for mlx, hf in HF_EXPERT_NAMES.items()}


def read_header(path: Path) -> dict:
    """Parse and sanity-check a safetensors header; a truncated or corrupt file fails here, by name."""
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[dict, int]:
    """(header, byte offset where the tensor data starts: the header's `data_offsets` count from there)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise MixtralError(f"{path}: truncated safetensors file ({size} bytes); download or convert it again")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise MixtralError(f"{path}: corrupt safetensors header; download or convert it again")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise MixtralError(f"{path}: file not found; the checkpoint is incomplete, download it again") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise MixtralError(f"{path}: corrupt safetensors header; download or convert it again") from None
    except OSError as e:  # permission denied, an unreadable disk, ...
        raise MixtralError(f"cannot read {path}: {reason(e)}") from None
    if not isinstance(header, dict):
        raise MixtralError(f"{path}: corrupt safetensors header; download or convert it again")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        problem = _entry_problem(entry)
        if problem:
            raise MixtralError(f"{path}: corrupt safetensors header (tensor {name!r} {problem}); "
                               "download or convert it again")
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise MixtralError(
            f"{path}: truncated safetensors file ({size} of {8 + n + end} bytes); download or convert it again"
        )
    return header, 8 + n


def _entry_problem(entry: object) -> str | None:
    """What is wrong with one tensor's header entry (None: nothing): every reader relies on
    "dtype", "shape" and "data_offsets" being there and sane."""
    if not isinstance(entry, dict):
        return "is not an object"
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            return f"has no {key!r}"
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(entry["dtype"], str):
        return "has a dtype that is not a name"
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        return "has a shape that is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                  for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        return "has data_offsets that are not [start, end]"
    return None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: those its index names, else every *.safetensors."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except OSError as e:
            raise MixtralError(f"cannot read {index}: {reason(e)}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
            raise MixtralError(f"{index}: not a valid safetensors index (no weight_map of tensor names to "
                               "files); download it again") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise MixtralError(f"{f}: shard named in {INDEX_FILE} is missing; download it again")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MixtralError(f"{folder}: no *.safetensors weights found; is this a model folder?")
    return files


@dataclass(frozen=True)
class TensorBytes:
    """One tensor's bytes in a safetensors file: `nbytes` from absolute `offset`, row-major."""

    file: Path
    offset: int
    nbytes: int
    dtype: str  # safetensors spelling: "BF16", "F32", "U32", ...
    shape: tuple[int, ...]


class Checkpoint:
    """The tensors of one model folder, validated up front and loaded lazily on demand."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.files = safetensors_files(self.folder)
        read = {f: _read_header(f) for f in self.files}
        self.headers = {f: header for f, (header, _) in read.items()}
        self._data_start = {f: start for f, (_, start) in read.items()}
        self._where = {name: f for f, h in self.headers.items() for name in h if not name.endswith(BUFFERS)}
        # name -> file, kept after `take` so errors can still name the file a tensor came from
        self.origin: dict[str, Path] = dict(self._where)
        self._loaded: dict[Path, dict[str, mx.array]] = {}

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def fingerprint(self) -> str:
        """A digest of config.json and of every byte of every weights file: any changed tensor
        changes it. Hashing reads the whole model once (26 GB of 4-bit 8x7B: about a minute on a
        Mac's SSD, see RESULTS.md), so each file's digest is remembered by its path, size, inode
        and modification time (`file_digests`) and a later load costs milliseconds."""
        digest = hashlib.sha256()
        config = self.folder / "config.json"
        digest.update(config.read_bytes() if config.is_file() else b"")
        for f, file_hash in zip(self.files, file_digests(self.files)):
            digest.update(f"{f.name}:{file_hash}".encode())
        return digest.hexdigest()[:32]

    def names(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self._where[name]][name]["shape"])

    def byte_range(self, name: str) -> TensorBytes:
        """Where tensor `name` lies in its file (from the header; nothing is read)."""
        f = self.origin[name]
        entry = self.headers[f][name]
        begin, end = entry["data_offsets"]
        return TensorBytes(f, self._data_start[f] + begin, end - begin, entry["dtype"], tuple(entry["shape"]))

    def take(self, name: str) -> mx.array:
        """The tensor, lazily; handed out once so its bytes are freed once consumed."""
        f = self._where.pop(name)
        if f not in self._loaded:
            try:
                self._loaded[f] = mx.load(str(f))
            except Exception as e:  # MLX raises plain ValueError/RuntimeError for bad files
                raise MixtralError(f"{f}: cannot read safetensors file ({e}); download or convert it again") from None
        arrays = self._loaded[f]
        array = arrays.pop(name)
        if not arrays:
            del self._loaded[f]
        return array

    def mlx_shapes(self, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Name -> shape in MLX layout, from the headers alone (nothing is loaded)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self._where:
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue
            head, sep, tail = name.partition(".block_sparse_moe.experts.")
            if not sep:
                shapes[name] = self.shape(name)
                continue
            expert, hf, part = tail.split(".", 2)
            if expert == "0" and hf in _MLX_EXPERT_NAMES:
                stacked = f"{head}.block_sparse_moe.switch_mlp.{_MLX_EXPERT_NAMES[hf]}.{part}"
                self.origin[stacked] = self.origin[name]
                shapes[stacked] = (config.num_local_experts, *self.shape(name))
        return shapes

    def layer_weights(self, config: ModelConfig, layer: int) -> dict[str, mx.array]:
        """Layer `layer`'s tensors in MLX layout (experts stacked)."""
        prefix = f"model.layers.{layer}."
        names = [n for n in self._where if n.startswith(prefix)]
        out: dict[str, mx.array] = {}
        experts = f"{prefix}block_sparse_moe.experts."
        for name in names:
            if not name.startswith(experts):
                out[name] = self.take(name)
        for hf, mlx in _MLX_EXPERT_NAMES.items():
            for part in TENSOR_PARTS:
                first = f"{experts}0.{hf}.{part}"
                if first not in self._where:
                    continue
                parts = []
                for e in range(config.num_local_experts):
                    name = f"{experts}{e}.{hf}.{part}"
                    if name not in self._where:
                        raise MixtralError(
                            f"{self.folder}: tensor {name} is missing; the checkpoint is incomplete "
                            f"or has fewer experts than config.json's num_local_experts ({config.num_local_experts})"
                        )
                    parts.append(self.take(name))
                out[f"{prefix}block_sparse_moe.switch_mlp.{mlx}.{part}"] = mx.stack(parts)
        leftover = [n for n in names if n.startswith(experts) and n in self._where]
        if leftover:
            raise MixtralError(
                f"{self.file_of(leftover[0])}: unexpected tensor {leftover[0]} (expert index beyond "
                f"num_local_experts={config.num_local_experts}?)"
            )
        return out

    def other_weights(self, config: ModelConfig) -> dict[str, mx.array]:
        """The tensors outside the decoder layers: embeddings, final norm, lm_head."""
        out = {n: self.take(n) for n in list(self._where) if not n.startswith("model.layers.")}
        if config.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out

    def iter_weights(self, config: ModelConfig) -> Iterator[tuple[str, dict[str, mx.array]]]:
        """("embeddings", {...}) then ("layer N", {...}) for each layer: one bounded piece at a time."""
        yield "embeddings", self.other_weights(config)
        for layer in range(config.num_hidden_layers):
            yield f"layer {layer}", self.layer_weights(config, layer)
        stray = [n for n in self._where if n.startswith("model.layers.")]
        if stray:
            raise MixtralError(
                f"{self.file_of(stray[0])}: tensor {stray[0]} belongs to no layer of a "
                f"{config.num_hidden_layers}-layer model; does config.json match the weights?"
            )


# safetensors dtype -> (numpy dtype holding the bytes, MLX dtype they mean)
SAFETENSORS_DTYPES = {
    "F32": (np.float32, mx.float32), "F16": (np.float16, mx.float16), "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, mx.uint32), "I32": (np.int32, mx.int32), "U8": (np.uint8, mx.uint8),
    "I8": (np.int8, mx.int8), "U16": (np.uint16, mx.uint16), "I16": (np.int16, mx.int16),
}


def memory_dtype(stored: str, dtype: mx.Dtype | None = None) -> mx.Dtype:
    """The dtype a tensor stored as `stored` (safetensors spelling) takes in memory: floats in
    `dtype` or the device's compute dtype, everything else (packed codes) as stored."""
    kept = SAFETENSORS_DTYPES.get(stored, (None, mx.float32))[1]
    return (dtype or compute_dtype(kept)) if mx.issubdtype(kept, mx.floating) else kept


def is_expert_tensor(name: str) -> bool:
    """Whether a tensor (either layout's name) holds expert weights, i.e. is streamed, not resident."""
    return ".block_sparse_moe.switch_mlp." in name or ".block_sparse_moe.experts." in name


def tensor_from_bytes(raw: memoryview, stored: str, target: mx.Dtype, shape: tuple[int, ...]) -> mx.array:
    """Bytes of a safetensors tensor -> an MLX array of `target` dtype (copied out of `raw`)."""
    np_dtype, mlx_dtype = SAFETENSORS_DTYPES[stored]
    a = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    if mlx_dtype == target:
        if stored == "BF16":  # numpy has no bfloat16: carry the bits, reinterpret in MLX
            return mx.array(a).view(mx.bfloat16)
        return mx.array(a)
    # Widened to float32 (exact), and any other conversion too, in numpy: this runs on expert-reader
    # threads, and an MLX operation built there would belong to that thread's stream, which the
    # model's thread cannot evaluate ("There is no Stream(cpu, N) in current thread").
    if stored == "BF16":  # the bf16 bits are the top half of the float32's: one buffer, in place
        wide = a.astype(np.uint32)
        wide <<= 16
        wide = wide.view(np.float32)
    else:
        wide = a.astype(np.float32)
    if target == mx.float32:
        return mx.array(wide)
    if target == mx.float16:
        return mx.array(wide.astype(np.float16))
    if target == mx.bfloat16:  # round to nearest even, as MLX's own conversion does
        bits = wide.view(np.uint32)
        return mx.array(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)).view(mx.bfloat16)
    return mx.array(wide).astype(target)


def _digest_memo() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "mlx-mixtral" / "file-digests.json"


def file_digests(paths: list[Path]) -> list[str]:
    """sha256 of each file's bytes, remembered by (path, size, inode, mtime): a file rewritten in
    place gets a new mtime and is hashed again. The memo is a small JSON file in the user's cache
    folder, read once and written (atomically) once; when it cannot be read or written, the
    digests are just recomputed."""
    memo_path = _digest_memo()
    try:
        memo = json.loads(memo_path.read_text())
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    digests, hashed = [], False
    for path in paths:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_dev}:{st.st_ino}|{st.st_mtime_ns}"
        if not isinstance(memo.get(key), str):
            same_file = key.split("|")[0] + "|"
            memo = {k: v for k, v in memo.items() if not k.startswith(same_file)}  # its older versions
            memo[key] = _sha256(path)
            hashed = True
        digests.append(memo[key])
    if hashed:
        memo = dict(list(memo.items())[-MEMO_ENTRIES:])  # the most recently hashed files
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(memo_path, json.dumps(memo), "digest memo")
        except (OSError, MixtralError):
            pass  # a read-only home: the digests are still right, only not remembered
    return digests


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            done = 0
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
                if hasattr(os, "posix_fadvise"):  # a streamed model's files must not fill the page cache
                    os.posix_fadvise(f.fileno(), done, len(chunk), os.POSIX_FADV_DONTNEED)
                done += len(chunk)
    except OSError as e:
        raise MixtralError(f"cannot read {path}: {reason(e)}") from None
    return h.hexdigest()
