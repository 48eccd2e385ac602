"""Reading and writing files safely: whole or not at all, never blocking, ordinary causes named.

* `regular_file(path, what)`: the path, checked to be a regular file before anything opens it (a
  FIFO would block `open` forever, a device could be read without end, a folder cannot be read).
* `atomic_write(path, data)`: the bytes go to a temporary file in the same folder, are flushed to
  disk (`fsync`), then renamed over `path` (and the folder's entry flushed too): a full disk, a
  read-only folder or a crash leaves the previous file as it was, and the error says so in one line.
* `reason(error)`: an OSError as words ("permission denied", "no space left on device") for the
  one-line messages every front door prints.
"""

from __future__ import annotations

import errno
import os
import stat
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


def atomic_write(path: str | os.PathLike, data: bytes | str, what: str = "file") -> Path:
    """Write `data` to `path` whole or not at all (see the module docstring); returns the path."""
    path = Path(path).expanduser()
    payload = data.encode("utf-8") if isinstance(data, str) else data
    folder = path.parent
    if path.is_dir():
        raise MixtralError(f"cannot save the {what} to {path}: it is a folder")
    tmp = folder / f".{path.name}.{os.getpid()}.partial"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        sync_folder(folder)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the folder refused the temporary file too: nothing of ours is left
        raise MixtralError(f"cannot save the {what} to {path}: {reason(e)} (nothing was changed there)") from None
    return path


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
