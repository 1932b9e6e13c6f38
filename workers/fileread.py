"""Reading a whole layer file into a buffer: through the page cache, or around it (O_DIRECT).

A cold buffered read lands each page in the page cache and copies it to the buffer. Read directly,
the disk writes into the buffer itself, a slot reused for every shard: no page cache pages to
allocate, nothing copied, and the page cache (and whatever else it holds) left alone. On a 2-core VM
whose host takes freed guest memory back (orchestrator/calibrate.FREED_MEMORY_SETTLE_S) 453 MB
layer files read cold at 1.5-1.6 GB/s direct against 0.66-0.74 GB/s buffered (3 rounds each).

A direct read costs a disk read where the file is already in the page cache (a copy from memory runs
at ~10 GB/s), so a file mostly cached is read buffered (`cached_share`, mincore). Where the filesystem
takes no direct reads (tmpfs, some FUSE), the read falls back to the page cache. Direct reads need
file offsets, lengths and buffer addresses in whole pages: the file is read from offset 0 (its header
lands in front of the data) into a page-aligned buffer of `page_aligned(file size)` bytes.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from pathlib import Path

import torch

PAGE = 4096  # a multiple of every device's logical block size (512 or 4096)
READ_CHUNK = 16 << 20  # 4 to 64 MiB read at one rate (measured); hashing the last chunk adds ~9 ms a file
MOSTLY_CACHED = 0.5  # files with at least this share of their pages in the page cache are read buffered


def page_aligned(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def page_aligned_empty(nbytes: int, pin_memory: bool = False) -> torch.Tensor:
    """A flat uint8 CPU buffer of `nbytes` that starts on a page boundary (a direct read's target)."""
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=pin_memory)
    skip = -raw.data_ptr() % PAGE
    return raw[skip:skip + nbytes]  # the view keeps `raw` alive


def read_file(path: Path, size: int, buffer: torch.Tensor, direct: bool, on_chunk=None) -> bool:
    """The first `size` bytes of `path` (its whole file) into `buffer` (flat uint8, CPU, at least
    `size` bytes), in READ_CHUNK reads; on_chunk(memoryview) gets each chunk as it lands.
    direct: read around the page cache where that pays and works (module docstring), and the buffer
    is page-aligned and page_aligned(size) long. Returns whether it read direct. Raises EOFError when
    the file ends before `size`."""
    if buffer.numel() < size:
        raise ValueError(f"a {buffer.numel()}-byte buffer cannot hold {path} ({size} bytes)")
    target = memoryview(buffer[:page_aligned(size)].numpy())
    direct = (direct and hasattr(os, "O_DIRECT")  # Linux; elsewhere always through the cache
              and buffer.data_ptr() % PAGE == 0 and len(target) == page_aligned(size)
              and cached_share(path, size) < MOSTLY_CACHED)
    fd, direct = _open(path, direct)
    try:
        done = 0
        while done < size:
            try:
                got = os.preadv(fd, [target[done:done + READ_CHUNK]], done)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                got = None  # the filesystem refused the direct read (it opened): the page cache then
            if got is None or (direct and got % PAGE and done + got < size):
                os.close(fd)  # a refused or short direct read: the rest through the page cache
                fd, direct = _open(path, False)
                if got is None:
                    continue
            if not got:
                raise EOFError(f"{path} ends at byte {done}, before {size}")
            if on_chunk is not None:
                on_chunk(target[done:min(done + got, size)])
            done += got
        return direct
    finally:
        os.close(fd)


def _open(path: Path, direct: bool) -> tuple[int, bool]:
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
