"""Writing the converted model: safetensors shards and their index, in a folder that becomes the
destination only once it is complete.

Shards are written as soon as they fill, so the converter holds at most one shard of output in
memory, never the model. Everything goes into `DST.partial-XXXXXXXX` beside the destination and is
renamed to DST at the very end: an error, Ctrl-C or a full disk midway removes that folder and
leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from mlx_mixtral.checkpoint import INDEX_FILE
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.units import gb

SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # what Hugging Face and mlx-lm use


class ShardWriter:
    """Buffers evaluated tensors; writes a shard whenever the next module would overflow it."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.folder = folder
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self._buffer: dict[str, mx.array] = {}
        self._buffered = 0
        self._written: list[tuple[Path, list[str]]] = []

    def add(self, tensors: dict[str, mx.array]) -> None:
        """Evaluate one module's (lazy) tensors and buffer them, together, for the current shard.

        Their size is known before they are computed, so a full shard is written and freed first:
        peak memory is one shard plus one module's inputs and outputs, never two shards' worth.
        A module bigger than a shard gets a shard of its own.
        """
        size = sum(a.nbytes for a in tensors.values())
        if self._buffer and self._buffered + size > self.max_bytes:
            self.flush()
        mx.eval(list(tensors.values()))
        self._buffer.update(tensors)
        self._buffered += size

    def flush(self) -> None:
        """Write the buffered tensors as the next shard and let go of them."""
        if not self._buffer:
            return
        # The final names need the shard count: numbered "-of-N" by `close`.
        path = self.folder / f"model-{len(self._written) + 1:05d}.safetensors"
        try:
            mx.save_safetensors(str(path), self._buffer, metadata={"format": "mlx"})
        except (OSError, RuntimeError, ValueError) as e:  # MLX reports a full disk as RuntimeError
            raise MixtralError(f"{path}: cannot write ({e}); is the disk full?") from None
        self._written.append((path, list(self._buffer)))
        self.total_bytes += self._buffered
        self._buffer, self._buffered = {}, 0

    def close(self) -> int:
        """Write what is left, name the shards `model-0000i-of-0000N`, write the index; returns N."""
        self.flush()
        count = len(self._written)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self._written, 1):
            final = SHARD_NAME.format(i, count)
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return count


def check_destination(dst: Path, force: bool, source: Path | None = None) -> None:
    """Refuse to overwrite an existing DST without --force, and ever to overwrite the source."""
    if source is not None and source.exists():
        src, out = source.resolve(), dst.resolve()
        if src == out or out in src.parents:
            raise MixtralError(f"{dst}: is (or holds) the source checkpoint; pick another --mlx-path")
    if dst.exists() and not (dst.is_dir() or dst.is_file()):  # --force never replaces a device or a pipe
        raise MixtralError(f"{dst}: is a device, pipe or socket, not a folder; pick another --mlx-path")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise MixtralError(f"{dst}: already exists; pick another --mlx-path or pass --force to replace it")


def check_free_space(dst: Path, needed: int) -> None:
    """Fail before starting, not after an hour, when DST's disk cannot hold the output."""
    existing = dst.parent
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise MixtralError(
            f"{existing}: only {gb(free)} free but the converted model needs about "
            f"{gb(needed)}; free some space or pick another --mlx-path"
        )


@contextmanager
def staging_folder(dst: Path, force: bool) -> Iterator[Path]:
    """A fresh folder beside `dst` to write into; it becomes `dst` only if the body completes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f"{dst.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, dst, force)
    except BaseException:  # KeyboardInterrupt included: never leave a half-written model behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, dst: Path, force: bool) -> None:
    """Rename the finished folder to `dst`, replacing (with --force) whatever is there."""
    if not (dst.exists() or dst.is_symlink()):
        tmp.rename(dst)
        return
    check_destination(dst, force)  # it may have appeared while we converted
    if dst.is_dir() and not dst.is_symlink():
        aside = dst.parent / f"{dst.name}.old-{secrets.token_hex(4)}"
        dst.rename(aside)
        tmp.rename(dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.unlink(dst)
        tmp.rename(dst)
