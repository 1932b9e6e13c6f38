"""Smaller settings to retry with after an out-of-memory error.

The planner's prediction can be wrong (another process took GPU memory, fragmentation), so a
worker that runs out of memory steps down and retries the round rather than failing: first fewer
tokens per batch (cheapest: same weights traffic), then fewer experts per group (a MoE model
streaming its experts), then fewer layers per shard, then activations off the GPU, then one shard
slot (a layer less, reads no longer hidden). Scores do not depend on any of these, only speed does.
"""

from __future__ import annotations

import dataclasses

from flexorch.contract.choices import Storage, on_cpu
from flexorch.contract.protocol import EngineSettings


# How allocators other than CUDA's word a failed allocation in the RuntimeError they raise: torch's
# CPU allocator under a process memory limit (ulimit -v) says "DefaultCPUAllocator: can't allocate
# memory", on Windows "not enough memory"; MPS and XPU say "out of memory".
_ALLOCATION_FAILED = ("can't allocate", "not enough memory", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed, on any device: CUDA's OutOfMemoryError, Python's MemoryError, or
    another allocator's RuntimeError."""
    import torch  # here, not at import: the controller imports this module through workers.worker

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(words in str(exc).lower() for words in _ALLOCATION_FAILED)


def step_down(settings: EngineSettings, min_batch_tokens: int) -> tuple[EngineSettings, str] | None:
    """The next smaller settings and what changed, or None when nothing smaller exists.

    min_batch_tokens: the longest prompt's packed length (a prompt is never split across batches).
    """
    if settings.resident:  # the whole model on the device: the largest saving, streaming it again
        return dataclasses.replace(settings, resident=False), "resident -> streamed"
    if settings.batch_tokens > min_batch_tokens:
        smaller = max(min_batch_tokens, settings.batch_tokens // 2)
        return (dataclasses.replace(settings, batch_tokens=smaller),
                f"batch_tokens {settings.batch_tokens} -> {smaller}")
    if settings.experts_per_group > 1:  # streamed MoE layers: smaller steps, the same weights read
        fewer = settings.experts_per_group // 2
        return (dataclasses.replace(settings, experts_per_group=fewer),
                f"experts_per_group {settings.experts_per_group} -> {fewer}")
    if settings.layers_per_shard > 1:
        fewer = settings.layers_per_shard // 2
        return (dataclasses.replace(settings, layers_per_shard=fewer),
                f"layers_per_shard {settings.layers_per_shard} -> {fewer}")
    if settings.storage.on_device and not on_cpu(settings.device):
        return dataclasses.replace(settings, storage=Storage.CPU), "storage gpu -> cpu"
    if settings.double_buffer:
        return dataclasses.replace(settings, double_buffer=False), "two shard slots -> one"
    return None
