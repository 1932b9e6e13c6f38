"""Atomic writes: the old file or the complete new one, never a torn one, and no temp file left."""

from __future__ import annotations

import os
import stat

import pytest

from flexorch.contract.atomic import atomic_write_bytes, atomic_write_text, atomic_writer


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "new" / "out.txt"  # missing folders are created
    atomic_write_text(path, "first é")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["out.txt"]


def test_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.pkl"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(path) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.pkl"]


def test_permissions_follow_the_umask(tmp_path):
    # Like a plain open(): a temp file's private 0600 must not leak into the output.
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "out", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o644
