"""The shard layout: how one pass over the model is cut into shards, and which pipeline stage
owns each. Defined once here for the engine, the pipeline and the planner.

A pass is the embedding alone, then the decoder layers `layers_per_shard` at a time, then norm +
lm head. With n pipeline stages, shard s belongs to stage s % n (interleaved: see
workers/pipeline.py for why not contiguous).

Expert streaming (`experts_per_group` > 0, one layer per shard): a mixture-of-experts layer too large
for the device is cut inside the layer into steps that share its shard index (and so its stage): its
dense part (attention, router, norms, shared expert), then its experts `experts_per_group` at a
time. Each step is loaded, and the next prefetched, like a shard.

The edges do not size the slots: the embedding is a lookup, read per pass as the rows its tokens
need (workers/prefetch.py), and a head larger than the largest decoder shard (a 128k vocabulary: 2.1
GB in fp16 for a 70B, against 1.7 GB per decoder layer) is cut into steps of vocabulary rows under
one index, each as large as a decoder shard at most: norm + rows 0..n-1, then rows n..2n-1, ...
(its weight is row-major (vocab, hidden): a range of rows is one contiguous range of bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from flexorch.contract.manifest import DECODER, DTYPE_BYTES, EMBED, LM_HEAD, NORM, LayerEntry, Manifest


DENSE_PART = (0, 0)  # Shard.experts of a streamed MoE layer's first step: the layer without its experts
# Each tensor a slot holds starts at a multiple of this (so every dtype view is aligned): a step of
# head rows leaves that much room for the padding before it.
ALIGN = 64


class ShardKind(Enum):
    """What a shard step holds, and so how the engine runs it (workers/shardrun.py)."""

    LAYERS = "layers"  # whole layers: the embedding, decoder layers, or norm + head
    DENSE_PART = "dense part"  # a streamed MoE layer without its experts
    EXPERT_GROUP = "expert group"  # a group of a streamed MoE layer's experts
    HEAD_STEP = "head step"  # some vocabulary rows of a head in steps (the first with the norm)


@dataclass(frozen=True)
class Shard:
    index: int  # position in one pass over the model (the steps of a streamed MoE layer share it)
    names: tuple[str, ...]  # layer names, forward order
    # None: whole layers. A streamed MoE layer (names holds it alone): DENSE_PART, then (first, end)
    # for each group of its experts first..end-1.
    experts: tuple[int, int] | None = None
    layer_experts: int = 0  # a streamed MoE layer's number of experts
    # None: the whole head. A head in steps: the vocabulary rows first..end-1 of its weight (the
    # first step also holds the norm, names ("norm", "lm_head"); the others ("lm_head",)).
    rows: tuple[int, int] | None = None
    head_rows: int = 0  # a head in steps: its number of rows (the vocabulary)

    @property
    def kind(self) -> ShardKind:
        if self.rows is not None:
            return ShardKind.HEAD_STEP
        if self.experts is None:
            return ShardKind.LAYERS
        return ShardKind.DENSE_PART if self.experts == DENSE_PART else ShardKind.EXPERT_GROUP

    @property
    def last_step(self) -> bool:
        """Whether the shard's output is complete after this step (and so is sent on)."""
        if self.rows is not None:
            return self.rows[1] == self.head_rows
        return self.experts is None or (self.experts != DENSE_PART and self.experts[1] == self.layer_experts)


def decoder_groups(n_decoders: int, layers_per_shard: int) -> list[range]:
    """The decoder layer numbers of each decoder shard, in order."""
    return [range(i, min(i + layers_per_shard, n_decoders)) for i in range(0, n_decoders, layers_per_shard)]


def plan_shards(manifest: Manifest, layers_per_shard: int, experts_per_group: int = 0,
                size: Callable[[str], int] | None = None) -> list[Shard]:
    """Embeddings alone, then decoder layers `layers_per_shard` at a time, then norm + lm head; with
    `experts_per_group`, each MoE layer as its dense part and then its groups of experts; a head
    larger than the largest decoder shard as steps of vocabulary rows.

    size: the bytes a layer takes in a slot (the engine: its data region, aligned); by default its
    file's (the planner: the manifest's, which adds the file's header)."""
    if experts_per_group and layers_per_shard != 1:
        raise ValueError("expert streaming runs one layer per shard")
    decoders = [entry for entry in manifest.layers if entry.kind == DECODER]
    tail = [entry.name for entry in manifest.layers if entry.kind not in (EMBED, DECODER)]
    groups = [[manifest.layers[0].name]]
    groups += [[decoders[i].name for i in group] for group in decoder_groups(len(decoders), layers_per_shard)]
    shards = []
    for index, names in enumerate(groups):
        entry = decoders[index - 1] if index > 0 else None
        if not experts_per_group or entry is None or not entry.experts:
            shards.append(Shard(index, tuple(names)))
            continue
        steps = [DENSE_PART] + [(first, min(first + experts_per_group, entry.experts))
                                for first in range(0, entry.experts, experts_per_group)]
        shards += [Shard(index, tuple(names), step, entry.experts) for step in steps]
    size = size or (lambda name: manifest.stored_bytes(manifest.entry(name)))
    budget = max(_step_bytes(manifest, shard, size) for shard in shards[1:]) if len(shards) > 1 else 0
    return shards + head_steps(manifest, len(groups), tuple(tail), budget, size)


def head_steps(manifest: Manifest, index: int, tail: tuple[str, ...], budget: int,
               size: Callable[[str], int]) -> list[Shard]:
    """Norm + head as one shard, or, where it outgrows `budget` bytes and its weight can be cut by
    rows, as steps of vocabulary rows that each fit `budget`."""
    rows = head_rows(manifest)
    kinds = tuple(manifest.entry(name).kind for name in tail)
    if sum(size(name) for name in tail) <= budget or kinds != (NORM, LM_HEAD) or not rows:
        return [Shard(index, tail)]
    norm, head = tail
    per_step = head_step_rows(budget, size(norm), head_row_bytes(manifest))
    return [Shard(index, tail if first == 0 else (head,), rows=(first, min(first + per_step, rows)), head_rows=rows)
            for first in range(0, rows, per_step)]


def head_step_rows(budget: int, norm_bytes: int, row_bytes: int) -> int:
    """Rows of a head step within `budget` bytes, beside the norm (which the first step holds)."""
    return max(1, (budget - norm_bytes - ALIGN) // row_bytes)


def head_row_bytes(manifest: Manifest) -> int:
    """Bytes of one row of the head's weight, as stored."""
    return manifest.hidden_size * DTYPE_BYTES[head_entry(manifest).dtype]


def gathered(entry: LayerEntry) -> bool:
    """Whether an embedding is read per pass as the rows its tokens need (workers/prefetch.py): its
    one (vocab, hidden) weight, uncompressed. Any other (compressed ones are never written today:
    flexorch/weights/compression.py) is read whole, as its rows cannot be cut out of the file."""
    return entry.kind == EMBED and entry.tensors == ("weight",) and entry.compression is None


def head_entry(manifest: Manifest) -> LayerEntry:
    """The entry whose file holds the head's weight (a tied head: the embedding)."""
    head = next(entry for entry in manifest.layers if entry.kind == LM_HEAD)
    return manifest.entry(head.tied_to) if head.tied_to else head


def head_rows(manifest: Manifest) -> int:
    """The rows of the head's (vocab, hidden) weight, or 0 where it cannot be read by rows: a head
    with more than that one tensor (a bias), or compressed."""
    entry = head_entry(manifest)
    if entry.tensors != ("weight",) or entry.compression or entry.dtype not in DTYPE_BYTES:
        return 0
    return entry.params // manifest.hidden_size


def _step_bytes(manifest: Manifest, shard: Shard, size: Callable[[str], int]) -> int:
    """A decoder shard's (or streamed MoE step's) bytes in a slot."""
    if shard.experts is None:
        return sum(size(name) for name in shard.names)
    entry = manifest.entry(shard.names[0])
    if shard.experts == DENSE_PART:
        return entry.bytes - entry.experts * entry.expert_bytes
    return (shard.experts[1] - shard.experts[0]) * entry.expert_bytes


def shard_bytes(embed: int, decoders: Sequence[int], tail: int, layers_per_shard: int) -> list[int]:
    """Bytes of each shard of a pass, from the embedding's, each decoder layer's and norm + head's."""
    return [embed] + [sum(decoders[i] for i in g) for g in decoder_groups(len(decoders), layers_per_shard)] + [tail]


def owner(shard_index: int, stages: int) -> int:
    """The pipeline stage owning shard `shard_index` (1 stage: data mode, stage 0 owns all)."""
    return shard_index % stages
