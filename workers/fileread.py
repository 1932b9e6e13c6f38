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

import os
from pathlib import Path

import torch

# The read loop and the page cache probe are torch-free, shared with calibration (contract/directio.py).
from flexorch.contract.directio import PAGE, READ_CHUNK, advise_sequential, cached_share, page_aligned, read_into

MOSTLY_CACHED = 0.5  # files with at least this share of their pages in the page cache are read buffered


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
    return read_into(path, size, target, direct, on_chunk, chunk=READ_CHUNK)
