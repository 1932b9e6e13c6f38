"""The shard layout: how one pass over the model is cut into shards, and which pipeline stage
owns each. Defined once here for the engine, the pipeline and the planner.

A pass is the embedding alone, then the decoder layers `layers_per_shard` at a time, then norm +
lm head. With n pipeline stages, shard s belongs to stage s % n (interleaved: see
workers/pipeline.py for why not contiguous).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flexorch.contract.manifest import DECODER, EMBED, Manifest


@dataclass(frozen=True)
class Shard:
    index: int  # position in one pass over the model
    names: tuple[str, ...]  # layer names, forward order


def decoder_groups(n_decoders: int, layers_per_shard: int) -> list[range]:
    """The decoder layer numbers of each decoder shard, in order."""
    return [range(i, min(i + layers_per_shard, n_decoders)) for i in range(0, n_decoders, layers_per_shard)]


def plan_shards(manifest: Manifest, layers_per_shard: int) -> list[Shard]:
    """Embeddings alone, then decoder layers `layers_per_shard` at a time, then norm + lm head."""
    decoders = [entry.name for entry in manifest.layers if entry.kind == DECODER]
    tail = [entry.name for entry in manifest.layers if entry.kind not in (EMBED, DECODER)]
    groups = [[manifest.layers[0].name]]
    groups += [[decoders[i] for i in group] for group in decoder_groups(len(decoders), layers_per_shard)]
    groups.append(tail)
    return [Shard(index, tuple(names)) for index, names in enumerate(groups)]


def shard_bytes(embed: int, decoders: Sequence[int], tail: int, layers_per_shard: int) -> list[int]:
    """Bytes of each shard of a pass, from the embedding's, each decoder layer's and norm + head's."""
    return [embed] + [sum(decoders[i] for i in g) for g in decoder_groups(len(decoders), layers_per_shard)] + [tail]


def owner(shard_index: int, stages: int) -> int:
    """The pipeline stage owning shard `shard_index` (1 stage: data mode, stage 0 owns all)."""
    return shard_index % stages
