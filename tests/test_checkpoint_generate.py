"""Checkpoints of a generate round (workers/checkpoint.py with workers/generate.py's state): a round
stopped after some steps resumes from its last checkpoint — its sequences' ids, log-probs and stop
reasons put back, each step's batches rebuilt from the prompts then running — computes only the
shard steps after it, and ends byte-identical to an uninterrupted run, greedy and seeded sampling.

One job mixes sequences ending at EOS, at a stop string and at their own limits (test_generate's
`mixed_job`), so rows and whole batches have left before the stop. The engine is stopped by an
exception from its after_shard hook; the worker's SIGKILL and re-submit are tested end to end
through `flexorch submit` at the bottom.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from flexorch.contract.checkpoints import CHECKPOINTS_DIR, META_NAME, round_folder
from flexorch.contract.manifest import read_manifest
from flexorch.contract.protocol import Sampling, ScoreSpec, StopReason, TokenizedPrompt
from flexorch.contract.shards import plan_shards
from flexorch.workers.engine import EngineHooks, score_prompts
from flexorch.workers.generate import Generation

from test_checkpoint import Crash, assert_identical, settings
from test_generate import generated, mixed_job

SAMPLED = Sampling(temperature=1.5, top_p=0.95, top_k=50, seed=7)


def recording_hooks(crash_after_step: int | None = None, folder: Path | None = None) -> tuple[EngineHooks, list, list]:
    """Hooks recording every shard step run; with `crash_after_step`, raising Crash after the first
    shard of the step after it (within a step, rows having left), the newest checkpoint in `folder`
    then noted in the last list as its (step, position)."""
    ran, resumable = [], []

    def after_shard(step: int, shard: int) -> None:
        ran.append((step, shard))
        if crash_after_step is not None and step > crash_after_step:
            (checkpoint,) = folder.iterdir()  # only the newest is kept
            meta = json.loads((checkpoint / META_NAME).read_text())
            resumable.append((meta["step"], meta["position"]))
            raise Crash()

    return EngineHooks(after_shard=after_shard), ran, resumable


# every 2 of 6 shards: the newest checkpoint is a step's end; every shard: within a step (the KV cache
# of its first layers a step ahead of the others'). On a CPU worker the gpu tier is the cpu tier.
@pytest.mark.parametrize("sampling, storage, every", [(Sampling(), "cpu", 2), (SAMPLED, "disk", 1)])
def test_a_stopped_generate_round_resumes_byte_identical_without_recomputing_committed_steps(
        sampling, storage, every, checkpoint, layerwise, tmp_path):
    prompts, eos, expected, _ = mixed_job(checkpoint("llama"))
    model = layerwise("llama")
    score = ScoreSpec("generate", eos_ids=eos, logprobs=True, sampling=sampling)
    run = settings(tmp_path, storage=storage, checkpoint_shards=every)
    hooks, plain_ran, _ = recording_hooks()
    want, plain = score_prompts(model, prompts, score, dataclasses.replace(run, checkpoint_dir=None), hooks=hooks)
    if sampling.greedy:
        assert [generated(r)[0] for r in want] == expected  # what the uninterrupted run is: HF's
    shards = plain.shard_steps // max(p.max_new_tokens for p in prompts)
    crash_after = 4  # by then prompt 1 (limit 3) and the one ending at EOS (its 5th token at most) left
    assert any(len(ids) <= crash_after for ids, _ in expected)
    folder = round_folder(run.checkpoint_dir, [p.index for p in prompts])
    hooks, before, resumable = recording_hooks(crash_after, folder)
    events = []
    with pytest.raises(Crash):
        score_prompts(model, prompts, score, run, hooks=hooks, on_progress=events.append)
    (step, position), = resumable
    # progress says what the checkpoints keep (the report's `lost` is the rest): nothing at first
    assert events[0].saved_seconds == 0 and 0 < events[-1].saved_seconds <= events[-1].seconds

    hooks, after, _ = recording_hooks()
    events = []
    results, summary = score_prompts(model, prompts, score, run, hooks=hooks, on_progress=events.append)
    assert_identical(results, want)
    assert {e.shards_resumed for e in events} == {summary.shards_resumed}  # progress paces on the rest
    # the committed shard steps (every one before the checkpoint's point) are not run again
    assert summary.shards_resumed == step * shards + position > crash_after * shards
    assert position == (0 if every == 2 else 1)
    assert after == plain_ran[summary.shards_resumed:]
    assert len(before) - summary.shards_resumed <= every  # the work lost: at most one interval


@pytest.mark.parametrize("damage", ["another kind", "a foreign state"])
def test_a_generate_checkpoint_not_of_the_round_is_ignored_and_the_round_computed_anew(damage, checkpoint,
                                                                                      layerwise, tmp_path):
    """A generate round's checkpoint holds its sequences' state, not per-step scores: a round of another
    kind of score under the same key (a hand-made mix-up; a job's key covers its score) computes anew; so
    does the round itself where the state is not one of its (refused before anything is put back)."""
    from safetensors.torch import load_file, save_file

    prompts, eos, _, _ = mixed_job(checkpoint("llama"))
    prompts = [prompts[1], prompts[3]]  # limits of 3 and 5 steps
    model = layerwise("llama")
    run = settings(tmp_path, checkpoint_shards=1)
    score = ScoreSpec("generate", eos_ids=eos)
    folder = round_folder(run.checkpoint_dir, [p.index for p in prompts])
    hooks, _, resumable = recording_hooks(1, folder)
    with pytest.raises(Crash):
        score_prompts(model, prompts, score, run, hooks=hooks)
    assert resumable
    if damage == "another kind":
        _, summary = score_prompts(model, prompts, ScoreSpec("next_token_probs", generate_tokens=5), run)
        assert summary.shards_resumed == 0
        return
    (state_file,) = folder.glob("*/generation.safetensors")
    state = load_file(state_file)
    save_file({**state, "n_new": state["n_new"] + 1}, state_file)  # counts beyond the ids held; the same size
    want, _ = score_prompts(model, prompts, score, dataclasses.replace(run, checkpoint_dir=None))
    results, summary = score_prompts(model, prompts, score, run)
    assert summary.shards_resumed == 0
    assert_identical(results, want)


def test_generation_state_round_trips_and_a_foreign_one_is_refused_unchanged():
    prompts = [TokenizedPrompt(0, (1,), ((), ()), max_new_tokens=3, stop=("ab",)),
               TokenizedPrompt(1, (1, 2), ((),), max_new_tokens=4)]
    decode = lambda ids: "".join("ab"[t % 2] for t in ids)  # noqa: E731
    generation = Generation(prompts, eos_ids=(9,), decode=decode)
    generation.advance(0, [2, 9], [-1.0, -2.0 / 3])  # suffix 1: EOS
    generation.advance(1, [4], [-0.1])
    generation.advance(0, [3, 5], [-1.5, -1.0])  # "ab": stop
    generation.advance(1, [6], [-0.2])
    state = generation.state()

    resumed = Generation(prompts, eos_ids=(9,), decode=decode)
    resumed.restore(state, step=2)
    for i in range(len(prompts)):
        got, want = resumed.scores(i, logprobs=True), generation.scores(i, logprobs=True)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want)
    assert not resumed.live(0) and resumed.live(1)
    assert resumed.ran(0, 1) and not resumed.ran(0, 2) and resumed.ran(1, 2)  # each step's prompts then running
    assert [s.reason for s in resumed.sequences[0]] == [StopReason.STOP, StopReason.EOS]

    fresh = Generation(prompts, eos_ids=(9,), decode=decode)
    for bad, step in [(state, 3),  # a running sequence holds an id of every step done
                      ({**state, "n_new": torch.tensor([2, 1])}, 2),  # another count of sequences
                      ({**state, "reason": torch.tensor([7, 0, -1], dtype=torch.int8)}, 2)]:
        with pytest.raises(ValueError):
            fresh.restore(bad, step)
    assert all(s.ids == [] and s.reason is None for per in fresh.sequences for s in per)


# -- end to end: flexorch submit, a worker SIGKILLed mid-generation, re-submitted ----------------------------
def test_a_worker_killed_mid_generation_resumes_byte_identical(tmp_path, checkpoint, layerwise):
    from rich.console import Console

    from flexorch.contract.messages import WorkerHooks
    from flexorch.orchestrator import controller
    from test_controller import submit, write_job
    from test_generate import with_eos

    prompts, eos, _, _ = mixed_job(checkpoint("llama"))
    model = with_eos(layerwise("llama"), tmp_path, eos)
    items = [{"prefix_ids": list(p.prefix_ids), "max_new_tokens": p.max_new_tokens,
              **({"stop": list(p.stop)} if p.stop else {})} for p in prompts]
    keys = dict(storage="cpu", layers_per_shard=1, batch_tokens=60,
                score={"kind": "generate", "logprobs": True, "temperature": 1.2, "top_k": 40, "seed": 3})
    for name in ("plain", "killed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "prompts.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    assert submit(write_job(tmp_path / "plain", model, checkpoint_interval="off",
                            output=str(tmp_path / "plain" / "out.jsonl"), **keys)) == 0
    # a bound below any shard's time: a checkpoint after every shard; killed after the fifth step's first
    job = write_job(tmp_path / "killed", model, checkpoint_interval=1e-9, output=str(tmp_path / "killed" / "out.jsonl"),
                    **keys)
    shards = len(plan_shards(read_manifest(model), 1))  # one layer per shard: embedding, decoders, norm + head
    kill_after = 4 * shards + 1
    faults = {"worker0": WorkerHooks(sigkill_after_shard=kill_after)}
    assert controller.submit(job, Console(stderr=True), faults=faults) == 1
    job_dir = tmp_path / "killed" / "out.job"
    report = json.loads((job_dir / "report.json").read_text())
    assert report["lost"]["rounds"] == 1 and report["lost"]["prompts"] == len(prompts)

    assert submit(job) == 0
    assert (tmp_path / "killed" / "out.jsonl").read_bytes() == (tmp_path / "plain" / "out.jsonl").read_bytes()
    lines = [json.loads(line) for line in (tmp_path / "plain" / "out.jsonl").read_text().splitlines()]
    lengths = [len(line["generated_ids"][0]) for line in lines]
    assert min(lengths) < 4 < max(lengths)  # some sequences had ended before the kill, some ran on
    assert f"({kill_after} of " in (job_dir / "logs" / "worker0.log").read_text()  # shard steps not recomputed
    report = json.loads((job_dir / "report.json").read_text())
    assert [w["shards_resumed"] for w in report["workers"]] == [kill_after]
    (worker,) = report["workers"]  # the resumed run wrote one after each shard it computed
    assert worker["checkpoints"] >= 1 and worker["checkpoint_bytes"] > 0 and worker["checkpoint_seconds"] > 0
    plain = json.loads((tmp_path / "plain" / "out.job" / "report.json").read_text())["workers"][0]
    assert (plain["checkpoints"], plain["checkpoint_bytes"]) == (0, 0)
    assert not any((job_dir / CHECKPOINTS_DIR).iterdir())
    assert submit(job) == 0  # nothing left: the worker keeps the figures of the run that computed it
    assert [w["shards_resumed"] for w in json.loads((job_dir / "report.json").read_text())["workers"]] == [kill_after]


def test_the_planner_checkpoints_a_generate_round_priced_for_all_its_steps():
    """A generate round is priced for its longest limit (planner/search.py's `_checkpoints`): 256 steps
    of 8 prompts over a 13B on the CPU are hours, checkpointed within the default 10 minutes."""
    from test_planner import job_spec, llama2_13b, machine

    from flexorch.orchestrator.generation import GenerateSettings
    from flexorch.orchestrator.planner import make_plan
    from flexorch.orchestrator.spec import ScoreSettings

    spec = job_spec(devices=("cpu",), score=ScoreSettings("generate", generate=GenerateSettings()))
    (worker,) = make_plan(machine(), llama2_13b(), spec, [200] * 8, suffix_counts=[1] * 8, new_tokens=[256] * 8).workers
    (reason,) = [r for r in worker.reasons if r.startswith("checkpoints:")]
    assert worker.settings.checkpoint_shards > 0, reason
    per_round = int(reason.split(" per round")[0].split(", ")[-1])
    assert per_round >= worker.predicted_compute_seconds // 600, reason
