"""Reading a file into a buffer around the page cache (O_DIRECT), torch-free: the workers read layer
files this way (workers/fileread.py, the why and the measurements) and calibration measures the
rate it runs at (orchestrator/calibrate.py). One read loop for both.

Direct reads need file offsets, lengths and buffer addresses in whole pages. Where the filesystem
takes no direct reads (tmpfs, some FUSE), the read falls back to the page cache.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable
from pathlib import Path

PAGE = 4096  # a multiple of every device's logical block size (512 or 4096)
READ_CHUNK = 16 << 20  # 4 to 64 MiB read at one rate (measured); hashing the last chunk adds ~9 ms a file


def page_aligned(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def read_into(path: Path, size: int, target: memoryview, direct: bool,
              on_chunk: Callable[[memoryview], None] | None = None, chunk: int = READ_CHUNK) -> bool:
    """The first `size` bytes of `path` into `target` (page-aligned where `direct`), `chunk` bytes a
    read; on_chunk(memoryview) gets each chunk as it lands. A target shorter than `size` is reused
    from its start (calibration's sweep through one slot). Returns whether it read direct to the end:
    a refused or short direct read goes on through the page cache. EOFError if the file ends first."""
    fd, direct = open_for_reading(path, direct)
    try:
        done = 0
        while done < size:
            at = done % len(target)
            try:
                got = os.preadv(fd, [target[at:at + chunk]], done)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                got = None  # the filesystem refused the direct read (it opened): the page cache then
            if got is None or (direct and got % PAGE and done + got < size):
                os.close(fd)  # a refused or short direct read: the rest through the page cache
                fd, direct = open_for_reading(path, False)
                if got is None:
                    continue
            if not got:
                raise EOFError(f"{path} ends at byte {done}, before {size}")
            if on_chunk is not None:
                on_chunk(target[at:at + min(got, size - done)])
            done += got
        return direct
    finally:
        os.close(fd)


def open_for_reading(path: Path, direct: bool) -> tuple[int, bool]:
    """A read-only descriptor, direct where asked and the filesystem takes it; and whether it is."""
    if direct:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: no direct reads on this filesystem
                raise
    fd = os.open(path, os.O_RDONLY)
    advise_sequential(fd)
    return fd, False


def advise_sequential(fd: int) -> None:
    """POSIX_FADV_SEQUENTIAL doubles the kernel's read-ahead window for the file: a cold layer
    streamed ~2x faster with it (measured on a virtio disk with an 8 MiB window). Telling the kernel
    to read the next shard ahead as well (POSIX_FADV_WILLNEED, whole file or its first window) was
    measured slower or no faster: not done."""
    if hasattr(os, "posix_fadvise"):  # Linux; elsewhere the kernel's own heuristics
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def cached_share(path: Path, size: int) -> float:
    """Share of the file's first `size` bytes in the page cache (mincore over a mapping of it); 0.0
    where that cannot be told."""
    if size <= 0 or not hasattr(os, "O_DIRECT"):
        return 0.0
    libc = _libc()
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    if address in (None, ctypes.c_void_p(-1).value):
        return 0.0
    try:
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
            return 0.0
        return (pages - bytes(vector).count(0)) / pages  # a page's byte is 1 where it is cached
    finally:
        libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return libc
