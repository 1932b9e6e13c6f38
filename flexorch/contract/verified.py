"""Which layer files of a layerwise dir were hashed and matched their manifest digest, as they are now.

Verifying costs a full read and a sha256 of every file, which on a 2-core machine held a cold
stream at 0.63x the disk's rate (benchmark 4): once per job and worker, on the critical path of
every I/O-bound job. A file that matched is marked instead, in the dir's VERIFIED_DIR, by an empty
file named after the file's identity and the digest it matched: device, inode, size, modification
and change times (ns). Any write, truncation, copy or replacement of the file gives it another
identity (the change time cannot be set back), and a new manifest digest another name, so such a
file is hashed again; only an unchanged file skips it. `flexorch prepare` marks what it wrote.
File times tick in coarse steps (a jiffy): a file changed in the step in which it was marked would
keep its identity, so a mark counts only once it is newer than the file's last change (git's "racy
clean" rule); a racy one is hashed once more and marked again, later.
Where the dir cannot be written (a read-only share) nothing is marked and every job hashes, as
before. Torch-free: `flexorch prepare` and the workers share it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

VERIFIED_DIR = ".verified"


def sha256_file(path: Path) -> str:
    """A file's sha256, hex: the one digest of whole files (layer files, checkpoints, prompts)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def mark_path(model_dir: Path, file: str, sha256: str) -> tuple[Path, int]:
    """The mark of `file` (relative to `model_dir`) as it is now and digest `sha256`, and the time
    (ns) of the file's last change."""
    st = os.stat(model_dir / file)
    identity = f"{file}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{sha256}"
    name = hashlib.blake2b(identity.encode(), digest_size=20).hexdigest()
    return model_dir / VERIFIED_DIR / name, max(st.st_mtime_ns, st.st_ctime_ns)


def is_marked(model_dir: Path, file: str, sha256: str) -> bool:
    """Whether `file` matched `sha256` and has not changed since."""
    try:
        path, changed = mark_path(model_dir, file, sha256)
        return path.stat().st_mtime_ns > changed
    except OSError:
        return False


def unmarked_bytes(model_dir: Path, files: Iterable[tuple[str, str, int]]) -> int:
    """Of `files` ((file, sha256, size) each), the bytes not marked: what a verifying reader hashes."""
    return sum(size for file, sha256, size in files if not is_marked(model_dir, file, sha256))


def mark(model_dir: Path, file: str, sha256: str) -> bool:
    """Record that `file` as it is now matched `sha256`; False where the dir cannot be written."""
    try:
        path, _ = mark_path(model_dir, file, sha256)
        path.parent.mkdir(exist_ok=True)
        path.touch()  # an existing (racy) mark gets the time of now
    except OSError:
        return False
    return True
