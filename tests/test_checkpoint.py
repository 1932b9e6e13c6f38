"""Checkpoints of a round in progress (workers/checkpoint.py): a run stopped mid-pass resumes from its
last checkpoint, computes only the shards after it, and gives the bytes of an uninterrupted run.

The engine is stopped by an exception from its after_shard hook (its stores are closed as a killed
worker's would be lost; what the checkpoint holds is on the disk), then run again. The worker's
SIGKILL, re-submit and clean-up are tested end to end through `flexorch submit` at the bottom.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexorch.contract.checkpoints import CHECKPOINTS_DIR, META_NAME, round_folder
from flexorch.contract.manifest import read_manifest
from flexorch.contract.protocol import EngineSettings, ScoreSpec
from flexorch.contract.shards import plan_shards
from flexorch.workers.engine import EngineHooks, score_prompts

from test_engine import tokenize


class Crash(Exception):
    """Stands for the kill: raised from the after_shard hook."""


def settings(tmp_path: Path, **overrides) -> EngineSettings:
    base = dict(device="cpu", dtype="float32", layers_per_shard=1, storage="cpu", batch_tokens=40,
                disk_folder=str(tmp_path / "activations"), checkpoint_dir=str(tmp_path / CHECKPOINTS_DIR),
                checkpoint_key="job-a", checkpoint_shards=2)
    return EngineSettings(**{**base, **overrides})


def counting_hooks(crash_at: int | None = None) -> tuple[EngineHooks, list]:
    """Hooks recording every shard step run; with `crash_at`, raising Crash after that many."""
    ran = []

    def after_shard(step: int, shard: int) -> None:
        ran.append((step, shard))
        if crash_at is not None and len(ran) == crash_at:
            raise Crash()

    return EngineHooks(after_shard=after_shard), ran


def assert_identical(got, expected) -> None:
    assert [r.index for r in got] == [r.index for r in expected]
    for a, b in zip(got, expected):
        if isinstance(a.scores, dict):
            assert a.scores.keys() == b.scores.keys()
            for key in a.scores:
                assert a.scores[key].dtype == b.scores[key].dtype and a.scores[key].tobytes() == b.scores[key].tobytes()
        else:
            assert a.scores.dtype == b.scores.dtype and a.scores.tobytes() == b.scores.tobytes()
        assert a.generated == b.generated


def crash_and_resume(model, prompts, score, run: EngineSettings, crash_at: int):
    """(results, summary, shard steps run before the crash, shard steps run after it)."""
    hooks, before = counting_hooks(crash_at)
    with pytest.raises(Crash):
        score_prompts(model, prompts, score, run, hooks=hooks)
    hooks, after = counting_hooks()
    results, summary = score_prompts(model, prompts, score, run, hooks=hooks)
    return results, summary, before, after


@pytest.mark.parametrize("storage", ["gpu", "cpu", "disk"])
@pytest.mark.parametrize("steps", [1, 3])
def test_a_stopped_round_resumes_from_its_last_checkpoint_byte_identical(storage, steps, layerwise, tmp_path):
    model = layerwise("llama")
    prompts = tokenize(model)
    score = ScoreSpec("next_token_probs" if steps > 1 else "suffix_logprob", generate_tokens=steps)
    run = settings(tmp_path, storage=storage)
    expected, plain = score_prompts(model, prompts, score, dataclasses.replace(run, checkpoint_dir=None))
    total = plain.shard_steps
    crash_at = total - 3  # the middle of the last pass: every kind of state (cache, scores) is in play
    results, summary, before, after = crash_and_resume(model, prompts, score, run, crash_at)
    assert_identical(results, expected)
    assert summary.shards_resumed > 0 and summary.shard_steps == total
    assert len(after) == total - summary.shards_resumed  # the shards before the checkpoint: not run again
    assert after[0] != (0, 0)
    # the work lost is what ran since the last checkpoint: at most one interval (here 2 shard steps)
    assert len(before) - summary.shards_resumed <= run.checkpoint_shards


def test_the_disk_tier_links_its_batch_files_into_the_checkpoint(layerwise, tmp_path):
    """No byte of the disk tier's activations is copied: the checkpoint's files are the store's
    (the same inodes), and the store's next writes replace them rather than change them."""
    model = layerwise("llama")
    prompts = tokenize(model)
    run = settings(tmp_path, storage="disk", checkpoint_shards=3)
    folder = round_folder(run.checkpoint_dir, [p.index for p in prompts])
    seen = {}

    def after_shard(step: int, shard: int) -> None:
        if shard == 2:  # the checkpoint after three shard steps has just been taken
            (checkpoint,) = folder.iterdir()
            store = {p.name: p for p in Path(run.disk_folder).glob("activations-*/batch*.safetensors")}
            linked = sorted(checkpoint.glob("act-*.safetensors"))
            assert store and len(linked) == len(store)
            assert all(os.path.samefile(p, store[p.name[len("act-"):]]) for p in linked)
            seen.update({p: p.read_bytes() for p in linked})
        if shard == 3:
            assert seen and all(p.read_bytes() == data for p, data in seen.items())
            raise Crash()

    with pytest.raises(Crash):
        score_prompts(model, prompts, ScoreSpec("suffix_logprob"), run, hooks=EngineHooks(after_shard=after_shard))
    (checkpoint,) = folder.iterdir()
    meta = json.loads((checkpoint / META_NAME).read_text())
    assert (meta["step"], meta["position"]) == (0, 3)


def test_an_interval_of_one_shard_in_a_streamed_moe_layer_checkpoints_only_between_whole_layers(layerwise, tmp_path):
    model = layerwise("mixtral")
    prompts = tokenize(model)
    score = ScoreSpec("next_token_probs", generate_tokens=2)
    run = settings(tmp_path, experts_per_group=1, checkpoint_shards=1)
    expected, plain = score_prompts(model, prompts, score, dataclasses.replace(run, checkpoint_dir=None))
    crash_at = plain.shard_steps // 2 + 2
    results, summary, before, after = crash_and_resume(model, prompts, score, run, crash_at)
    assert_identical(results, expected)
    experts = read_manifest(model).decoder_layers[0].experts
    assert summary.shards_resumed > 0 and len(after) == plain.shard_steps - summary.shards_resumed
    # a streamed layer is its dense part and `experts` groups: no checkpoint inside it
    assert len(before) - summary.shards_resumed <= experts + 1


@pytest.mark.parametrize("damage", ["truncated", "other job", "other batches"])
def test_a_damaged_or_foreign_checkpoint_is_ignored_and_the_round_computed_anew(damage, layerwise, tmp_path):
    model = layerwise("llama")
    prompts = tokenize(model)
    score = ScoreSpec("next_token_probs", generate_tokens=2)
    run = settings(tmp_path, storage="cpu")
    expected, plain = score_prompts(model, prompts, score, dataclasses.replace(run, checkpoint_dir=None))
    hooks, _ = counting_hooks(crash_at=plain.shard_steps - 2)
    with pytest.raises(Crash):
        score_prompts(model, prompts, score, run, hooks=hooks)
    (checkpoint,) = round_folder(run.checkpoint_dir, [p.index for p in prompts]).iterdir()
    if damage == "truncated":
        victim = max(checkpoint.glob("*.safetensors"), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[:-100])
        again = run
    elif damage == "other job":
        again = dataclasses.replace(run, checkpoint_key="job-b")
    else:
        again = dataclasses.replace(run, batch_tokens=4096)
        expected, plain = score_prompts(model, prompts, score, dataclasses.replace(again, checkpoint_dir=None))
    hooks, after = counting_hooks()
    results, summary = score_prompts(model, prompts, score, again, hooks=hooks)
    assert_identical(results, expected)
    assert summary.shards_resumed == 0 and len(after) == plain.shard_steps


def test_no_checkpoint_is_taken_with_an_interval_of_zero(layerwise, tmp_path):
    model = layerwise("llama")
    prompts = tokenize(model)
    run = settings(tmp_path, checkpoint_shards=0)
    _, summary = score_prompts(model, prompts, ScoreSpec("next_token_probs", generate_tokens=2), run)
    assert summary.checkpoints == 0
    assert not any(Path(run.checkpoint_dir).rglob("*.safetensors"))


# -- end to end: flexorch submit, a worker SIGKILLed mid-pass, re-submitted ---------------------------------
@pytest.mark.parametrize("storage, steps, kill_after", [("disk", 3, 8), ("cpu", 1, 3)])
def test_a_worker_killed_mid_pass_resumes_from_its_checkpoint_byte_identical(storage, steps, kill_after, tmp_path,
                                                                           layerwise):
    from rich.console import Console

    from flexorch.contract.messages import WorkerHooks
    from flexorch.orchestrator import controller
    from test_controller import submit, write_job

    model = layerwise("llama")
    score = {"kind": "next_token_probs"} if steps > 1 else {"kind": "suffix_logprob"}
    keys = dict(storage=storage, generate_tokens=steps, layers_per_shard=1, score=score)
    (tmp_path / "plain").mkdir()
    assert submit(write_job(tmp_path / "plain", model, checkpoint_interval="off", **keys)) == 0
    (tmp_path / "killed").mkdir()
    # a bound below any shard's time: a checkpoint after every shard
    job = write_job(tmp_path / "killed", model, checkpoint_interval=1e-9, **keys)
    faults = {"worker0": WorkerHooks(sigkill_after_shard=kill_after)}
    assert controller.submit(job, Console(stderr=True), faults=faults) == 1
    job_dir = tmp_path / "killed" / "job.job"
    assert len(list((job_dir / CHECKPOINTS_DIR).rglob(META_NAME))) == 1  # the newest only
    assert not list((job_dir / "parts").glob("*.npz"))  # the round was in progress

    assert submit(job) == 0
    assert (tmp_path / "killed" / "job.pkl").read_bytes() == (tmp_path / "plain" / "job.pkl").read_bytes()
    log = (job_dir / "logs" / "worker0.log").read_text()
    shards = len(plan_shards(read_manifest(model), 1))  # one layer per shard: embedding, decoders, norm + head
    # the kill came right after the checkpoint of the `kill_after`-th shard step: nothing after it is lost
    assert f"({kill_after} of {steps * shards} shard steps not recomputed)" in log
    assert not any((job_dir / CHECKPOINTS_DIR).iterdir())  # the round committed: its checkpoints removed


def test_restart_discards_the_checkpoints_of_the_run_it_replaces(tmp_path, layerwise):
    from rich.console import Console

    from flexorch.contract.messages import WorkerHooks
    from flexorch.orchestrator import controller
    from test_controller import submit, write_job

    job = write_job(tmp_path, layerwise("llama"), checkpoint_interval=1e-9, layers_per_shard=1, storage="cpu")
    assert controller.submit(job, Console(stderr=True), faults={"worker0": WorkerHooks(sigkill_after_shard=3)}) == 1
    assert list((tmp_path / "job.job" / CHECKPOINTS_DIR).rglob(META_NAME))
    assert submit(job, "--restart") == 0
    assert "resumed from checkpoint" not in (tmp_path / "job.job" / "logs" / "worker0.log").read_text()
    assert not any((tmp_path / "job.job" / CHECKPOINTS_DIR).iterdir())
