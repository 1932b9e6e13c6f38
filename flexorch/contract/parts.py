"""Parts: one committed round of a worker's results, the resume granularity.

Parts are numpy `.npz` files written to a temporary file, flushed, fsynced and renamed into
`parts/`, so a part on disk is always complete. They are read back with `allow_pickle=False`:
a part holds arrays only, never code.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flexorch.contract.atomic import atomic_writer
from flexorch.contract.errors import UserError
from flexorch.contract.messages import Round
from flexorch.contract.protocol import PromptResult, ScoreKind

PART_SUFFIX = ".npz"


class DiskFullError(OSError):
    """The disk filled while committing a part; parts committed before are intact."""


def part_name(worker: str, rnd: Round) -> str:
    """Unique per prompt set, so runs with a different placement never overwrite each other's parts."""
    digest = hashlib.sha256(",".join(map(str, rnd.indices)).encode()).hexdigest()[:12]
    return f"part-{worker}-r{rnd.round_id:04d}-{digest}{PART_SUFFIX}"


def _part_arrays(kind: str, results: Sequence[PromptResult]) -> dict[str, np.ndarray]:
    arrays = {"indices": np.array([r.index for r in results], dtype=np.int64), "kind": np.array(kind)}
    for j, result in enumerate(results):
        if isinstance(result.scores, dict):
            for key, value in result.scores.items():
                arrays[f"s{j}_{key}"] = np.asarray(value)
        else:
            arrays[f"s{j}"] = np.asarray(result.scores)
        # generated: (n_suffixes, G-1); every suffix takes the same number of greedy steps
        n_suffixes = len(result.generated)  # 0 for suffix_logprob, which generates nothing
        generated = np.array(result.generated, dtype=np.int64)
        arrays[f"g{j}"] = generated.reshape(n_suffixes, -1) if n_suffixes else np.zeros((0, 0), np.int64)
    return arrays


def write_part(path: str | Path, kind: str, results: Sequence[PromptResult]) -> Path:
    """Commit `results` to `path` atomically (temp file, flush, fsync, rename, fsync dir).

    Raises DiskFullError naming the path when the disk is full; the temp file is removed and every
    part committed before stays as it was.
    """
    path = Path(path)
    arrays = _part_arrays(kind, results)
    try:
        with atomic_writer(path) as handle:
            np.savez(handle, **arrays)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                exc.errno, f"disk full while writing results to {path} (parts committed before are intact; "
                "free some space and resubmit to resume)"
            ) from exc
        raise
    return path


class PartError(UserError):
    """A committed part that cannot be read back (damaged after it was renamed into place)."""


@contextlib.contextmanager
def _opened(path: str | Path):
    """np.load of a part; whatever a damaged archive raises becomes PartError naming the file. zip
    checks each member's CRC-32 as it is read, so a flipped bit is found too, not only truncation."""
    try:
        with np.load(path, allow_pickle=False) as data:
            yield data
    except (OSError, ValueError, KeyError, EOFError, IndexError, TypeError, zipfile.BadZipFile, zlib.error) as exc:
        raise PartError(f"{path}: damaged part ({type(exc).__name__}: {str(exc)[:200]}); submit again to compute "
                        "its prompts anew, or use --restart") from None


def read_part_indices(path: str | Path) -> tuple[int, ...]:
    """The prompt indices a part holds (reads only that member of the archive)."""
    with _opened(path) as data:
        return tuple(int(i) for i in data["indices"])


def read_part(path: str | Path) -> list[PromptResult]:
    """Read a part back into PromptResults (arrays only: allow_pickle=False); PartError if damaged."""
    with _opened(path) as data:
        indices = [int(i) for i in data["indices"]]
        kind = str(data["kind"])
        results = []
        for j, index in enumerate(indices):
            if ScoreKind(kind).has_fields:  # suffix_logprob's and generate's named arrays
                prefix = f"s{j}_"
                scores = {key[len(prefix):]: data[key] for key in data.files if key.startswith(prefix)}
            else:
                scores = data[f"s{j}"]
            generated = tuple(tuple(int(t) for t in row) for row in data[f"g{j}"])
            results.append(PromptResult(index=index, scores=scores, generated=generated))
    return results
