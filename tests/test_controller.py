"""End to end through the CLI entry point on CPU (real worker processes, tiny models), and the
progress display.

Scores of `devices: [cpu, cpu, cpu]` equal one worker's bit for bit and the un-split Hugging Face
model's within float rounding, in prompt order; a worker killed mid-job fails the job at once with
no output; a hung worker is caught by worker_timeout.
"""

from __future__ import annotations

import io
from dataclasses import replace
import json
import pickle

import numpy as np
import pytest
import yaml
from rich.console import Console

from flexorch.orchestrator import cli, planner
from flexorch.orchestrator.progress import LiveProgress, LogProgress, WorkerLine
from flexorch.contract.protocol import EngineSummary, ProgressEvent
from flexorch.contract.messages import Finished, Progress, Ready, RoundDone

PROMPTS = [
    {"prefix": "Question: What is the capital of France? Answer:", "suffixes": [" Paris", " Mars", " A", " B"]},
    {"prefix": "The quick brown fox", "suffixes": [" jumps", " over the lazy dog"], "id": "fox"},
    {"prefix": "A journey of a thousand miles begins with a single step. Streaming a large language model "
               "layer by layer lets a small graphics card run a model far larger than its memory:",
     "suffixes": [" load a layer", " yes", " no"]},
    {"prefix": "0 1 2 3 4 5", "suffixes": [" 6", " 7"]},
    {"prefix": "Science, history, geography, mathematics", "suffixes": [" and", " or", ", music"]},
    {"prefix": "Which planet is known as the red planet?", "suffixes": [" Mars", " Venus"], "id": 7},
]


def write_prompts(path, prompts=PROMPTS):
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


def write_job(tmp_path, model, name="job", **keys):
    """A job file in tmp_path with its prompts; keys override the defaults (devices, output, ...)."""
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        write_prompts(prompts)
    job = {"model": str(model), "prompts": str(prompts), "output": str(tmp_path / f"{name}.pkl"), "devices": "cpu"}
    job.update(keys)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def submit(job, *extra):
    return cli.main(["submit", str(job), *extra])


def reference_probs(model_dir, steps: int) -> list[np.ndarray]:
    """next_token_probs of the un-split model on prefix_ids + suffix_ids, greedy for `steps` steps:
    per prompt (n_suffixes, steps, vocab)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            prefix = tokenizer(prompt["prefix"])["input_ids"]
            per_suffix = []
            for suffix in prompt["suffixes"]:
                ids = prefix + tokenizer(suffix, add_special_tokens=False)["input_ids"]
                per_step = []
                for _ in range(steps):
                    probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
                    per_step.append(probs.numpy())
                    ids = ids + [int(probs.argmax())]
                per_suffix.append(np.stack(per_step))
            out.append(np.stack(per_suffix))
    return out


@pytest.fixture()
def many_rounds(monkeypatch):
    """One prompt per round (the planner aims at minutes of compute per round; a tiny model's whole
    slice would be one round), so tests can stop a worker between rounds."""
    monkeypatch.setattr(planner.search, "ROUND_TARGET_SECONDS", 0.0)
    monkeypatch.setattr(planner.search, "ROUND_MIN_COMPUTE_OVER_READ", 0.0)


def test_three_workers_equal_one_worker_and_the_unsplit_model(tmp_path, checkpoint, layerwise, capsys):
    model = layerwise("llama")
    one = write_job(tmp_path, model, "one", generate_tokens=2)
    three = write_job(tmp_path, model, "three", generate_tokens=2, devices=["cpu", "cpu", "cpu"],
                      output=str(tmp_path / "three.jsonl"))
    assert submit(one) == 0
    assert submit(three) == 0
    err = capsys.readouterr().err
    assert "worker2 (cpu): finished" in err

    single = pickle.loads((tmp_path / "one.pkl").read_bytes())
    lines = [json.loads(line) for line in (tmp_path / "three.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(len(PROMPTS)))
    assert [line.get("id") for line in lines] == [p.get("id") for p in PROMPTS]
    want = reference_probs(checkpoint("llama"), steps=2)
    for i, (got_one, line) in enumerate(zip(single, lines)):
        got_three = np.array(line["next_token_probs"], dtype=np.float32)
        assert got_one.dtype == np.float32 and got_one.shape == want[i].shape
        # Not bit for bit: the engine's batches differ with the slice (padding, rows per matmul),
        # which moves float32 rounding by ~1e-9. Resume keeps rounds, hence bits (test_resume).
        np.testing.assert_allclose(got_three, got_one, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(got_one, want[i], atol=1e-5, rtol=0)

    updated = [json.loads(line) for line in (tmp_path / "three_updated.jsonl").read_text().splitlines()]
    assert len(updated) == len(PROMPTS) and updated[1]["id"] == "fox"
    for prompt, new, line, probs in zip(PROMPTS, updated, lines, want):
        assert all(s.startswith(old) and len(s) > len(old) for old, s in zip(prompt["suffixes"], new["suffixes"]))
        # the ids chosen, beside the text they decode to: each step's argmax, per suffix
        assert line["generated_ids"] == new["generated_ids"] == probs.argmax(-1).tolist()
    assert (tmp_path / "one_updated.jsonl").exists()  # the prompts' own format, next to the output

    report = json.loads((tmp_path / "three.job" / "report.json").read_text())
    assert report["status"] == "completed" and report["prompts"] == 6 and report["prompts_reused"] == 0
    assert len(report["plan"]["workers"]) == 3
    for worker in report["workers"]:
        assert worker["device"] == "cpu" and worker["pid"] > 0 and worker["status"] == "finished"
        assert worker["prompts"] >= 1 and worker["bytes_read"] > 0 and worker["peak_rss"] > 0
        for key in ("seconds", "peak_device_memory", "load_seconds", "compute_seconds", "prompts_reused"):
            assert key in worker
    assert sum(w["prompts"] for w in report["workers"]) == 6


def test_hung_worker_is_stopped_after_worker_timeout(tmp_path, layerwise, many_rounds, monkeypatch, capsys):
    # worker_timeout counts from the worker's first progress (start-up has its own allowance); 5 s
    # leaves room for a round's engine set-up on a busy 2-core machine.
    job = write_job(tmp_path, layerwise("llama"), worker_timeout=5)
    monkeypatch.setenv("FLEXORCH_TEST_FAULTS", json.dumps({"worker0": {"hang_after_rounds": 1}}))
    assert submit(job) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: worker worker0 (cpu") and "no progress for 5 s (worker_timeout)" in err
    assert not (tmp_path / "job.pkl").exists()
    report = json.loads((tmp_path / "job.job" / "report.json").read_text())
    assert report["workers"][0]["rounds"] == 1 and report["workers"][0]["status"] == "failed"


# -- progress display ------------------------------------------------------------------------------
SUMMARY = EngineSummary(seconds=1.0, load_seconds=0.1, read_seconds=0.2, compute_seconds=0.9, bytes_read=100,
                        peak_rss=1, peak_device_memory=0)


def _event(stage, stages=4, step=1, steps=1, prompts=3):
    return ProgressEvent(stage=stage, stages=stages, step=step, steps=steps, prompts_done=0, prompts=prompts,
                         tokens_done=100, bytes_read=0, seconds=stage * 0.5)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_log_progress_writes_start_rounds_and_periodic_lines():
    out = io.StringIO()
    clock = _Clock()
    display = LogProgress(Console(file=out, width=60), [WorkerLine("w0", "cpu", 6, 3, 2)], clock=clock)
    display.handle(Ready("w0", 123))
    clock.now = 1.0
    display.handle(Progress("w0", 1, _event(1)))  # first progress line: nothing printed for it yet
    clock.now = 2.0
    display.handle(Progress("w0", 1, _event(2)))  # within LOG_INTERVAL_S: silent
    assert display.workers["w0"].position() == pytest.approx(3 + 3 * 2 / 4)
    clock.now = 20.0
    display.handle(Progress("w0", 1, _event(3)))
    display.handle(RoundDone("w0", 1, (3, 4, 5), "p.npz", SUMMARY))
    display.handle(Finished("w0", 21.0))
    lines = out.getvalue().splitlines()
    assert lines[0] == "w0 (cpu): started (pid 123): 6 prompts, 3 reused, 2 rounds"
    assert lines[1].startswith("w0 (cpu): shard 3/4 step 1/1  prompts 3/6") and "ETA" in lines[1]
    assert lines[2].startswith("w0 (cpu): round 2/2 committed (6/6 prompts); job 100%")
    assert lines[3] == "w0 (cpu): finished in 21.0 s"
    assert all(len(line) > 60 for line in lines[1:3])  # never wrapped at the console width


def test_live_progress_tracks_workers_and_the_job():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with LiveProgress(console, [WorkerLine("w0", "cpu", 3, 0, 1), WorkerLine("w1", "cuda:0", 3, 0, 1)]) as live:
        live.handle(Ready("w0", 1))
        live.handle(Progress("w0", 0, _event(2, steps=2, step=2)))  # 6 of 8 shard passes
        assert live.workers["w0"].position() == pytest.approx(3 * 6 / 8)
        live.handle(RoundDone("w1", 0, (3, 4, 5), "p.npz", SUMMARY))
        assert live.position() == pytest.approx(3 * 6 / 8 + 3)
        assert live.progress.tasks[0].completed == pytest.approx(live.position())
    assert "w1 (cuda:0)" in out.getvalue()


def test_progress_weighs_shards_by_predicted_cost_and_the_job_eta_is_the_slowest_workers():
    clock = _Clock()
    # 4 shards: the embedding costs nothing, two decoder shards half each, the head nothing
    shares = (0.0, 0.5, 0.5, 0.0)
    lines = [WorkerLine("w0", "cpu", 4, 0, 1, predicted_seconds=100.0, pass_shares=shares),
             WorkerLine("w1", "cpu", 4, 0, 1, predicted_seconds=40.0, pass_shares=shares)]
    display = LogProgress(Console(file=io.StringIO()), lines, clock=clock)
    assert display.eta_seconds() == 100.0  # before anything runs: the planner's prediction, slowest worker
    display.handle(Ready("w0", 1))
    display.handle(Ready("w1", 2))
    clock.now = 1.0
    display.handle(Progress("w0", 0, _event(1, prompts=4)))  # the embedding: no work done yet
    assert display.workers["w0"].position() == 0.0
    clock.now = 10.0
    display.handle(Progress("w0", 0, _event(2, prompts=4)))  # half the pass in 10 s
    display.handle(Progress("w1", 0, _event(3, prompts=4)))  # all the pass's work in 10 s: done
    # half done: half the predicted 100 s and half the 20 s its pace implies -> 60 s in all, 50 s left
    assert display.workers["w0"].eta_seconds(clock.now) == pytest.approx(50.0)
    assert display.workers["w1"].eta_seconds(clock.now) == pytest.approx(0.0)
    assert display.eta_seconds() == pytest.approx(50.0)
    clock.now = 19.0
    display.handle(Progress("w0", 0, _event(3, prompts=4)))  # nearly all of it: the pace decides
    assert display.workers["w0"].eta_seconds(clock.now) == pytest.approx(0.0)


def test_progress_moves_within_a_shard_batch_by_batch():
    # One decoder shard carries the pass: without batch events the bar would sit still for all of it.
    shares = (0.0, 1.0, 0.0)
    display = LogProgress(Console(file=io.StringIO()), [WorkerLine("w0", "cpu", 8, 0, 1, 80.0, shares)],
                          clock=_Clock())
    display.handle(Ready("w0", 1))
    positions = []
    for batch in (1, 2, 3):
        event = replace(_event(1, stages=3, prompts=8), batch=batch, batches=4)  # the decoder shard, 3 of 4 batches
        display.handle(Progress("w0", 0, event))
        positions.append(display.workers["w0"].position())
    assert positions == pytest.approx([2.0, 4.0, 6.0])
    assert "batch 3/4" in display.workers["w0"].detail()
    display.handle(Progress("w0", 0, _event(2, stages=3, prompts=8)))  # the shard done: no batch part
    assert display.workers["w0"].position() == pytest.approx(8.0)

