"""Atomic file writes: a reader (or a resumed job) sees the old file or the complete new one, never
a torn one, even if the process is killed or the machine loses power mid-write.

The data goes to a temporary file in the same directory (so the rename stays on one filesystem),
which is flushed and fsynced before `os.replace` puts it in place; the directory is fsynced after
the rename so the rename itself survives a crash.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from flexorch.contract.leftovers import atomic_temp


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """Open a binary file that replaces `path` only when the `with` block completes.

    Streams large outputs (pickle.dump into it) without holding all the bytes in memory. If the
    block raises, the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_temp(path)
    # os.open with mode 0o666 lets the umask decide the permissions, as for a plain open();
    # tempfile would leave the output readable by its owner only.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    done = False
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX); Windows cannot open a directory, and needs not."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
