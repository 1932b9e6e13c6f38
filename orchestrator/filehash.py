"""sha256 of large files, remembered between runs so a 140 GB checkpoint is hashed once.

A stored digest is reused while the file's size, mtime (ns) and inode are those it was computed
for; a file written over in place (a fine-tune re-saved with the same shapes) changes its mtime and
is hashed again. The store is a cache: a missing or unreadable one is rebuilt, never an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from flexorch.contract.atomic import atomic_write_text
from flexorch.contract.errors import UserError
from flexorch.contract.manifest import read_json_object
from flexorch.contract.verified import sha256_file


class HashStore:
    """Digests by resolved path, valid for one (size, mtime_ns, inode); `save()` writes them back."""

    def __init__(self, store: Path):
        self.store = store
        try:
            self.entries: dict = read_json_object(store) if store.is_file() else {}
        except UserError:  # a damaged cache is rebuilt
            self.entries = {}
        self.changed = False

    def digest(self, path: Path) -> str:
        stat = path.stat()
        key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        known = self.entries.get(key)
        if isinstance(known, dict) and known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
            return known["sha256"]
        digest = sha256_file(path)
        self.entries[key] = {"stamp": stamp, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        if self.changed:
            self.store.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.store, json.dumps(self.entries, indent=0) + "\n")
            self.changed = False
