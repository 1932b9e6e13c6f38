"""Where each batch's hidden states wait between shards: on the device, in host RAM, or on disk.

One interface, three stores. Memory is bounded by construction: `gpu` holds every batch on the
device, `cpu` holds them in (pinned, on CUDA) host memory, `disk` holds only the batch in flight —
each batch is a safetensors file (no pickle), overwritten in place shard after shard.

Keys are batch ids, or tuples of ints: the KV cache (workers/kvcache.py) keeps each decoder layer's
keys and values per batch in a store of the same tier, under (layer, batch, block).

A checkpoint (workers/checkpoint.py) takes what a store holds (`save_held`) and puts it back into a
fresh store (`restore`): the memory tiers write it to files; the disk tier's files are already on
the disk, so it hard-links them (a batch is written to a new file and renamed over the old one, so
a link keeps the state it was taken at).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flexorch.contract.leftovers import ACTIVATIONS
from flexorch.contract.choices import Storage, on_cpu


Key = int | tuple[int, ...]


def key_name(batch_id: Key) -> str:
    """A key as a file name: batch000003, or batch000001-000003-000000 for a tuple key."""
    parts = batch_id if isinstance(batch_id, tuple) else (batch_id,)
    return f"batch{'-'.join(f'{part:06d}' for part in parts)}.safetensors"


def name_key(name: str) -> Key:
    """The key `key_name` made `name` of (ValueError if it is none)."""
    if not (name.startswith("batch") and name.endswith(".safetensors")):
        raise ValueError(f"not a batch file: {name}")
    parts = tuple(int(part) for part in name[len("batch"):-len(".safetensors")].split("-"))
    return parts if len(parts) > 1 else parts[0]


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` at `target` (no bytes move); a copy where the two lie on different filesystems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


class ActivationStore:
    """hidden: (rows, L, d_model) per batch id."""

    def put(self, batch_id: Key, hidden: torch.Tensor) -> None:
        raise NotImplementedError

    def get(self, batch_id: Key, keep: bool = False) -> torch.Tensor:
        """The tensor put under `batch_id`, on the device; `keep`: it will be read again (the KV
        cache's prompt block, read at every generation step), so the store does not drop it."""
        raise NotImplementedError

    def prefetch(self, batch_id: Key) -> None:
        """A hint: `batch_id` is the next one to be read."""

    def discard(self, batch_id: Key) -> None:
        """Free what is kept under `batch_id`, if anything (a generated sequence's cache once it ended)."""

    def close(self) -> None:
        """Free everything the store holds."""

    def held(self) -> dict:
        """Every tensor the store holds, by key, readable on the host (a memory tier's)."""
        raise NotImplementedError

    def save_held(self, folder: Path, prefix: str) -> dict[str, int]:
        """Write what the store holds into `folder` as `<prefix>-<key_name>` files; their names and sizes."""
        files = {}
        for batch_id, tensor in self.held().items():
            name = f"{prefix}-{key_name(batch_id)}"
            save_file({"hidden": tensor.detach().contiguous().cpu()}, folder / name)
            files[name] = (folder / name).stat().st_size
        return files

    def restore(self, files: dict) -> None:
        """Put back what `save_held` wrote: {key: its file}, each checked complete by the caller."""
        for batch_id, path in files.items():
            self.put(batch_id, load_file(path, "cpu")["hidden"].to(self.device))


class DeviceStore(ActivationStore):
    """Activations stay where they were computed (storage: gpu; on a CPU worker, RAM)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self._batches: dict[int, torch.Tensor] = {}

    def put(self, batch_id, hidden):
        self._batches[batch_id] = hidden

    def get(self, batch_id, keep=False):
        return self._batches[batch_id] if keep else self._batches.pop(batch_id)

    def discard(self, batch_id):
        self._batches.pop(batch_id, None)

    def close(self):
        self._batches.clear()

    def held(self):
        return dict(self._batches)


class HostStore(ActivationStore):
    """Activations in host RAM between shards (storage: cpu), pinned so copies are asynchronous.

    On CUDA each put records an event after its device-to-host copy, and a get waits for that
    event alone: by then it has long completed (the batch was put a shard ago), where waiting for
    the stream would also wait for every kernel queued since, draining the GPU's pipeline at each
    batch of each shard."""

    def __init__(self, device: torch.device):
        self.device = device
        self._batches: dict[Key, tuple[torch.Tensor, object]] = {}  # key → (host copy, its copy's event)
        self._pin = not on_cpu(device)

    def put(self, batch_id, hidden):
        host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=self._pin)
        host.copy_(hidden, non_blocking=self._pin)
        copied = None
        if self._pin:
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))
        self._batches[batch_id] = (host, copied)

    def get(self, batch_id, keep=False):
        host, copied = self._batches[batch_id] if keep else self._batches.pop(batch_id)
        if copied is not None:  # the put's device-to-host copy must have landed
            copied.synchronize()
        return host.to(self.device, non_blocking=self._pin)

    def discard(self, batch_id):
        self._batches.pop(batch_id, None)

    def close(self):
        self._batches.clear()

    def held(self):
        for _, copied in self._batches.values():
            if copied is not None:
                copied.synchronize()
        return {batch_id: host for batch_id, (host, _) in self._batches.items()}


class DiskStore(ActivationStore):
    """One safetensors file per batch in a private folder inside `folder`, removed on close.

    Reads and writes go through one I/O thread, so the next batch is read and the last one
    written while the device computes the current one; RAM holds at most those three batches.
    One thread keeps the order: a batch is always written before it is read back.
    """

    def __init__(self, folder: str | Path, device: torch.device):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.device = device
        # The pid in the name lets a later run remove what a killed one left (contract/leftovers.py).
        self.root = Path(tempfile.mkdtemp(prefix=ACTIVATIONS.prefix(), dir=folder))
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flexorch-activations")
        self._reads: dict[int, Future] = {}
        self._write: Future | None = None

    def _path(self, batch_id: Key) -> Path:
        return self.root / key_name(batch_id)

    def put(self, batch_id, hidden):
        self._wait_for_write()  # at most one batch waits to be written
        host = hidden.contiguous().cpu()
        self._write = self._io.submit(self._save, host, self._path(batch_id))

    @staticmethod
    def _save(host: torch.Tensor, path: Path) -> None:
        """A new file renamed over the old: a checkpoint's hard link to the old one keeps its bytes."""
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"hidden": host}, tmp)
        os.replace(tmp, path)

    def save_held(self, folder, prefix):
        """Links to the batch files (they are on the disk already): no byte is written."""
        self._wait_for_write()
        files = {}
        for path in sorted(self.root.glob("batch*.safetensors")):
            name = f"{prefix}-{path.name}"
            _link_or_copy(path, folder / name)
            files[name] = path.stat().st_size
        return files

    def restore(self, files):
        for batch_id, path in files.items():
            _link_or_copy(path, self._path(batch_id))

    def prefetch(self, batch_id):
        if batch_id not in self._reads:
            self._reads[batch_id] = self._io.submit(load_file, self._path(batch_id), "cpu")

    def get(self, batch_id, keep=False):  # the file stays until close (or the next put): `keep` holds
        self.prefetch(batch_id)
        return self._reads.pop(batch_id).result()["hidden"].to(self.device)

    def discard(self, batch_id):
        self._wait_for_write()  # a pending write of it must not land after the unlink
        read = self._reads.pop(batch_id, None)
        if read is not None:
            read.result()
        self._path(batch_id).unlink(missing_ok=True)

    def _wait_for_write(self) -> None:
        if self._write is not None:
            self._write.result()  # raises the write's error (e.g. a full disk) here
            self._write = None

    def close(self):
        try:
            self._wait_for_write()
        finally:
            self._io.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(self.root, ignore_errors=True)


def make_store(storage: Storage, device: torch.device, disk_folder: str | None) -> ActivationStore:
    if storage.on_disk:
        return DiskStore(disk_folder or tempfile.gettempdir(), device)
    # storage cpu on a CPU device: RAM is the device
    return DeviceStore(device) if storage.on_device or on_cpu(device) else HostStore(device)
