"""The KV cache: every decoder layer's keys and values, kept between generation steps.

Step 0 computes each batch's packed rows in full (prefix once, then every suffix) and keeps what
each attention layer made of them: its keys and values, rotary embedding applied. A later step
feeds only the newest token of every suffix — one column per suffix (`pack_new_tokens`) — and
attends over the kept keys and its own. Its mask is `attention_allowed` over the key layout (the
step-0 row, then one column per suffix per step, each with the segment and position the token has
in the full row), so the new token of suffix j sees the prefix, suffix j's tokens and the tokens
generated after it before, never another suffix. An extra step then costs one token per suffix
instead of the whole row again.

The cache waits in an ActivationStore of the round's tier (device, RAM or disk, which the planner
sizes to hold it), per (layer, batch) in two blocks: the prompt's, written once at step 0 and read
at every later step, and the generated tokens', rewritten each step (one column per suffix per
step: small). A pipeline stage keeps the cache of its own layers only: nothing of it travels.

transformers' attention modules call `cache.update(keys, values, layer_idx, ...)` and attend over
the keys and values it returns; `LayerCache` is that object for one layer and one batch.

Compressed (`EngineSettings.kv_cache_compression` int8 / int4): each block is quantised as it is
put into its tier (on the compute device, so a copy to RAM or disk moves the smaller codes) and
restored as it is read back for attention (`QuantizedBlocks`), as FlexGen compresses its cache:
asymmetric, a minimum and a step per group of 64 values along the head dim
(flexorch/weights/compression.py `quantize_groups`). A step attends over its own new keys and
values as computed; the cached ones differ by at most half a step of their group. Each read restores
from the codes, so errors do not accumulate over the steps (a block re-put after a read — the
generated block each step, the prompt block when rows leave — gives back the same codes).
"""

from __future__ import annotations

from typing import Sequence

import torch

from flexorch.contract.choices import KVCompression
from flexorch.weights.compression import dequantize_groups, quantize_groups
from flexorch.workers.activations import ActivationStore, Key
from flexorch.workers.adapter import PackedBatch

PROMPT, GENERATED = 0, 1  # the two blocks of a (layer, batch)'s cache
CODES, RANGES = 0, 1  # a compressed block's two tensors in the store, under (layer, batch, block, part)


class Blocks:
    """The cache's blocks in its store as computed. Blocks are (rows, kv_heads, K, key_dim + value_dim)."""

    def __init__(self, store: ActivationStore):
        self.store = store

    def put(self, key: Key, block: torch.Tensor, key_dim: int) -> None:
        self.store.put(key, block)

    def get(self, key: Key, keep: bool = False) -> torch.Tensor:
        return self.store.get(key, keep=keep)

    def prefetch(self, key: Key) -> None:
        self.store.prefetch(key)

    def discard(self, key: Key) -> None:
        self.store.discard(key)


class QuantizedBlocks(Blocks):
    """Blocks quantised as they are put (codes and ranges, two tensors in the store) and restored, in
    the dtype they were computed in, as they are read."""

    def __init__(self, store: ActivationStore, compression: KVCompression):
        super().__init__(store)
        self.bits = compression.bits

    def put(self, key, block, key_dim):
        codes, ranges = quantize_groups(block, self.bits, KVCompression.group(key_dim, block.shape[-1] - key_dim))
        self.store.put((*key, CODES), codes)
        self.store.put((*key, RANGES), ranges)

    def get(self, key, keep=False):
        codes = self.store.get((*key, CODES), keep=keep)
        return dequantize_groups(codes, self.store.get((*key, RANGES), keep=keep), self.bits)

    def prefetch(self, key):
        self.store.prefetch((*key, CODES))
        self.store.prefetch((*key, RANGES))

    def discard(self, key):
        self.store.discard((*key, CODES))
        self.store.discard((*key, RANGES))


def blocks_of(store: ActivationStore, compression: KVCompression) -> Blocks:
    return Blocks(store) if compression is KVCompression.NONE else QuantizedBlocks(store, compression)


class LayerCache:
    """One layer's cache for one batch at one step. Blocks are (rows, kv_heads, K, key_dim +
    value_dim): keys and values side by side, as MLA (DeepSeek-V3) keys are wider than its values."""

    def __init__(self, blocks: Blocks | None, key: tuple[int, int], step: int,
                 prompt: torch.Tensor | None, generated: torch.Tensor | None, shrunk: bool = False):
        self.blocks, self.key, self.step = blocks, key, step  # blocks None: nothing read after this step
        self.prompt, self.generated = prompt, generated
        self.shrunk = shrunk  # finished rows left the prompt block: kept anew, once

    def update(self, keys: torch.Tensor, values: torch.Tensor, *_transformers_args, **_transformers_kwargs):
        """keys, values: (rows, kv_heads, Q, head_dim) of this step's tokens → those of every token
        they attend to: the cached ones, then theirs. Keeps this step's for the next one.
        (layer_idx and the cache kwargs are transformers' and unused: one object per layer.)"""
        new = torch.cat([keys, values], dim=-1)
        key_dim = keys.shape[-1]
        if self.blocks is not None:
            if self.step == 0:
                self.blocks.put((*self.key, PROMPT), new, key_dim)
            else:
                if self.shrunk:
                    self.blocks.put((*self.key, PROMPT), self.prompt, key_dim)
                past = [new] if self.generated is None else [self.generated, new]
                self.blocks.put((*self.key, GENERATED), torch.cat(past, dim=-2), key_dim)
        blocks = [b for b in (self.prompt, self.generated) if b is not None]
        if not blocks:
            return keys, values
        both = torch.cat([*blocks, new], dim=-2)
        return both[..., :keys.shape[-1]], both[..., keys.shape[-1]:]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The columns cached before this step's (Llama 4's no-rope layers offset their query
        temperature by it)."""
        return sum(block.shape[-2] for block in (self.prompt, self.generated) if block is not None)


class KVCache:
    """The caches of one round: every layer this worker computes, every batch, `steps` steps."""

    enabled = True

    def __init__(self, store: ActivationStore, steps: int, compression: KVCompression = KVCompression.NONE):
        self.store, self.last_step = store, steps - 1  # `store`: what a checkpoint saves (workers/checkpoint.py)
        self.blocks = blocks_of(store, KVCompression(compression))
        self.batches: list[int] = []  # per batch of the step: the cache's batch it continues
        self.kept: list[torch.Tensor | None] = []  # per batch of the step: the rows kept of that batch (None: all)
        self.layers: set[int] = set()  # every layer this cache holds blocks of

    def select(self, batches: list[int], kept: list[torch.Tensor | None]) -> None:
        """The coming step's batches: batch b continues the cache's batch `batches[b]`, keeping its
        rows `kept[b]` (indices into the rows it had; None: all). The blocks of a batch left out are
        freed now; a kept batch's dropped rows leave its blocks as each layer reads them."""
        for gone in set(self.batches) - set(batches):
            for layer in self.layers:
                self.blocks.discard((layer, gone, PROMPT))
                self.blocks.discard((layer, gone, GENERATED))
        self.batches, self.kept = batches, kept

    def layer(self, step: int, layer: int, batch: int) -> LayerCache:
        keep = step < self.last_step  # what the last step computes is never read
        self.layers.add(layer)
        key = (layer, self._batch(batch))
        prompt = self.blocks.get((*key, PROMPT), keep=keep) if step > 0 else None
        generated = self.blocks.get((*key, GENERATED)) if step > 1 else None
        rows = self.kept[batch] if step > 0 and batch < len(self.kept) else None
        if rows is not None:  # finished rows leave: the prompt block shrinks once (kept anew by the update)
            prompt = prompt[rows.to(prompt.device)]  # rows lead: (rows, kv_heads, K, key_dim + value_dim)
            generated = None if generated is None else generated[rows.to(generated.device)]
        return LayerCache(self.blocks if keep else None, key, step, prompt, generated, shrunk=rows is not None)

    def _batch(self, batch: int) -> int:
        return self.batches[batch] if batch < len(self.batches) else batch

    def prefetch(self, step: int, layers: Sequence[int], batch: int) -> None:
        """A hint: `batch` goes through `layers` next (the disk tier reads its blocks meanwhile)."""
        batch = self._batch(batch)
        for layer in layers:
            if step > 0:
                self.blocks.prefetch((layer, batch, PROMPT))
            if step > 1:
                self.blocks.prefetch((layer, batch, GENERATED))

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NoCache(KVCache):
    """One generation step (or the cache turned off): every step recomputes the rows in full."""

    enabled = False

    def __init__(self):
        pass

    def select(self, batches, kept):
        pass

    def layer(self, step, layer, batch):
        return None

    def prefetch(self, step, layers, batch):
        pass

    def close(self):
        pass


def pack_new_tokens(rows: Sequence[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]]) -> PackedBatch:
    """The newest token of every suffix of each (prefix_ids, suffix_ids) row, one column per suffix:
    (rows, max suffixes), with the segment (j + 1 for suffix j) and position it has in the full row."""
    width = max(len(suffixes) for _, suffixes in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (prefix, suffixes) in enumerate(rows):
        for j, suffix in enumerate(suffixes):
            ids[r, j], pos[r, j], seg[r, j] = suffix[-1], len(prefix) + len(suffix) - 1, j + 1
    return PackedBatch(ids, pos, seg)


def append_columns(keys: PackedBatch, new: PackedBatch) -> PackedBatch:
    """The key layout after a step against the cache: the cached columns, then the step's."""
    return PackedBatch(torch.cat([keys.input_ids, new.input_ids], dim=1),
                       torch.cat([keys.position_ids, new.position_ids], dim=1),
                       torch.cat([keys.segment_ids, new.segment_ids], dim=1))
