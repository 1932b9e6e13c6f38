"""Where a job's `model:` points: a layerwise dir as it is, or a Hugging Face checkpoint dir
converted once into a cache dir (`<cache>/models/<key>`) and reused by later jobs.

The key is derived from the checkpoint's content without reading its weights: config.json, the
index, and per weight file its name, size and header (a safetensors header lists every tensor's
dtype, shape and offsets; a pytorch file's first and last MiB hold its pickle and zip directory).
A checkpoint re-saved with other values but the same header keeps its key: re-run
`flexorch prepare` by hand for that.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import struct
from pathlib import Path

from flexorch.orchestrator.prepare import CONFIG_NAME, prepare_checkpoint, weight_files, weights_marker
from flexorch.contract.errors import UserError
from flexorch.contract.manifest import FORMAT_VERSION, is_layerwise_dir

_MIB = 1 << 20
_MAX_HEADER = 100_000_000  # a corrupt length must not read a whole shard; prepare reports the file


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLEXORCH_CACHE") or Path.home() / ".cache" / "flexorch")


def is_hf_checkpoint(path: str | Path) -> bool:
    """A dir with a config.json and weight files in a layout `flexorch prepare` reads."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and weights_marker(path) is not None


def resolve_model(path: str | Path, cache_dir: Path | None = None, console=None) -> Path:
    """The layerwise dir to run `path` from, preparing a Hugging Face checkpoint into the cache once."""
    path = Path(path)
    if is_layerwise_dir(path):
        return path
    if not is_hf_checkpoint(path):
        raise UserError(f"{path}: neither a layerwise dir (flexorch prepare) nor a Hugging Face checkpoint dir")
    models = Path(cache_dir or default_cache_dir()) / "models"
    models.mkdir(parents=True, exist_ok=True)
    key = checkpoint_key(path)
    target = models / key
    with _exclusive(models / f"{key}.lock"):  # a second resolver waits, then finds the dir made
        if not is_layerwise_dir(target):
            # force: a dir without a manifest there is not ours to keep (prepare renames complete dirs in)
            prepare_checkpoint(path, target, force=True, console=console)
    return target


def checkpoint_key(path: Path) -> str:
    """`<dir name>-<digest>`: readable in a listing of the cache, unique by content."""
    _fmt, index, files = weight_files(path)
    digest = hashlib.sha256(f"flexorch layerwise v{FORMAT_VERSION}\n".encode())
    digest.update((path / CONFIG_NAME).read_bytes())
    if index is not None:
        digest.update(index.read_bytes())
    for file in files:
        digest.update(f"\n{file.name}\n{file.stat().st_size}\n".encode())
        digest.update(_file_fingerprint(file))
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.resolve().name) or "model"
    return f"{name}-{digest.hexdigest()[:20]}"


def _file_fingerprint(file: Path) -> bytes:
    with open(file, "rb") as f:
        if file.suffix == ".safetensors":
            head = f.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            return head + f.read(min(length, _MAX_HEADER))
        first = f.read(_MIB)
        f.seek(max(0, file.stat().st_size - _MIB))
        return first + f.read(_MIB)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
