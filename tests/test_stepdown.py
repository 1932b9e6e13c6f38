"""Out of memory: the step-down sequence (batch tokens, then layers per shard, then storage), and a
worker surviving an out-of-memory error raised inside the engine."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from flexorch.workers.engine import EngineHooks
from flexorch.contract.protocol import EngineSettings, ScoreSpec, TokenizedPrompt
from flexorch.workers.stepdown import is_out_of_memory, step_down
from flexorch.contract.messages import Round, RoundDone, SteppedDown, WorkerTask
from flexorch.contract.parts import read_part
from flexorch.workers.worker import OutOfMemoryFailure, run_task


def test_steps_down_batch_then_shard_then_storage_then_stops():
    settings = EngineSettings("cuda:0", "float16", layers_per_shard=4, storage="gpu", batch_tokens=4096)
    steps = []
    while (next_step := step_down(settings, min_batch_tokens=1000)) is not None:
        settings, what = next_step
        steps.append(what)
    assert steps == [
        "batch_tokens 4096 -> 2048", "batch_tokens 2048 -> 1024", "batch_tokens 1024 -> 1000",
        "layers_per_shard 4 -> 2", "layers_per_shard 2 -> 1", "storage gpu -> cpu", "two shard slots -> one",
    ]
    assert (settings.batch_tokens, settings.layers_per_shard, settings.storage) == (1000, 1, "cpu")
    assert not settings.double_buffer


def test_streamed_experts_step_down_to_one_per_group():
    settings = EngineSettings("cuda:0", "float16", layers_per_shard=1, storage="cpu", batch_tokens=1000,
                              experts_per_group=6)
    steps = []
    while (next_step := step_down(settings, min_batch_tokens=1000)) is not None:
        settings, what = next_step
        steps.append(what)
    assert steps == ["experts_per_group 6 -> 3", "experts_per_group 3 -> 1", "two shard slots -> one"]


def test_cpu_worker_has_no_storage_step():
    settings = EngineSettings("cpu", "float32", layers_per_shard=1, storage="gpu", batch_tokens=64,
                              double_buffer=False)
    assert step_down(settings, min_batch_tokens=64) is None


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate"))
    # what torch's CPU allocator raises under `ulimit -v`
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: "
                                         "can't allocate memory: you tried to allocate 4294967296 bytes."))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# -- the worker survives out-of-memory errors raised inside the engine -------------------------------

PROMPTS = tuple(TokenizedPrompt(i, tuple(range(1, 12 + 3 * i)), ((40, 41), (42,), (43, 44, 45))) for i in range(4))
LONGEST = max(p.n_tokens for p in PROMPTS)


@dataclass
class OutOfMemoryTimes:
    """Engine hook: the first `times` batches raise CUDA's out-of-memory error."""

    times: int
    raised: int = 0

    def __call__(self, step, shard, batch):
        if self.raised < self.times:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def _run(model_dir, parts_dir, times: int, batch_tokens: int):
    settings = EngineSettings("cpu", "float32", layers_per_shard=4, storage="cpu", batch_tokens=batch_tokens)
    task = WorkerTask("w0", str(model_dir), settings, ScoreSpec(), (Round(0, PROMPTS),), str(parts_dir),
                      engine_hooks=EngineHooks(before_batch=OutOfMemoryTimes(times)))
    messages = []
    run_task(task, messages.append)
    return messages


def test_out_of_memory_steps_down_and_gives_identical_scores(layerwise, tmp_path):
    # batch_tokens already at the longest prompt: the steps shrink shards, which leaves the arithmetic
    # (and so the scores) bit for bit unchanged.
    clean = _run(layerwise("llama"), tmp_path / "clean", times=0, batch_tokens=LONGEST)
    survived = _run(layerwise("llama"), tmp_path / "oom", times=2, batch_tokens=LONGEST)
    steps = [m for m in survived if isinstance(m, SteppedDown)]
    assert [s.change for s in steps] == ["layers_per_shard 4 -> 2", "layers_per_shard 2 -> 1"]
    assert "out of memory" in steps[0].error and steps[-1].settings.layers_per_shard == 1
    expected, got = (read_part(next(m for m in msgs if isinstance(m, RoundDone)).part) for msgs in (clean, survived))
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a.scores, b.scores)


def test_out_of_memory_steps_down_batch_tokens_first(layerwise, tmp_path):
    messages = _run(layerwise("llama"), tmp_path, times=1, batch_tokens=4 * LONGEST)
    assert [m.change for m in messages if isinstance(m, SteppedDown)] == [
        f"batch_tokens {4 * LONGEST} -> {2 * LONGEST}"]


def test_out_of_memory_with_nothing_smaller_names_the_smallest_settings(layerwise, tmp_path):
    with pytest.raises(OutOfMemoryFailure, match=rf"batch_tokens {LONGEST}, layers_per_shard 1, storage cpu"):
        _run(layerwise("llama"), tmp_path, times=100, batch_tokens=LONGEST)


def test_a_resident_model_is_streamed_again_before_anything_else_shrinks():
    settings = EngineSettings(device="cuda:0", dtype="float16", layers_per_shard=1, storage="gpu", batch_tokens=512,
                              resident=True)
    smaller, change = step_down(settings, min_batch_tokens=100)
    assert (smaller.resident, smaller.batch_tokens, change) == (False, 512, "resident -> streamed")
