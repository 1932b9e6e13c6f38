"""Where each batch's hidden states wait between shards: on the device, in host RAM, or on disk.

One interface, three stores. Memory is bounded by construction: `gpu` holds every batch on the
device, `cpu` holds them in (pinned, on CUDA) host memory, `disk` holds only the batch in flight —
each batch is a safetensors file (no pickle), overwritten in place shard after shard.

Keys are batch ids, or tuples of ints: the KV cache (workers/kvcache.py) keeps each decoder layer's
keys and values per batch in a store of the same tier, under (layer, batch, block).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


Key = int | tuple[int, ...]


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


class DeviceStore(ActivationStore):
    """Activations stay where they were computed (storage: gpu; on a CPU worker, RAM)."""

    def __init__(self):
        self._batches: dict[int, torch.Tensor] = {}

    def put(self, batch_id, hidden):
        self._batches[batch_id] = hidden

    def get(self, batch_id, keep=False):
        return self._batches[batch_id] if keep else self._batches.pop(batch_id)

    def discard(self, batch_id):
        self._batches.pop(batch_id, None)

    def close(self):
        self._batches.clear()


class HostStore(ActivationStore):
    """Activations in host RAM between shards (storage: cpu), pinned so copies are asynchronous.

    On CUDA each put records an event after its device-to-host copy, and a get waits for that
    event alone: by then it has long completed (the batch was put a shard ago), where waiting for
    the stream would also wait for every kernel queued since, draining the GPU's pipeline at each
    batch of each shard."""

    def __init__(self, device: torch.device):
        self.device = device
        self._batches: dict[Key, tuple[torch.Tensor, object]] = {}  # key → (host copy, its copy's event)
        self._pin = device.type == "cuda"

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
        self.root = Path(tempfile.mkdtemp(prefix=f"activations-{os.getpid()}-", dir=folder))
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flexorch-activations")
        self._reads: dict[int, Future] = {}
        self._write: Future | None = None

    def _path(self, batch_id: Key) -> Path:
        parts = batch_id if isinstance(batch_id, tuple) else (batch_id,)
        return self.root / f"batch{'-'.join(f'{part:06d}' for part in parts)}.safetensors"

    def put(self, batch_id, hidden):
        self._wait_for_write()  # at most one batch waits to be written
        host = hidden.contiguous().cpu()
        self._write = self._io.submit(save_file, {"hidden": host}, self._path(batch_id))

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


def make_store(storage: str, device: torch.device, disk_folder: str | None) -> ActivationStore:
    if storage == "gpu":
        return DeviceStore()
    if storage == "cpu":
        return DeviceStore() if device.type == "cpu" else HostStore(device)
    if storage == "disk":
        return DiskStore(disk_folder or tempfile.gettempdir(), device)
    raise ValueError(f"unknown activation storage {storage!r}")
