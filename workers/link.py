"""Where a batch's hidden states come from before a shard and go after it: the link between shards.

The engine's shard loop talks only to a `Link`. Data mode is the one-stage pipeline: `LocalLink`
owns every shard and keeps activations in this worker's ActivationStore (device, RAM or disk);
`workers.pipeline.PipelineStage` owns every n-th shard and hands activations round a ring of
worker processes. The same loop runs over either.
"""

from __future__ import annotations

import abc

import torch

from flexorch.contract.shards import owner
from flexorch.workers.activations import ActivationStore


class Link(abc.ABC):
    index: int  # this worker's stage
    count: int  # stages in the pipeline (1: data mode)

    def owns(self, shard_index: int) -> bool:
        return owner(shard_index, self.count) == self.index

    @abc.abstractmethod
    def receive(self, step: int, shard: int, batch: int) -> torch.Tensor:
        """hidden: (rows, L, d_model), the input of `shard` for `batch` (waits until it is there)."""

    def prefetch(self, step: int, shard: int, batch: int) -> None:
        """A hint: `batch` is the next one `receive` will be asked for."""

    @abc.abstractmethod
    def send(self, step: int, shard: int, batch: int, hidden: torch.Tensor) -> None:
        """hidden: (rows, L, d_model), the input of `shard` for `batch`, to that shard's owner."""

    @abc.abstractmethod
    def finish_step(self, step: int, head: int, next_ids: tuple | None) -> tuple[tuple[int, ...], ...]:
        """End of a generation step: the head stage gives the argmax ids every suffix appends next
        (per prompt, per suffix; () when the kind generates none), the others get them back."""

    def close(self) -> None:
        """Free what the link holds for this round."""

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalLink(Link):
    """Data mode: every shard is this worker's; activations wait in `store` between shards."""

    index, count = 0, 1

    def __init__(self, store: ActivationStore):
        self.store = store

    def receive(self, step, shard, batch):
        return self.store.get(batch)

    def prefetch(self, step, shard, batch):
        self.store.prefetch(batch)  # disk: read the next batch while this one computes

    def send(self, step, shard, batch, hidden):
        self.store.put(batch, hidden)

    def finish_step(self, step, head, next_ids):
        return next_ids

    def close(self):
        self.store.close()
