"""What a killed run leaves on disk, and removing it once its owner is gone.

Every temporary file or dir flexorch makes carries the pid of the process that made it: atomic
writes (`.<name>.<pid>.<hex>.tmp`), `prepare`'s build dirs (`.<dst>.tmp-<pid>`, `.<dst>.old-<pid>`),
activation dirs of `storage: disk` (`activations-<pid>-...`), the executor's task files
(`flexorch-tasks-<pid>-...`). A later run removes those whose pid no longer runs; one whose pid is
alive (its owner, or a recycled pid) is left alone, so two jobs sharing a folder never remove each
other's files.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

ACTIVATIONS = re.compile(r"^activations-(\d+)-")
TASKS = re.compile(r"^flexorch-tasks-(\d+)-")


def atomic_temps(name: str = ".+") -> re.Pattern:
    """Temp files of atomic writes to `name` (contract/atomic.py), or to any name in a folder we own."""
    return re.compile(rf"^\.{name if name == '.+' else re.escape(name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp$")


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


def remove_dead(folder: str | Path, pattern: re.Pattern) -> list[Path]:
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
