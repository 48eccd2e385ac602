"""Reading byte ranges of model files without leaving a copy in the OS page cache.

Streamed experts are read once and kept in our own budgeted cache. An ordinary read would also
leave the bytes in the kernel's page cache: memory the budget does not see, outside the process's
RSS, that would make a "12 GB" run use far more. So each platform's way around it is used:

- Linux: `O_DIRECT` (reads go straight from the device into our buffer; offsets, sizes and the
  buffer must be aligned to the block size, so an aligned superset of the range is read into a
  page-aligned buffer). File systems that refuse `O_DIRECT` (tmpfs, some overlays) fall back to
  an ordinary read followed by `posix_fadvise(DONTNEED)` on the range, which drops those pages.
- macOS: `fcntl(F_NOCACHE)`, which turns off caching for reads through that descriptor.
- Elsewhere: ordinary reads (the page cache may keep the bytes; `page_cache_bytes` reports it).

`page_cache_bytes` measures how much of a file the kernel holds (`mincore` over a mapping), so
benchmarks can report it beside RSS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os
import sys
import threading
from pathlib import Path

import numpy as np

from ..errors import MixtralError

ALIGN = 4096  # a multiple of every common logical block size, and the page size on Linux x86
_F_NOCACHE = 48  # <sys/fcntl.h> on macOS; Python's fcntl module does not always export it


def _round_down(n: int) -> int:
    return n - n % ALIGN


def _round_up(n: int) -> int:
    return _round_down(n + ALIGN - 1)


_staging = threading.local()


def _buffer(size: int) -> mmap.mmap:
    """This thread's staging buffer, grown to `size`: one per reading thread, whatever the file,
    so staging memory is (threads x largest read)."""
    buf = getattr(_staging, "buf", None)
    if buf is None or len(buf) < size:
        if buf is not None:
            buf.close()
        buf = mmap.mmap(-1, _round_up(size))  # anonymous mappings are page-aligned
        _staging.buf = buf
    return buf


def staging_bytes(largest_read: int) -> int:
    """The staging memory one reading thread needs for reads of up to `largest_read` bytes."""
    return _round_up(largest_read) + 2 * ALIGN


class UncachedFile:
    """One model file, opened for reads that bypass (or immediately drop) the page cache.

    `read(offset, n)` is thread-safe (positional reads into a per-thread staging buffer) and
    returns a memoryview valid until the same thread's next read.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.direct = False
        self._fd = -1
        if sys.platform.startswith("linux") and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError:
                self._fd = -1
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY)
            if sys.platform == "darwin":

                try:
                    fcntl.fcntl(self._fd, getattr(fcntl, "F_NOCACHE", _F_NOCACHE), 1)
                except OSError:
                    pass
        st = os.fstat(self._fd)
        self._identity = (st.st_size, st.st_mtime_ns)  # a file rewritten in place changes these


    def read(self, offset: int, n: int) -> memoryview:
        """Bytes `[offset, offset + n)` of the file; refused (MixtralError) if the file was
        rewritten in place since it was opened: its weights would no longer be the model's."""
        st = os.fstat(self._fd)
        if st.st_size < self._identity[0]:
            raise OSError("the file is truncated")
        if (st.st_size, st.st_mtime_ns) != self._identity:
            raise MixtralError(f"{self.path} changed on disk while the model was in use (rewritten in place); "
                               "load the model again")
        if self.direct:
            start = _round_down(offset)
            size = _round_up(offset + n) - start
            buf = _buffer(size)
            view = memoryview(buf)[:size]
            try:
                got = os.preadv(self._fd, [view], start)
            except OSError:  # the file system took O_DIRECT at open but refuses it now
                self._reopen_buffered()
                return self.read(offset, n)
            if got < offset - start + n:
                raise OSError(f"short read at byte {offset}: the file is truncated")
            return view[offset - start: offset - start + n]
        buf = _buffer(n)
        view = memoryview(buf)[:n]
        got = os.preadv(self._fd, [view], offset)
        if got < n:
            raise OSError(f"short read at byte {offset}: the file is truncated")
        drop_from_page_cache(self._fd, offset, n)
        return view

    def _reopen_buffered(self) -> None:
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.direct = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def drop_from_page_cache(fd: int, offset: int = 0, n: int = 0) -> None:
    """Ask the kernel to drop its cached pages of a range (n=0: to the end); a no-op without
    `posix_fadvise` (macOS)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def drop_file_from_page_cache(path: Path) -> None:
    """Drop a whole file's cached pages (e.g. after the resident weights were read from it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        drop_from_page_cache(fd)
    finally:
        os.close(fd)


def page_cache_bytes(path: Path) -> int | None:
    """Bytes of `path` the OS page cache holds now (`mincore` over a fresh mapping of the file), or
    None where that cannot be asked."""
    libc_name = ctypes.util.find_library("c")
    size = Path(path).stat().st_size
    if not libc_name or size == 0:
        return None if not libc_name else 0
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        if libc.mincore(addr, size, vec) != 0:
            return None
    finally:
        libc.munmap(addr, size)
    resident = int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
    return min(resident * mmap.PAGESIZE, size)
