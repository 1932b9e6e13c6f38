"""One runner per kind of shard step: what running a loaded shard over every batch of a pass means.

The engine (workers/engine.py) is the schedule: per generation step, per shard, load the weights,
run them over every batch of the pass, release them. It hands each loaded shard to the runner of
its kind (`Shard.kind`, contract/shards.py), chosen once per shard by `shard_runs`:

- `LayerRun`: whole layers (the embedding, decoder layers, or norm + head): per batch, its input
  (the embedding's lookup, or received), the layers, its output (sent on, or scored).
- `DensePartRun`: a streamed MoE layer's first step (workers/experts.py): the layer with its
  experts swapped for a recorder over every batch; the outputs wait for the groups of experts.
- `ExpertGroupRun`: one group of that layer's experts over the tokens routed to them across every
  batch; after the last group the layer's outputs go on.
- `HeadStepRun`: a head in steps of vocabulary rows: the first step keeps each batch's final-norm
  outputs at its scored positions; each step adds its rows' logits to the batch's running scores;
  after the last they are the batch's results.

The batch loop sits in the runner, not in the engine, because what one batch's work is differs by
kind: an expert group runs on the routed tokens of all batches at once, a head step on the norm's
outputs kept from its first step. Runners keep nothing between calls: what a shard cut into steps
holds between them (a streamed MoE layer, a head's running scores) waits on the pass
(`Batches.streamed`, `Batches.head_steps`), so between two shards a pass holds nothing but the
activations the link keeps and its batches' results. Adding a kind is a `ShardKind`, a class here
and its line in `RUNS`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from flexorch.contract.manifest import DECODER, EMBED, LM_HEAD, NORM, LayerEntry
from flexorch.contract.protocol import ScoreSpec
from flexorch.contract.shards import Shard, ShardKind
from flexorch.workers.adapter import LayerKind, ModelAdapter, PackedBatch, additive_mask, attention_allowed
from flexorch.workers.experts import StreamedExperts
from flexorch.workers.kvcache import KVCache
from flexorch.workers.layerfile import LayerwiseModel
from flexorch.workers.link import Link
from flexorch.workers.prefetch import LoadedShard
from flexorch.workers.scoring import ScoreTargets, StepResult, StepScores, compute_scores, scored_positions

BatchDone = Callable[[int, int], None]  # (batches done, batches): progress within a shard


class Batches(Protocol):
    """What a runner reads of one generation step's pass (engine._Pass), and leaves on it.

    packed[b]: the tokens batch b computes, (rows, Q); targets[b]: the positions scored in it."""

    packed: list[PackedBatch]
    targets: list[ScoreTargets]
    streamed: StreamedExperts | None  # a streamed MoE layer between its dense part and last group
    head_steps: list[StepScores] | None  # a head in steps between its first and last: per batch

    def ids_on_device(self, b: int, device: torch.device) -> tuple[torch.Tensor, PackedBatch]: ...

    def layout(self, b: int, kind: LayerKind, build: Callable[[], tuple]) -> tuple: ...

    def record(self, b: int, result: StepResult) -> None: ...


@dataclass(frozen=True)
class ShardContext:
    """What the runners of one engine run share: the model, the link batches come from and go to,
    the KV cache, the score asked for. Built per run: the link and the cache are the run's."""

    model: LayerwiseModel
    adapter: ModelAdapter
    link: Link
    cache: KVCache
    score: ScoreSpec
    keep_on: torch.device  # where a streamed MoE layer's batches wait: with the activations
    before_batch: Callable[[int, int, int], None] | None = None  # test hook: (step, shard, batch)

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def hook(self, loaded: LoadedShard, b: int) -> None:
        if self.before_batch:
            self.before_batch(loaded.step, loaded.shard.index, b)

    def receive(self, loaded: LoadedShard, current: Batches, b: int) -> torch.Tensor:
        """Batch b's input to this shard from the link, on the device (the next batch's prefetched),
        after the before_batch hook."""
        self.hook(loaded, b)
        hidden = self.link.receive(loaded.step, loaded.shard.index, b).to(self.device)
        if b + 1 < len(current.packed):
            self.link.prefetch(loaded.step, loaded.shard.index, b + 1)
        return hidden

    def decoder_layers(self, indices: list[int], hidden: torch.Tensor, current: Batches, b: int,
                       step: int) -> torch.Tensor:
        """hidden: (rows, Q, d_model) of batch b at `step` through decoder layers `indices`, each
        with its keys and values of the earlier steps from the cache."""
        adapter, packed = self.adapter, current.packed[b]

        def build(kind: LayerKind) -> tuple:
            position_ids, layout = current.ids_on_device(b, self.device)
            mask = additive_mask(attention_allowed(layout, kind.window, queries=packed.shape[1], chunk=kind.chunk),
                                adapter.dtype)
            return mask, position_ids, adapter.position_embeddings(hidden, position_ids, kind)

        for i in indices:
            kind = adapter.layer_kinds[i]
            mask, position_ids, position_embeddings = current.layout(b, kind, lambda: build(kind))
            hidden = adapter.decoder_layer(i, hidden, mask, position_ids, position_embeddings,
                                           self.cache.layer(step, i, b))
        return hidden


class ShardRun(abc.ABC):
    """Runs loaded steps of one kind of shard over every batch of a pass."""

    def __init__(self, context: ShardContext):
        self.context = context

    @abc.abstractmethod
    def run(self, loaded: LoadedShard, current: Batches, batch_done: BatchDone) -> None:
        """Every batch of `current` through `loaded` (its weights on the device), reporting
        `batch_done` after each batch but the last (the engine reports the shard's end)."""


class LayerRun(ShardRun):
    """Whole layers: per batch, receive (or embed), compute, send (or score)."""

    def run(self, loaded: LoadedShard, current: Batches, batch_done: BatchDone) -> None:
        context, adapter = self.context, self.context.adapter
        entries = [context.model.entry(name) for name in loaded.shard.names]
        modules = [self._assigned(loaded, entry) for entry in entries]
        kinds = {entry.kind for entry in entries}
        layers = [entry.index for entry in entries if entry.kind == DECODER]
        batches = len(current.packed)
        for b in range(batches):
            hidden = self._embedded(loaded, current, b) if EMBED in kinds else context.receive(loaded, current, b)
            if layers:
                if b + 1 < batches:
                    context.cache.prefetch(loaded.step, layers, b + 1)
                hidden = context.decoder_layers(layers, hidden, current, b, loaded.step)
            if LM_HEAD in kinds:
                current.record(b, compute_scores(hidden, current.targets[b], adapter.logits, context.score,
                                                 adapter.config.vocab_size))
            else:
                context.link.send(loaded.step, loaded.shard.index + 1, b, hidden)
            del hidden
            if b + 1 < batches:
                batch_done(b + 1, batches)
        for module in modules:
            adapter.release(module)

    def _assigned(self, loaded: LoadedShard, entry: LayerEntry) -> torch.nn.Module:
        """The skeleton's module of `entry` holding the loaded weights (a gathered embedding: the rows
        of the pass's tokens)."""
        adapter = self.context.adapter
        module = adapter.module(entry.kind, entry.index)
        if loaded.embed_ids is not None:
            adapter.assign_rows(module, loaded.tensors[entry.name]["weight"])
        else:
            adapter.assign(module, loaded.tensors[entry.name])
        return module

    def _embedded(self, loaded: LoadedShard, current: Batches, b: int) -> torch.Tensor:
        """hidden: (rows, Q, d_model), batch b's tokens embedded, after the before_batch hook."""
        self.context.hook(loaded, b)
        ids = current.packed[b].input_ids
        if loaded.embed_ids is not None:  # vocabulary id → its row among the gathered ones
            ids = torch.searchsorted(loaded.embed_ids, ids)
        return self.context.adapter.embed(ids.to(self.context.device))


class DensePartRun(ShardRun):
    """A streamed MoE layer's first step: attention and router over every batch; the outputs wait on
    the pass, without the experts' share, for the groups of experts."""

    def run(self, loaded: LoadedShard, current: Batches, batch_done: BatchDone) -> None:
        context = self.context
        entry = context.model.entry(loaded.shard.names[0])
        layer = context.adapter.module(DECODER, entry.index)
        current.streamed = StreamedExperts(layer, entry.module_expert_tensors, context.keep_on)
        context.adapter.assign(layer, loaded.tensors[entry.name])  # the layer's tensors but the experts'
        for b in range(len(current.packed)):
            hidden = context.receive(loaded, current, b)
            current.streamed.keep(context.decoder_layers([entry.index], hidden, current, b, loaded.step))
        context.adapter.release(layer)


class ExpertGroupRun(ShardRun):
    """One group of a streamed MoE layer's experts over every batch; after the last, the layer's
    outputs go on."""

    def run(self, loaded: LoadedShard, current: Batches, batch_done: BatchDone) -> None:
        shard, link = loaded.shard, self.context.link
        first, end = shard.experts
        current.streamed.add_group(first, end, loaded.tensors[shard.names[0]], self.context.device)
        if shard.last_step:
            for b in range(len(current.packed)):
                link.send(loaded.step, shard.index + 1, b, current.streamed.output(b))
            current.streamed.restore()
            current.streamed = None


class HeadStepRun(ShardRun):
    """One step of a head in vocabulary rows (contract/shards.py). The first (which holds the norm)
    receives every batch and keeps its scored positions' final-norm outputs; every step adds its
    rows' logits to each batch's running scores; after the last they are recorded."""

    def run(self, loaded: LoadedShard, current: Batches, batch_done: BatchDone) -> None:
        context, adapter = self.context, self.context.adapter
        shard, (first, end) = loaded.shard, loaded.shard.rows
        if first == 0:
            current.head_steps = self._normed(loaded, current)
        head = adapter.module(LM_HEAD)
        adapter.assign_rows(head, loaded.tensors[shard.names[-1]]["weight"])
        batches = len(current.head_steps)
        for b, running in enumerate(current.head_steps):
            running.add(first, end, adapter.head_logits)
            if b + 1 < batches:
                batch_done(b + 1, batches)
        adapter.release(head)
        if shard.last_step:
            for b, running in enumerate(current.head_steps):
                current.record(b, running.finish())
            current.head_steps = None

    def _normed(self, loaded: LoadedShard, current: Batches) -> list[StepScores]:
        """Per batch, its scored positions' final-norm outputs, the running scores' start."""
        context, adapter = self.context, self.context.adapter
        norm = adapter.module(NORM)
        adapter.assign(norm, loaded.tensors[loaded.shard.names[0]])
        steps = []
        for b in range(len(current.packed)):
            hidden = context.receive(loaded, current, b)
            normed = adapter.final_norm(scored_positions(hidden, current.targets[b]))
            steps.append(StepScores(normed, current.targets[b], context.score))
            del hidden
        adapter.release(norm)
        return steps


RUNS: dict[ShardKind, type[ShardRun]] = {
    ShardKind.LAYERS: LayerRun,
    ShardKind.DENSE_PART: DensePartRun,
    ShardKind.EXPERT_GROUP: ExpertGroupRun,
    ShardKind.HEAD_STEP: HeadStepRun,
}


def shard_runs(shards: list[Shard], context: ShardContext) -> list[ShardRun]:
    """The runner of each shard step, in order (one per kind, shared by its shards: runners keep
    nothing between calls)."""
    runs = {kind: run(context) for kind, run in RUNS.items()}
    return [runs[shard.kind] for shard in shards]
