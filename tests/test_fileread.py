"""Whole layer files into buffers: through the page cache, or around it where that pays and works."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from flexorch.workers import fileread
from flexorch.workers.fileread import PAGE, cached_share, page_aligned, page_aligned_empty, read_file


def evict(path: Path) -> None:
    """`path` dropped from the page cache (fsync first: dirty pages are not dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def takes_direct_reads(path: Path) -> bool:
    """Whether the filesystem holding `path` opens it for direct reads (tmpfs does not)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def _file(tmp_path: Path, size: int, cached: bool) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "layer.safetensors"
    path.write_bytes(data)
    if not cached:
        evict(path)
    return path, data


def test_buffers_start_on_a_page_and_hold_what_was_asked():
    for size in (1, PAGE, 3 * PAGE + 5):
        buffer = page_aligned_empty(size)
        assert buffer.data_ptr() % PAGE == 0 and buffer.numel() == size and buffer.dtype == torch.uint8
    assert page_aligned(1) == PAGE and page_aligned(PAGE) == PAGE and page_aligned(0) == 0


@pytest.mark.parametrize("size", [3 * PAGE + 123, 5 * PAGE])  # the last page read whole, past the end, or not
def test_a_cold_file_is_read_around_the_page_cache_in_chunks_that_all_arrive(tmp_path, monkeypatch, size):
    monkeypatch.setattr(fileread, "READ_CHUNK", 2 * PAGE)
    path, data = _file(tmp_path, size, cached=False)
    buffer, chunks = page_aligned_empty(page_aligned(size)), []
    direct = read_file(path, size, buffer, direct=True, on_chunk=lambda c: chunks.append(bytes(c)))
    assert bytes(buffer[:size].numpy()) == data and b"".join(chunks) == data and len(chunks) == -(-size // (2 * PAGE))
    assert direct == takes_direct_reads(path)
    if direct:
        assert cached_share(path, size) == 0.0  # nothing went through the page cache


def test_a_file_mostly_in_the_page_cache_is_copied_from_it(tmp_path):
    path, data = _file(tmp_path, 8 * PAGE, cached=True)
    assert cached_share(path, len(data)) == 1.0
    buffer = page_aligned_empty(len(data))
    assert read_file(path, len(data), buffer, direct=True) is False
    assert bytes(buffer.numpy()) == data


def test_reads_go_through_the_page_cache_unless_asked_and_able(tmp_path):
    path, data = _file(tmp_path, 4 * PAGE + 7, cached=False)
    aligned = page_aligned_empty(page_aligned(len(data)))
    assert read_file(path, len(data), aligned, direct=False) is False  # not asked
    _file(tmp_path, len(data), cached=False)
    unaligned = page_aligned_empty(page_aligned(len(data)) + 64)[64:]  # not on a page
    assert read_file(path, len(data), unaligned, direct=True) is False and bytes(unaligned[:len(data)].numpy())
    short = torch.empty(len(data), dtype=torch.uint8)  # no room for the last page read whole
    path, data = _file(tmp_path, len(data), cached=False)
    assert read_file(path, len(data), short, direct=True) is False and bytes(short.numpy()) == data


@pytest.mark.parametrize("refused", ["open", "read"])
def test_a_filesystem_that_refuses_direct_reads_is_read_through_the_page_cache(tmp_path, monkeypatch, refused):
    """tmpfs refuses O_DIRECT at open; some filesystems only at the first read."""
    path, data = _file(tmp_path, 6 * PAGE, cached=False)
    real_open, real_preadv = os.open, os.preadv
    direct_fds = set()

    def fake_open(p, flags, *args):
        if flags & os.O_DIRECT and refused == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(p, flags & ~os.O_DIRECT, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def fake_preadv(fd, buffers, offset, *args):
        if fd in direct_fds:
            direct_fds.discard(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(fileread.os, "open", fake_open)
    monkeypatch.setattr(fileread.os, "preadv", fake_preadv)
    buffer = page_aligned_empty(len(data))
    assert read_file(path, len(data), buffer, direct=True) is False
    assert bytes(buffer.numpy()) == data


def test_a_file_shorter_than_told_or_a_buffer_too_small_is_an_error(tmp_path):
    path, data = _file(tmp_path, 2 * PAGE, cached=False)
    with pytest.raises(EOFError, match="ends at byte 8192"):
        read_file(path, 3 * PAGE, page_aligned_empty(3 * PAGE), direct=True)
    with pytest.raises(ValueError, match="cannot hold"):
        read_file(path, len(data), torch.empty(PAGE, dtype=torch.uint8), direct=False)
