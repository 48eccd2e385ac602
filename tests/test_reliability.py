"""Files we read cannot hang us or lie to us, and ordinary failures are named in one line.

Prompt caches trusted only for what their checksum covers; a model fingerprint that sees every
byte; FIFOs, random bytes and broken headers refused before anything blocks or allocates; weights
rewritten under a streaming model noticed; permission and read-only failures named.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_mixtral
from mlx_mixtral import prompt_cache
from mlx_mixtral.checkpoint import Checkpoint
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.kv_format import kv_format


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLX_MIXTRAL_HISTORY": ""}
    return subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def model_copy(hf_checkpoint_factory, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(hf_checkpoint_factory("gqa"), folder)
    return folder


def _header(path: Path) -> tuple[dict, int]:
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return json.loads(path.read_bytes()[8:8 + n]), n


def _rewrite_header(path: Path, header: dict, length: int) -> None:
    """Put `header` back in place (padded to the same length, as safetensors allows)."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= length
    data = bytearray(path.read_bytes())
    data[8:8 + length] = raw + b" " * (length - len(raw))
    path.write_bytes(bytes(data))


def _cached(model_folder: Path, tmp_path: Path) -> tuple[Path, object, object]:
    model, tokenizer = mlx_mixtral.load(model_folder, progress=False)
    cached = prompt_cache.PromptCache(model, kv_format(None))
    ids = tokenizer.encode("A long document about tokenizers and caches.")
    cached.prepare(ids)
    mlx_mixtral.generate(model, tokenizer, ids, max_tokens=1, cache=cached.cache)
    cached.ids = ids
    path = prompt_cache.save(tmp_path / "doc.kv", cached, tokenizer, {"mode": "raw", "text": "A long document"})
    return path, model, tokenizer


def _poke(path: Path, old: bytes, new: bytes) -> None:
    """Replace the first `old` in the file's header by `new` (same length): one edited field."""
    assert len(old) == len(new)
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    at = data.index(old, 8, 8 + n)
    data[at:at + len(old)] = new
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("old, new", [
    (b"A long document", b"B long document"),  # the cached text: the reply would follow the altered text
    (b'"ids":"[1, ', b'"ids":"[2, '),  # the token ids
    (b'"offset":"1', b'"offset":"2'),  # how much of the arrays is held
    (b'"kv_bits":"null"', b'"kv_bits":"8   "'),  # the KV format
])
def test_any_changed_byte_of_what_a_cache_says_is_refused(model_copy, tmp_path, old, new):
    path, model, tokenizer = _cached(model_copy, tmp_path)
    prompt_cache.load(path, model, tokenizer)  # as written: accepted
    _poke(path, old, new)
    with pytest.raises(MixtralError, match="corrupt \\(its checksum does not match\\)"):
        prompt_cache.load(path, model, tokenizer)


def test_a_tensor_changed_anywhere_changes_the_fingerprint(model_copy, tmp_path, monkeypatch):
    """One value in the middle of one tensor (where no sample of a sampling fingerprint would
    look): another model, and its caches are refused."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path, model, tokenizer = _cached(model_copy, tmp_path)
    before = Checkpoint(model_copy).fingerprint()
    shard = next(model_copy.glob("*.safetensors"))
    header, n = _header(shard)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    begin, end = header[name]["data_offsets"]
    at = 8 + n + begin + (end - begin) // 2 + 4 * 7
    data = bytearray(shard.read_bytes())
    value = struct.unpack("<f", data[at:at + 4])[0]
    data[at:at + 4] = struct.pack("<f", value + 0.5)
    stat = shard.stat()
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert Checkpoint(model_copy).fingerprint() != before
    other, _ = mlx_mixtral.load(model_copy, progress=False)
    with pytest.raises(MixtralError, match="saved for another model"):
        prompt_cache.load(path, other, tokenizer)


def test_the_fingerprint_is_remembered_until_a_file_changes(model_copy, tmp_path, monkeypatch):
    from mlx_mixtral import checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = Checkpoint(model_copy).fingerprint()
    assert (tmp_path / "cache" / "mlx-mixtral" / "file-digests.json").is_file()
    hashed = []
    real = checkpoint.hashlib.sha256
    monkeypatch.setattr(checkpoint.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    assert Checkpoint(model_copy).fingerprint() == first and len(hashed) == 1  # only the final combine
    shard = next(model_copy.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    hashed.clear()
    assert Checkpoint(model_copy).fingerprint() == first and len(hashed) == 2  # the touched file, hashed again


@pytest.mark.parametrize("kind", ["fifo", "folder", "random", "huge header"])
def test_unusable_cache_files_are_refused_in_one_line_without_waiting(hf_checkpoint_factory, tmp_path, kind):
    path = tmp_path / "thing.kv"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())
    else:  # claims a 2 GB header: must be refused before anything allocates it
        path.write_bytes(struct.pack("<Q", 2 * 10**9) + b"{}")
    r = _cli("generate", "--model", str(hf_checkpoint_factory("gqa")), "--prompt-cache", str(path), "--prompt", "x",
             "--max-tokens", "1", timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and str(path) in lines[0], r.stderr
    assert {"fifo": "not a regular file", "folder": "is a folder", "random": "not a complete prompt cache",
            "huge header": "not a complete prompt cache"}[kind] in lines[0]


@pytest.mark.parametrize("problem, damage", [
    ("no data_offsets", lambda entry: entry.pop("data_offsets")),
    ("no dtype", lambda entry: entry.pop("dtype")),
    ("bad shape", lambda entry: entry.__setitem__("shape", ["x"])),
    ("bad offsets", lambda entry: entry.__setitem__("data_offsets", [10, 2])),
])
def test_a_header_entry_missing_a_key_is_one_line(model_copy, problem, damage):
    shard = next(model_copy.glob("*.safetensors"))
    header, n = _header(shard)
    damage(header["model.norm.weight"])
    _rewrite_header(shard, header, n)
    r = _cli("generate", "--model", str(model_copy), "--raw", "--prompt", "x", "--max-tokens", "1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {shard}: corrupt safetensors header")
    assert "'model.norm.weight'" in lines[0] and "unexpected" not in lines[0]


def test_permission_denied_is_named(model_copy, monkeypatch):
    """Root reads anything, so the refusal is simulated where the file is opened."""
    from mlx_mixtral import checkpoint

    real_open = open

    def guarded(path, *args, **kwargs):
        if str(path).endswith(".safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", guarded, raising=False)
    with pytest.raises(MixtralError) as caught:
        mlx_mixtral.load(model_copy, progress=False)
    assert "permission denied; check the file's permissions" in str(caught.value)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(MixtralError, match="cannot read the model folder .*: permission denied"):
        mlx_mixtral.load(model_copy, progress=False)


def test_a_read_only_destination_is_named_and_nothing_is_left(model_copy, tmp_path, monkeypatch):
    model, tokenizer = mlx_mixtral.load(model_copy, progress=False)
    cached = prompt_cache.PromptCache(model)
    cached.prepare([1, 2, 3])
    target = tmp_path / "ro"
    target.mkdir()
    real_access = os.access
    monkeypatch.setattr(prompt_cache.os, "access", lambda p, m: False if Path(p) == target else real_access(p, m))
    with pytest.raises(MixtralError, match="the folder is not writable: choose another place"):
        prompt_cache.save(target / "c.kv", cached, tokenizer)
    monkeypatch.undo()

    def refuse(file, arrays, metadata=None):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(mx, "save_safetensors", refuse)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    with pytest.raises(MixtralError) as caught:  # the cleanup failing too changes nothing
        prompt_cache.save(target / "c.kv", cached, tokenizer)
    assert "read-only file system; the folder is read-only: choose another place" in str(caught.value)


def test_weights_rewritten_under_a_streaming_model_are_noticed(model_copy):
    plan = mlx_mixtral.load(model_copy, progress=False, max_memory="1000GB")[0].runtime.expert_cache.plan
    tight = plan.resident + plan.staging + 2 * plan.expert_bytes  # room for one token's experts: reads every layer
    model, tokenizer = mlx_mixtral.load(model_copy, progress=False, max_memory=tight, prefetch=False)
    mlx_mixtral.generate(model, tokenizer, [1, 415, 2936], max_tokens=2)
    shard = next(model_copy.glob("*.safetensors"))
    with open(shard, "r+b") as f:  # in place: same inode, new contents
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(MixtralError, match="changed on disk while the model was in use"):
        mlx_mixtral.generate(model, tokenizer, [1, 415, 2936, 9060, 285, 1142], max_tokens=4)
