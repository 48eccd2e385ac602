"""Reading and writing files safely: whole or not at all, never blocking, ordinary causes named.

* `regular_file(path, what)`: the path, checked to be a regular file before anything opens it (a
  FIFO would block `open` forever, a device could be read without end, a folder cannot be read).
* `atomic_write(path, data)` and `write_whole(path, what, write)`: the file is made at a temporary
  path in the same folder, flushed to disk (`fsync`), then renamed over `path` (and the folder's
  entry flushed too): a full disk, a read-only folder or a crash leaves the previous file as it
  was, and the error says so in one line. What exists at `path` and is not a regular file is
  never replaced: a character device or a pipe (`/dev/stdout`) is written in place, with the
  device's own error (`/dev/full`: no space left), and a pipe nobody reads is refused rather than
  waited on; a folder, socket or block device is refused (`writable`).
* `reason(error)`: an OSError as words ("permission denied", "no space left on device") for the
  one-line messages every front door prints.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import MixtralError

_ADVICE = {
    errno.EACCES: "check the file's permissions",
    errno.EPERM: "check the file's permissions",
    errno.EROFS: "the folder is read-only: choose another place",
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is full: free some space",
}


def reason(error: OSError) -> str:
    """What went wrong, in words (lower case), and what to do about it when that is clear."""
    words = (error.strerror or str(error) or type(error).__name__).rstrip(".")
    words = words[:1].lower() + words[1:]
    advice = _ADVICE.get(error.errno)
    return f"{words}; {advice}" if advice else words


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it is a regular file (symlinks followed), else a one-line MixtralError naming it.

    `os.stat` never blocks on a FIFO, unlike `open`, so a pipe or device given by mistake is
    refused before anything waits on it."""
    path = Path(path).expanduser()
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MixtralError(f"no {what} at {path}: no such file") from None
    except OSError as e:
        raise MixtralError(f"cannot read the {what} {path}: {reason(e)}") from None
    if stat.S_ISDIR(mode):
        raise MixtralError(f"{path} is a folder, not a {what}")
    if not stat.S_ISREG(mode):
        raise MixtralError(f"{path} is not a regular file (a pipe, socket or device): give the {what} itself")
    return path


def writable(path: str | os.PathLike, what: str = "file") -> Path:
    """Where writing `path` should go: a new or regular file (a symlink's target), or a character
    device or pipe (`/dev/stdout`, `/dev/null`, `| less`: written in place, never replaced by a
    file); a folder, a socket or a block device is a one-line MixtralError, before anything is
    written."""
    path = Path(path).expanduser()
    try:
        mode = os.stat(path).st_mode  # follows symlinks: their target is what gets written
    except FileNotFoundError:
        return path.resolve() if path.is_symlink() else path  # (a dangling link: its target is created)
    except OSError as e:
        raise MixtralError(f"cannot save the {what} to {path}: {reason(e)}") from None
    if stat.S_ISDIR(mode):
        raise MixtralError(f"cannot save the {what} to {path}: it is a folder")
    if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        raise MixtralError(f"cannot save the {what} to {path}: it is a socket or block device, not a file; "
                           "give a file's path")
    return path if in_place(path) else path.resolve()


def in_place(path: Path) -> bool:
    """Whether `path` is written in place: a character device or a pipe (see `writable`)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def write_whole(path: str | os.PathLike, what: str, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Make a file at `path` whole or not at all: `write(tmp)` makes the whole file at a temporary
    path, which is then flushed and renamed over `path` (a regular file or none). A character
    device or a pipe gets the finished bytes written into it instead and stays what it is; a pipe
    nobody reads from is refused rather than waited on. Any failure leaves `path` as it was and
    says why in one line. Returns where it was written."""
    path = writable(path, what)
    target = _open_in_place(path, what) if in_place(path) else None
    folder = Path(tempfile.gettempdir()) if target is not None else path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.partial{suffix}"
    try:
        write(tmp)
        if target is not None:
            with open(tmp, "rb") as src:
                while chunk := src.read(1 << 20):
                    target.write(chunk)
            target.flush()  # a full device (/dev/full) says so here at the latest
        else:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            sync_folder(folder)
    except (OSError, RuntimeError, ValueError) as e:
        why = reason(e) if isinstance(e, OSError) else str(e).splitlines()[0]
        unchanged = "" if target is not None else " (nothing was changed there)"
        raise MixtralError(f"cannot save the {what} to {path}: {why}{unchanged}") from None
    finally:
        if target is not None:
            try:
                target.close()
            except OSError:
                pass  # its error was raised by the flush above
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the folder refused the temporary file too: nothing of ours is left
    return path


def _open_in_place(path: Path, what: str):
    """`path` (a device or pipe) opened for writing; a pipe with no reader is refused at once."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise MixtralError(f"cannot save the {what} to {path}: nothing reads from that pipe") from None
        raise MixtralError(f"cannot save the {what} to {path}: {reason(e)}") from None
    os.set_blocking(fd, True)
    return os.fdopen(fd, "wb")


def atomic_write(path: str | os.PathLike, data: bytes | str, what: str = "file") -> Path:
    """Write `data` to `path` whole or not at all (`write_whole`); returns the path."""
    payload = data.encode("utf-8") if isinstance(data, str) else data

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    return write_whole(path, what, write)


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (after a rename into it), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename itself is still atomic
    finally:
        os.close(fd)
