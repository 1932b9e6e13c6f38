"""Background shard loading: while the device computes shard k, a thread reads shard k+1.

Two slots bound memory: the shard being computed and the one being loaded — the loader takes a
slot before reading and the consumer gives it back when it is done with the shard, so a third
shard is never resident. With one slot (EngineSettings.double_buffer off, where memory allows no
second shard) the same code reads each shard after the previous one is computed. Each slot owns a flat byte buffer on the device, reused for every shard
it carries. On CUDA, file bytes land in a pinned host staging buffer and reach the slot with one
non-blocking copy on a side stream; the consumer waits on that copy's event, and the loader waits
on the consumer's "done" event before overwriting a slot, so neither side ever blocks the other's
stream needlessly. On CPU the slot buffer is the read target itself: the same code, no copy.

The edges do not size the slots (contract/shards.py): a head larger than the largest decoder shard
comes in steps of vocabulary rows, and with `gather` (the engine) the embedding, a lookup, is read
per pass as the rows of the token ids the pass holds (unique, sorted, each run of consecutive ids
one read), which the engine hands over with `embed_ids` before it asks for the pass's first shard. A pass holding more distinct
ids than a slot has rows gets a buffer of its own: at most one row per token of the pass, so no
larger than the pass's embedding output.

Resident (EngineSettings.resident, chosen by the planner when the whole model fits on the device
and re-reading it would cost time): no slots; each shard gets a buffer of its own the first time
it is read and stays in a `ResidentShards` the worker keeps across its rounds, so the model is read
once per worker instead of once per pass and round.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from flexorch.contract.choices import on_cpu
from flexorch.contract.manifest import LM_HEAD
from flexorch.contract.shards import Shard, gathered
from flexorch.weights.compression import decompress_layer
from flexorch.workers.fileread import page_aligned_empty
from flexorch.workers.layerfile import LayerwiseModel, aligned


@dataclass
class LoadedShard:
    shard: Shard
    step: int  # which pass (generation step) this load belongs to
    tensors: dict[str, dict[str, torch.Tensor]]  # layer name → its tensors, on the device
    nbytes: int  # bytes read from disk
    slot: int
    ready: object = None  # torch.cuda.Event the consumer waits on (CUDA only)
    embed_ids: torch.Tensor | None = None  # a gathered embedding: (n,) the sorted vocabulary ids of its rows


@dataclass
class LoaderStats:
    bytes_read: int = 0
    read_seconds: float = 0.0  # time the loader thread spent reading and copying
    wait_seconds: float = 0.0  # time the consumer waited for a shard (loading not hidden)
    errors: list = field(default_factory=list)


_DONE = object()
_NO_SLOT = -1  # a resident shard's buffer is its own


class ResidentShards:
    """Shards kept on the device once read: shard (the steps of a shard apart) → layer name → tensors."""

    def __init__(self):
        self.tensors: dict[Shard, dict[str, dict[str, torch.Tensor]]] = {}


class ShardLoader:
    """Iterate the shards of `passes` passes over the model, loaded ahead on a background thread.

    Use as a context manager; `next_shard()` returns the next LoadedShard, `release(loaded)`
    returns its slot once the compute that uses it has been issued.
    """

    def __init__(self, model: LayerwiseModel, shards: list[Shard], device: torch.device, dtype: torch.dtype,
                 passes: int = 1, verify: bool = True, resident: ResidentShards | None = None, slots: int = 2,
                 gather: bool = False, direct: bool = False, start: tuple[int, int] = (0, 0)):
        self.model, self.shards, self.device, self.dtype = model, shards, device, dtype
        self.start = start  # (pass, shard position) of the first shard: a round resumed from a checkpoint
        self.passes, self.verify, self.resident, self.direct = passes, verify, resident, direct
        self.stats = LoaderStats()
        # Gathered, the embedding (one that can be: contract/shards.py `gathered`) does not size the
        # slots; resident, it is kept whole for every pass and round.
        self._gathered = {s.index for s in shards if gather and resident is None and self._gathers(s)}
        sized = [s for s in shards if s.index not in self._gathered]
        slot_bytes = max((self._step_bytes(s) for s in sized), default=0)
        self.slot_bytes = slot_bytes
        self._ids: queue.Queue = queue.Queue()  # per pass: the token ids the embedding is gathered for
        cuda = not on_cpu(device)
        # Slots live where the compute reads them; on CUDA, file bytes stage through pinned memory.
        if resident is not None:
            slots = 0
        self._slots = [self._empty(slot_bytes) for _ in range(slots)]
        self._staging = page_aligned_empty(slot_bytes, pin_memory=True) if cuda else None
        self._copy_stream = torch.cuda.Stream(device) if cuda else None
        self._slot_done = [None, None]  # CUDA events: compute finished with the slot's last shard
        self._free_slots: queue.Queue[int] = queue.Queue()
        for slot in range(len(self._slots)):
            self._free_slots.put(slot)
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flexorch-loader", daemon=True)

    def __enter__(self) -> "ShardLoader":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._free_slots.put(-1)  # wake the loader if it waits for a slot
        self._ids.put(None)  # or for a pass's token ids
        self._thread.join()

    def embed_ids(self, input_ids: torch.Tensor) -> None:
        """The token ids of the next pass (any shape), before its first shard is asked for: the rows
        its gathered embedding holds. Ignored where no embedding is gathered here."""
        if self._gathered:
            self._ids.put(torch.unique(input_ids.flatten()))  # sorted

    # -- consumer side ---------------------------------------------------------------------------
    def next_shard(self) -> LoadedShard:
        start = time.perf_counter()
        item = self._ready.get()
        self.stats.wait_seconds += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise item
        if item is _DONE:
            raise StopIteration
        if item.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(item.ready)
        return item

    def release(self, loaded: LoadedShard) -> None:
        """The compute using `loaded` has been issued; its slot may be refilled after it completes."""
        if loaded.slot == _NO_SLOT:
            return  # resident: the tensors stay for the next pass and round
        if self._copy_stream is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._slot_done[loaded.slot] = done
        loaded.tensors.clear()
        self._free_slots.put(loaded.slot)

    # -- loader thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            for step in range(self.passes):
                for position, shard in enumerate(self.shards):
                    if (step, position) < self.start:
                        continue
                    if self.resident is not None and shard in self.resident.tensors:
                        self._ready.put(LoadedShard(shard, step, self.resident.tensors[shard], 0, _NO_SLOT))
                        continue
                    slot = self._free_slots.get() if self.resident is None else _NO_SLOT
                    if self._stop.is_set():
                        return
                    loaded = self._load(shard, step, slot)
                    if loaded is None:  # closed while waiting for a pass's token ids
                        return
                    if self.resident is not None:
                        self.resident.tensors[shard] = loaded.tensors
                    self._ready.put(loaded)
            self._ready.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it in the main thread
            self._ready.put(exc)

    def _gathers(self, shard: Shard) -> bool:
        return len(shard.names) == 1 and gathered(self.model.entry(shard.names[0]))

    def _head_rows(self, shard: Shard, name: str) -> tuple[int, int] | None:
        """The vocabulary rows of layer `name` this step reads: a head step's, else None (all of it)."""
        return shard.rows if shard.rows is not None and self.model.entry(name).kind == LM_HEAD else None

    def _part_bytes(self, shard: Shard, name: str) -> int:
        """Slot bytes of layer `name` in this step: a range of head rows, or model.part_bytes."""
        rows = self._head_rows(shard, name)
        if rows is not None:
            return aligned((rows[1] - rows[0]) * self.model.row_bytes(name))
        return self.model.part_bytes(name, shard.experts)

    def _step_bytes(self, shard: Shard) -> int:
        return sum(self._part_bytes(shard, name) for name in shard.names)

    def _buffers(self, size: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(destination on the device, read target) for `size` bytes: the slot's (and the staging
        buffer) where they fit, else buffers of their own (resident shards, a large gather)."""
        fits = size <= self.slot_bytes
        if slot != _NO_SLOT and fits:
            destination = self._slots[slot]
        else:
            destination = self._empty(size)
        if self._staging is None:
            return destination, destination
        return destination, self._staging if fits else page_aligned_empty(size, pin_memory=True)

    def _empty(self, size: int) -> torch.Tensor:
        """A buffer on the device; on the CPU page-aligned, a direct read's target (workers/fileread.py)."""
        if on_cpu(self.device):
            return page_aligned_empty(size)
        return torch.empty(size, dtype=torch.uint8, device=self.device)

    def _load(self, shard: Shard, step: int, slot: int) -> LoadedShard | None:
        start = time.perf_counter()
        if shard.index in self._gathered:
            return self._gather(shard, step, slot, start)
        destination, target = self._buffers(self._step_bytes(shard), slot)
        views, offset, nbytes = {}, 0, 0
        for name in shard.names:
            size, rows = self._part_bytes(shard, name), self._head_rows(shard, name)
            if rows is not None:
                views[name] = {"weight": self.model.read_rows_into(name, [rows], target[offset:offset + size],
                                                                   verify=self.verify)}
                nbytes += (rows[1] - rows[0]) * self.model.row_bytes(name)
            else:
                views[name] = self.model.read_part_into(name, shard.experts, target[offset:offset + size],
                                                        verify=self.verify, direct=self.direct)
                nbytes += (self.model.layer_bytes(name) if shard.experts is None
                           else sum(spec.end - spec.start for spec in self.model.part_specs(name, shard.experts)))
            offset += size
        return self._finish(shard, step, slot, views, nbytes, offset, destination, target, start)

    def _gather(self, shard: Shard, step: int, slot: int, start: float) -> LoadedShard | None:
        """The embedding rows of the pass's token ids (embed_ids); None once closed."""
        ids = self._ids.get()
        if ids is None:
            return None
        name = shard.names[0]
        size = ids.numel() * self.model.row_bytes(name)
        destination, target = self._buffers(aligned(size), slot)
        weight = self.model.read_rows_into(name, _runs(ids), target, verify=self.verify)
        views = {name: {"weight": weight}}
        loaded = self._finish(shard, step, slot, views, size, size, destination, target, start)
        loaded.embed_ids = ids
        return loaded

    def _finish(self, shard: Shard, step: int, slot: int, views, nbytes: int, offset: int,
                destination: torch.Tensor, target: torch.Tensor, start: float) -> LoadedShard:
        """The read views on the device, in the compute dtype."""
        ready = None
        if self._copy_stream is not None:
            with torch.cuda.stream(self._copy_stream):
                if slot != _NO_SLOT and self._slot_done[slot] is not None:  # compute may still read its last shard
                    self._copy_stream.wait_event(self._slot_done[slot])
                destination[:offset].copy_(target[:offset], non_blocking=True)
                views = {name: self._rebase(tensors, target, destination) for name, tensors in views.items()}
                views = self._convert(views)
                ready = torch.cuda.Event()
                ready.record(self._copy_stream)
            ready.synchronize()  # the staging buffer is reused by the next read
        else:
            views = self._convert(views)
        self.stats.bytes_read += nbytes
        self.stats.read_seconds += time.perf_counter() - start
        return LoadedShard(shard, step, views, nbytes, slot, ready)

    @staticmethod
    def _rebase(tensors: dict[str, torch.Tensor], source: torch.Tensor, target: torch.Tensor):
        """Views of `source` → the same views of `target` (same offsets, other buffer)."""
        base = source.data_ptr()
        out = {}
        for name, t in tensors.items():
            start = t.data_ptr() - base
            flat = target[start:start + t.numel() * t.element_size()]
            out[name] = flat.view(t.dtype).view(t.shape)
        return out

    def _convert(self, views: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """Compressed weights dequantised, floating tensors in the compute dtype (a copy only where
        the stored dtype differs): on the device, right after the read."""
        out = {}
        for name, tensors in views.items():
            plain = decompress_layer(tensors, self.dtype)
            out[name] = {k: self._to_compute_dtype(t) if k in tensors else self._for_compute(t)
                         for k, t in plain.items()}
        return out

    def _to_compute_dtype(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point() or tensor.dtype == self.dtype:
            return tensor
        return self._for_compute(tensor.to(self.dtype))

    def _for_compute(self, made: torch.Tensor) -> torch.Tensor:
        if self._copy_stream is not None:
            # made on the copy stream, used on the compute stream: the caching allocator must not
            # hand its memory to the copy stream again before the compute is done with it
            made.record_stream(torch.cuda.default_stream(self.device))
        return made


def _runs(ids: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted unique ids (n,) → [(first, end)] of their runs of consecutive ids: one read each."""
    values = ids.tolist()
    runs = []
    for i in values:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(first, end) for first, end in runs]
