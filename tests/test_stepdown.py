"""The out-of-memory step-down sequence: batch tokens, then layers per shard, then storage."""

import torch

from workers.protocol import EngineSettings
from workers.stepdown import is_out_of_memory, step_down


def test_steps_down_batch_then_shard_then_storage_then_stops():
    settings = EngineSettings("cuda:0", "float16", layers_per_shard=4, storage="gpu", batch_tokens=4096)
    steps = []
    while (next_step := step_down(settings, min_batch_tokens=1000)) is not None:
        settings, what = next_step
        steps.append(what)
    assert steps == [
        "batch_tokens 4096 -> 2048", "batch_tokens 2048 -> 1024", "batch_tokens 1024 -> 1000",
        "layers_per_shard 4 -> 2", "layers_per_shard 2 -> 1", "storage gpu -> cpu",
    ]
    assert (settings.batch_tokens, settings.layers_per_shard, settings.storage) == (1000, 1, "cpu")


def test_cpu_worker_has_no_storage_step():
    settings = EngineSettings("cpu", "float32", layers_per_shard=1, storage="gpu", batch_tokens=64)
    assert step_down(settings, min_batch_tokens=64) is None


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
