"""The shard layout: how one pass over the model is cut into shards, and which pipeline stage
owns each. Defined once here for the engine, the pipeline and the planner.

A pass is the embedding alone, then the decoder layers `layers_per_shard` at a time, then norm +
lm head. With n pipeline stages, shard s belongs to stage s % n (interleaved: see
workers/pipeline.py for why not contiguous).

Expert streaming (`experts_per_group` > 0, one layer per shard): a mixture-of-experts layer too large
for the device is cut inside the layer into steps that share its shard index (and so its stage): its
dense part (attention, router, norms, shared expert), then its experts `experts_per_group` at a
time. Each step is loaded, and the next prefetched, like a shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flexorch.contract.manifest import DECODER, EMBED, Manifest


DENSE_PART = (0, 0)  # Shard.experts of a streamed MoE layer's first step: the layer without its experts


@dataclass(frozen=True)
class Shard:
    index: int  # position in one pass over the model (the steps of a streamed MoE layer share it)
    names: tuple[str, ...]  # layer names, forward order
    # None: whole layers. A streamed MoE layer (names holds it alone): DENSE_PART, then (first, end)
    # for each group of its experts first..end-1.
    experts: tuple[int, int] | None = None
    layer_experts: int = 0  # a streamed MoE layer's number of experts

    @property
    def last_step(self) -> bool:
        """Whether the shard's output is complete after this step (and so is sent on)."""
        return self.experts is None or (self.experts != DENSE_PART and self.experts[1] == self.layer_experts)


def decoder_groups(n_decoders: int, layers_per_shard: int) -> list[range]:
    """The decoder layer numbers of each decoder shard, in order."""
    return [range(i, min(i + layers_per_shard, n_decoders)) for i in range(0, n_decoders, layers_per_shard)]


def plan_shards(manifest: Manifest, layers_per_shard: int, experts_per_group: int = 0) -> list[Shard]:
    """Embeddings alone, then decoder layers `layers_per_shard` at a time, then norm + lm head; with
    `experts_per_group`, each MoE layer as its dense part and then its groups of experts."""
    if experts_per_group and layers_per_shard != 1:
        raise ValueError("expert streaming runs one layer per shard")
    decoders = [entry for entry in manifest.layers if entry.kind == DECODER]
    tail = [entry.name for entry in manifest.layers if entry.kind not in (EMBED, DECODER)]
    groups = [[manifest.layers[0].name]]
    groups += [[decoders[i].name for i in group] for group in decoder_groups(len(decoders), layers_per_shard)]
    groups.append(tail)
    shards = []
    for index, names in enumerate(groups):
        entry = decoders[index - 1] if 0 < index <= len(decoders) else None
        if not experts_per_group or entry is None or not entry.experts:
            shards.append(Shard(index, tuple(names)))
            continue
        steps = [DENSE_PART] + [(first, min(first + experts_per_group, entry.experts))
                                for first in range(0, entry.experts, experts_per_group)]
        shards += [Shard(index, tuple(names), step, entry.experts) for step in steps]
    return shards


def shard_bytes(embed: int, decoders: Sequence[int], tail: int, layers_per_shard: int) -> list[int]:
    """Bytes of each shard of a pass, from the embedding's, each decoder layer's and norm + head's."""
    return [embed] + [sum(decoders[i] for i in g) for g in decoder_groups(len(decoders), layers_per_shard)] + [tail]


def owner(shard_index: int, stages: int) -> int:
    """The pipeline stage owning shard `shard_index` (1 stage: data mode, stage 0 owns all)."""
    return shard_index % stages
