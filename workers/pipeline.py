"""Pipeline mode: several workers split the model's shards and hand each batch's activations on.

Shards are dealt out interleaved: with n stages, stage `s % n` owns shard s (the embedding, each
decoder group, norm + head). Why not contiguous stages (stage 0 the first third of the layers, ...)?
The engine is shard-major — a shard is streamed in once and every batch of the round goes through
it before the next shard comes (that is what makes streaming pay). A contiguous stage could hand a
batch on only after streaming ALL its layers over it, so stage 1 would wait for stage 0's whole
part of the model, and the stages would run one after the other. Interleaved, stage j computes
shard s while stage j+1 loads shard s+1 and consumes batches as they arrive: every stage reads only
its 1/n of the weights and all stages compute at once once the pipeline is full.

Activations of batch b after shard s go to the owner of shard s+1, which for n >= 2 is always the
next stage in the ring (stage (j+1) % n). Each link is a bounded channel (a multiprocessing Queue
between worker processes, a queue.Queue between threads in tests). A ring of bounded channels
deadlocks when every channel is full and every stage is sending, so each stage drains its inbound
channel on a receiver thread into an unbounded `_Inbox`, keyed by (round, step, shard, batch); the
engine takes the batch it needs from there, blocking on a Condition until it has arrived. The inbox
cannot grow without bound: a batch's activations exist in one place at a time, and no stage starts
the next generation step or round before the head stage has finished the current one (`StepDone`,
passed round the ring), so a stage holds at most one round's activations — the data mode's bound —
plus what the channels hold. A slow stage makes its upstream wait at that barrier, and on `put`
when its channel is full.

Tensors travel as numpy arrays (bfloat16 as its int16 bits), copied to the host first on CUDA: no
torch shared-memory file descriptors to leak when a stage dies, and a pickle of an array is a
single memcpy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from flexorch.workers.link import Link

# -- what travels on the ring ------------------------------------------------------------------------
@dataclass(frozen=True)
class Activation:
    """hidden: (rows, L, d_model) of one batch, for the shard that consumes it."""

    key: tuple  # ("act", round, step, shard, batch)
    dtype: str  # torch dtype name; bfloat16 travels as int16 bits (numpy has no bfloat16)
    data: np.ndarray


@dataclass(frozen=True)
class StepDone:
    """The head stage finished a generation step: the argmax ids every suffix appends next."""

    key: tuple  # ("step", round, step)
    origin: int  # the head stage: the ring forwards the message until it would reach it again
    next_ids: tuple[tuple[int, ...], ...]  # per prompt of the round, per suffix; () for suffix_logprob


@dataclass(frozen=True)
class _Close:
    """Put by a stage into its own inbound channel to stop its receiver thread."""


def to_message(key: tuple, hidden: torch.Tensor) -> Activation:
    host = hidden.detach().to("cpu").contiguous()
    if host.dtype == torch.bfloat16:
        return Activation(key, "bfloat16", host.view(torch.int16).numpy())
    return Activation(key, str(host.dtype).removeprefix("torch."), host.numpy())


def from_message(message: Activation) -> torch.Tensor:
    tensor = torch.from_numpy(message.data)
    return tensor.view(torch.bfloat16) if message.dtype == "bfloat16" else tensor


class _Inbox:
    """Messages that arrived, by key; `take` blocks until its key is there. Shared by the receiver
    thread (puts) and the engine's thread (takes) under one Condition."""

    def __init__(self):
        self._messages: dict[tuple, object] = {}
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self.waiting_batches = 0  # activations arrived and not taken yet
        self.peak_waiting_batches = 0

    def put(self, message) -> None:
        with self._changed:
            self._messages[message.key] = message
            if isinstance(message, Activation):
                self.waiting_batches += 1
                self.peak_waiting_batches = max(self.peak_waiting_batches, self.waiting_batches)
            self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._changed:
            self._error = error
            self._changed.notify_all()

    def take(self, key: tuple):
        with self._changed:
            self._changed.wait_for(lambda: key in self._messages or self._error is not None)
            if key not in self._messages:
                raise RuntimeError(f"pipeline receiver failed: {self._error!r}") from self._error
            message = self._messages.pop(key)
            if isinstance(message, Activation):
                self.waiting_batches -= 1
            return message


class Ring:
    """One stage's ends of the ring: its inbound channel (drained by a receiver thread) and the
    outbound channel to the next stage. Lives for a worker's whole task (every round)."""

    def __init__(self, index: int, count: int, inbound, outbound):
        if count < 2:
            raise ValueError("a pipeline has at least two stages (one stage is data mode)")
        self.index, self.count = index, count
        self._inbound, self._outbound = inbound, outbound
        self.inbox = _Inbox()
        self._thread = threading.Thread(target=self._drain, name=f"pipeline-receiver-{index}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            while not isinstance(message := self._inbound.get(), _Close):
                self.inbox.put(message)
        except BaseException as exc:  # handed to the engine's thread, which raises it
            self.inbox.fail(exc)

    def send(self, message) -> None:
        self._outbound.put(message)  # blocks while the channel is full: back-pressure

    def close(self) -> None:
        if self._thread.is_alive():  # it drains the channel, so this put cannot wait for long
            self._inbound.put(_Close())
        self._thread.join()

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class PipelineStage(Link):
    """This worker's place in the pipeline for one round: it owns the shards s with s % count == index.
    The engine calls `send`/`receive` for activations and `finish_step` at the end of each step."""

    index: int
    count: int
    ring: Ring = field(repr=False)
    round_id: int = 0  # keys carry it, so a stage that starts the next round early cannot be confused

    def send(self, step: int, shard: int, batch: int, hidden: torch.Tensor) -> None:
        """hidden: (rows, L, d_model), the input of `shard` for `batch`: to that shard's owner."""
        self.ring.send(to_message(("act", self.round_id, step, shard, batch), hidden))

    def receive(self, step: int, shard: int, batch: int) -> torch.Tensor:
        """The input of `shard` for `batch` (host memory), waiting until it has arrived."""
        return from_message(self.ring.inbox.take(("act", self.round_id, step, shard, batch)))

    def finish_step(self, step: int, head: int, next_ids: tuple | None) -> tuple[tuple[int, ...], ...]:
        """The head stage passes `next_ids` on; every other stage waits for them (and forwards them
        unless its neighbour is the head). Returns the ids: per prompt, per suffix."""
        key = ("step", self.round_id, step)
        if self.index == head:
            message = StepDone(key, head, next_ids)
        else:
            message = self.ring.inbox.take(key)
        if (self.index + 1) % self.count != head:
            self.ring.send(message)
        return message.next_ids
