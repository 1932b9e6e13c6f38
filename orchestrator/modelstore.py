"""Where a job's `model:` points: a layerwise dir as it is, or a Hugging Face checkpoint dir
converted once into a cache dir (`<cache>/models/<key>`) and reused by later jobs.

The key is derived from everything the scores depend on: config.json, the index, the generation
config and tokenizer files, and each weight file's name, size and sha256 of its content. Content
hashes are remembered in `<cache>/hashes.json` by size, mtime and inode (orchestrator/filehash.py),
so a 140 GB checkpoint is read once; a checkpoint re-saved in place with new weights of the same
shapes gets new mtimes, is hashed again, and gets a new key and a fresh conversion.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from pathlib import Path

from flexorch.orchestrator.filehash import HashStore
from flexorch.orchestrator.prepare import COPIED_FILES, CONFIG_NAME, prepare_checkpoint, weight_files, weights_marker
from flexorch.contract.errors import UserError
from flexorch.contract.leftovers import prepare_temps, remove_dead
from flexorch.contract.manifest import FORMAT_VERSION, is_layerwise_dir

HASHES_NAME = "hashes.json"


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
    remove_dead(models, prepare_temps())  # the cache is ours: any conversion a kill cut short
    hashes = HashStore(models.parent / HASHES_NAME)
    key = checkpoint_key(path, hashes)
    hashes.save()
    target = models / key
    with _exclusive(models / f"{key}.lock"):  # a second resolver waits, then finds the dir made
        if not is_layerwise_dir(target):
            # force: a dir without a manifest there is not ours to keep (prepare renames complete dirs in)
            prepare_checkpoint(path, target, force=True, console=console)
    return target


def checkpoint_key(path: Path, hashes: HashStore) -> str:
    """`<dir name>-<digest>`: readable in a listing of the cache, unique by content."""
    _fmt, index, files = weight_files(path)
    digest = hashlib.sha256(f"flexorch layerwise v{FORMAT_VERSION}\n".encode())
    small = [path / name for name in COPIED_FILES if (path / name).is_file()] + ([index] if index else [])
    for file in small:
        digest.update(f"\n{file.name}\n".encode() + file.read_bytes())
    for file in files:
        digest.update(f"\n{file.name}\n{file.stat().st_size}\n{hashes.digest(file)}".encode())
    resolved = path.resolve()
    # a hub cache snapshot (orchestrator/hub.py): named by its repo, not by its revision hash
    name = resolved.parent.parent.name.removeprefix("models--") if resolved.parent.name == "snapshots" \
        else resolved.name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "model"
    return f"{name}-{digest.hexdigest()[:20]}"


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
