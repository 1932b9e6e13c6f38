"""What a killed run leaves on disk, and removing it once its owner is gone.

Every temporary file or dir flexorch makes carries the pid of the process that made it: atomic
writes (`.<name>.<pid>.<hex>.tmp`), `prepare`'s build dirs (`.<dst>.tmp-<pid>`, `.<dst>.old-<pid>`),
activation dirs of `storage: disk` (`activations-<pid>-...`), the executor's task files
(`flexorch-tasks-<pid>-...`). A later run removes those whose pid no longer runs; one whose pid is
alive (its owner, or a recycled pid) is left alone, so two jobs sharing a folder never remove each
other's files. Each name is made here, beside the pattern that matches it, so the two cannot drift.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PidDirs:
    """Dirs made by tempfile.mkdtemp(prefix=...): `<stem>-<pid>-<random>`."""

    stem: str

    def prefix(self) -> str:
        """This process's prefix, for tempfile.mkdtemp."""
        return f"{self.stem}-{os.getpid()}-"

    def match(self, name: str) -> re.Match | None:
        """Group 1: the owner's pid (remove_dead's pattern)."""
        return re.match(rf"^{re.escape(self.stem)}-(\d+)-", name)


ACTIVATIONS = PidDirs("activations")  # storage disk: a worker's activation files
TASKS = PidDirs("flexorch-tasks")  # the local executor's task files


def atomic_temp(path: Path) -> Path:
    """The temp file an atomic write to `path` goes to first (contract/atomic.py)."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def atomic_temps(name: str = ".+") -> re.Pattern:
    """Temp files of atomic writes to `name` (contract/atomic.py), or to any name in a folder we own."""
    return re.compile(rf"^\.{name if name == '.+' else re.escape(name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp$")


def prepare_build_dir(dst: Path) -> Path:
    """Where `flexorch prepare` builds `dst` before moving it in place."""
    return dst.parent / f".{dst.name}.tmp-{os.getpid()}"


def prepare_old_dir(dst: Path) -> Path:
    """Where `prepare --force` moves the old `dst` until the new one is in."""
    return dst.parent / f".{dst.name}.old-{os.getpid()}"


def prepare_temps(name: str = ".+") -> re.Pattern:
    """Build dirs of `flexorch prepare` into `name` (orchestrator/prepare.py), or into any name."""
    return re.compile(rf"^\.{name if name == '.+' else re.escape(name)}\.(?:tmp|old)-(\d+)$")


def pid_alive(pid: int) -> bool:
    if not 0 < pid < 2**31:  # kill(0) would mean our own process group; no OS hands out larger pids
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_dead(folder: str | Path, pattern: re.Pattern | PidDirs) -> list[Path]:
    """Remove the entries of `folder` whose name matches `pattern` (group 1: the owner's pid) and
    whose owner is gone; returns what was removed. A missing folder holds nothing."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or pid_alive(int(match[1])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
