"""End to end through the CLI entry point on CPU (real worker processes, tiny models); the progress
display is tests/test_progress.py.

Scores of `devices: [cpu, cpu, cpu]` equal one worker's bit for bit and the un-split Hugging Face
model's within float rounding, in prompt order; a worker killed mid-job fails the job at once with
no output; a hung worker is caught by worker_timeout.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import yaml

from flexorch.orchestrator import cli, planner

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




# -- what an interrupted run reports -----------------------------------------------------------------
def _parts_prompts(job_dir) -> int:
    from flexorch.contract.parts import read_part_indices

    return sum(len(read_part_indices(p)) for p in (job_dir / "parts").glob("*.npz"))


def test_a_run_killed_mid_round_reports_nothing_computed_and_the_round_lost(tmp_path, layerwise, capsys):
    from rich.console import Console

    from flexorch.orchestrator import controller
    from flexorch.contract.messages import WorkerHooks

    job = write_job(tmp_path, layerwise("llama"))
    # the worker sends its first progress event, then dies (SIGKILL) on the second: one round in flight
    faults = {"worker0": WorkerHooks(sigkill_after_progress=2)}
    assert controller.submit(job, Console(stderr=True), faults=faults) == 1
    report = json.loads((tmp_path / "job.job" / "report.json").read_text())
    assert report["status"] == "failed" and _parts_prompts(tmp_path / "job.job") == 0
    assert (report["prompts_computed"], report["prompts_left"], report["rounds_committed"]) == (0, len(PROMPTS), 0)
    assert report["lost"]["rounds"] == 1 and report["lost"]["prompts"] == len(PROMPTS)
    assert report["workers"][0]["in_flight"]["round"] == 0


def test_an_interrupted_run_reports_what_it_committed(tmp_path, layerwise):
    """SIGINT with one round committed per worker: report.json and the last line say so, equal to the parts."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_cli import _read_until

    job = write_job(tmp_path, layerwise("llama"), devices=["cpu", "cpu"])
    env = {**os.environ, "FLEXORCH_TEST_FAULTS": json.dumps({"worker0": {"hang_after_rounds": 1},
                                                              "worker1": {"hang_after_rounds": 1}})}
    # one prompt per round (the planner's constants, in the controller's own process)
    code = ("import sys; from flexorch.orchestrator import planner, cli; planner.search.ROUND_TARGET_SECONDS = 0.0; "
            "planner.search.ROUND_MIN_COMPUTE_OVER_READ = 0.0; sys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "submit", str(job)], env=env, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 240
        _read_until(proc.stderr, "committed (", deadline, seen)
        _read_until(proc.stderr, "committed (", deadline, seen)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    report = json.loads((tmp_path / "job.job" / "report.json").read_text())
    committed = _parts_prompts(tmp_path / "job.job")
    assert report["status"] == "interrupted" and committed == 2 and report["rounds_committed"] == 2
    assert (report["prompts_computed"], report["prompts_left"]) == (committed, len(PROMPTS) - committed)
    assert report["lost"] == {"rounds": 0, "prompts": 0, "engine_seconds": 0, "saved_seconds": 0}  # both hung between rounds
    assert f"2 of {len(PROMPTS)} prompts committed (2 by this run)" in rest, "".join(seen) + rest
