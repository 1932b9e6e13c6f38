"""Resume: job.json's fingerprint, committed parts, and re-submitting after a kill.

A re-submitted job skips every committed round and its output equals an uninterrupted run's bit for
bit (same plan, so every round holds the same prompts and batches); a changed job is refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zipfile

import numpy as np
import pytest
from rich.console import Console

from flexorch.orchestrator import controller, jobstate, planner
from flexorch.orchestrator.jobstate import Fingerprint, locked, open_job
from flexorch.contract.errors import UserError
from flexorch.contract.protocol import PromptResult
from flexorch.contract.messages import WorkerHooks
from flexorch.contract.parts import read_part_indices, write_part

from test_controller import PROMPTS, submit, write_job, write_prompts

FP = Fingerprint(model="m", prompts="p", token_ids="t", score="next_token_probs", generate_tokens=1,
                 dtype="float32", flexorch="0.1.0")


def _part(parts_dir, name, indices):
    results = [PromptResult(i, np.full((2, 1, 3), i, np.float32), ((i,), (i,))) for i in indices]
    return write_part(parts_dir / name, "next_token_probs", results)


# -- job.json and parts ---------------------------------------------------------------------------
def test_fresh_job_dir_gets_job_json_and_nothing_completed(tmp_path):
    state = open_job(tmp_path / "j", FP, 4)
    assert state.completed == {} and state.runs == 1
    data = json.loads((tmp_path / "j" / "job.json").read_text())
    assert data["fingerprint"]["prompts"] == "p" and data["prompts"] == 4


def test_same_fingerprint_reuses_committed_parts_and_cleans_temp_files(tmp_path):
    state = open_job(tmp_path, FP, 4)
    a = _part(state.parts_dir, "part-a.npz", [0, 1])
    _part(state.parts_dir, "part-b.npz", [3])
    (state.parts_dir / ".part-c.npz.123.abcd.tmp").write_bytes(b"torn")  # a write a kill interrupted
    (state.parts_dir / "part-bad.npz").write_bytes(b"not a zip")
    state = open_job(tmp_path, FP, 4)
    assert state.runs == 2
    assert dict(state.completed) == {0: a, 1: a, 3: state.parts_dir / "part-b.npz"}
    assert state.unreadable_parts == (state.parts_dir / "part-bad.npz",)
    assert not list(state.parts_dir.glob("*.tmp"))
    assert [p.name for p in state.parts()] == ["part-a.npz", "part-b.npz"]
    assert (state.parts_dir / "part-bad.npz.damaged").read_bytes() == b"not a zip"


def test_different_fingerprint_is_refused_naming_what_changed(tmp_path):
    open_job(tmp_path, FP, 4)
    changed = Fingerprint(**{**FP.__dict__, "prompts": "p2", "dtype": "bfloat16"})
    with pytest.raises(UserError, match=rf"job_dir {tmp_path} holds results of a different job \(changed: prompts, "
                                        r"dtype\); use a new job_dir or --restart"):
        open_job(tmp_path, changed, 4)


def test_restart_discards_parts_and_takes_the_new_fingerprint(tmp_path):
    state = open_job(tmp_path, FP, 4)
    _part(state.parts_dir, "part-a.npz", [0])
    changed = Fingerprint(**{**FP.__dict__, "prompts": "p2"})
    state = open_job(tmp_path, changed, 4, restart=True)
    assert state.completed == {} and not list(state.parts_dir.iterdir())
    assert open_job(tmp_path, changed, 4).runs == 2


def test_parts_without_job_json_are_not_trusted(tmp_path):
    (tmp_path / "parts").mkdir()
    _part(tmp_path / "parts", "part-a.npz", [0])
    with pytest.raises(UserError, match="holds parts but no job.json"):
        open_job(tmp_path, FP, 4)


def test_a_part_naming_prompts_outside_the_job_is_not_reused(tmp_path):
    state = open_job(tmp_path, FP, 4)
    _part(state.parts_dir, "part-a.npz", [2, 9])
    assert open_job(tmp_path, FP, 4).completed == {}


def test_job_dir_is_held_by_one_submit_at_a_time(tmp_path):
    with locked(tmp_path):
        with pytest.raises(UserError, match="in use by another"):
            with locked(tmp_path):
                pass
    with locked(tmp_path):  # released
        pass


# -- end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rounds_of_one_prompt():
    """One prompt per round (a tiny model's slice would otherwise be one round), so a worker can
    be stopped between rounds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(planner.search, "ROUND_TARGET_SECONDS", 0.0)
        mp.setattr(planner.search, "ROUND_MIN_COMPUTE_OVER_READ", 0.0)
        yield


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, layerwise, rounds_of_one_prompt):
    """The output bytes of an uninterrupted two-worker run."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    job = write_job(tmp, layerwise("llama"), devices=["cpu", "cpu"])
    assert submit(job) == 0
    return (tmp / "job.pkl").read_bytes()


def _committed_prompts(job_dir) -> int:
    return sum(len(read_part_indices(p)) for p in (job_dir / "parts").glob("*.npz"))


def test_killed_worker_fails_at_once_and_resubmit_resumes_bit_for_bit(tmp_path, layerwise, uninterrupted, capsys):
    job = write_job(tmp_path, layerwise("llama"), devices=["cpu", "cpu"])
    # worker1 dies (SIGKILL) after one committed round; worker0 would wait for ever after one round,
    # so the job ends only because the controller noticed the death and stopped worker0.
    faults = {"worker0": WorkerHooks(hang_after_rounds=1), "worker1": WorkerHooks(sigkill_after_rounds=1)}
    assert controller.submit(job, Console(stderr=True), faults=faults) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: worker worker1 (cpu, pid ") and "killed by SIGKILL" in err[-1]
    assert not (tmp_path / "job.pkl").exists()
    report = json.loads((tmp_path / "job.job" / "report.json").read_text())
    assert [w["status"] for w in report["workers"]] == ["stopped", "failed"]
    committed = _committed_prompts(tmp_path / "job.job")
    assert 1 <= committed <= 2

    assert submit(job) == 0
    report = json.loads((tmp_path / "job.job" / "report.json").read_text())
    assert report["prompts_reused"] == committed and report["prompts_computed"] == len(PROMPTS) - committed
    assert report["runs"] == 2
    assert sum(w["prompts_reused"] for w in report["workers"]) == committed
    assert (tmp_path / "job.pkl").read_bytes() == uninterrupted


@pytest.mark.slow
def test_kills_at_random_points_all_resume_to_the_same_output(tmp_path, layerwise, uninterrupted):
    """Kill worker0 at random progress events (within a round, between rounds), resume, repeat."""
    job = write_job(tmp_path, layerwise("llama"), devices=["cpu", "cpu"])
    rng = random.Random(1234)
    statuses = []
    for _ in range(2):
        faults = {"worker0": WorkerHooks(sigkill_after_progress=rng.randint(1, 6))}
        statuses.append(controller.submit(job, Console(stderr=True), faults=faults))
    assert submit(job) == 0
    assert statuses[0] == 1
    assert (tmp_path / "job.pkl").read_bytes() == uninterrupted


def test_changed_prompts_are_refused_on_resume(tmp_path, layerwise, capsys):
    job = write_job(tmp_path, layerwise("llama"))
    spec_dir = tmp_path / "job.job"
    # A previous run's state, as a killed submit leaves it (job.json written, nothing merged).
    from flexorch.orchestrator.controller import prepare_job
    from flexorch.orchestrator.spec import load_job
    from flexorch.contract.manifest import read_manifest

    spec = load_job(job)
    prepared = prepare_job(spec, spec.model, read_manifest(spec.model))
    fingerprint = jobstate.make_fingerprint(prepared.manifest, spec.model, spec.prompts, prepared.tokenized,
                                            prepared.score, prepared.plan.dtype)
    open_job(spec_dir, fingerprint, len(PROMPTS))

    write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:-1] + [{"prefix": "Changed", "suffixes": [" yes"]}])
    assert submit(job) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: job_dir {spec_dir} holds results of a different job (changed: prompts, token_ids); "
                   "use a new job_dir or --restart"]
    assert not (tmp_path / "job.pkl").exists()


# -- damaged state, re-submits, restarts -------------------------------------------------------------
def _damage(part, how: str) -> None:
    """Flip a byte inside the first score array's data (the zip CRC no longer matches), or cut the
    file in half (as a copy cut short would)."""
    if how == "truncated":
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
        return
    with zipfile.ZipFile(part) as archive:
        info = archive.getinfo("s0.npy")
    data = bytearray(part.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 200] ^= 0xFF
    part.write_bytes(bytes(data))


def test_damaged_parts_are_named_and_recomputed(tmp_path, layerwise, uninterrupted, capsys):
    job = write_job(tmp_path, layerwise("llama"), devices=["cpu", "cpu"])
    assert submit(job) == 0
    parts = sorted((tmp_path / "job.job" / "parts").glob("*.npz"))
    _damage(parts[0], "corrupt")
    _damage(parts[-1], "truncated")
    capsys.readouterr()
    assert submit(job) == 0
    err = capsys.readouterr().err
    assert "2 damaged part(s) moved aside" in err and parts[0].name in err and parts[-1].name in err
    assert "Traceback" not in err
    report = json.loads((tmp_path / "job.job" / "report.json").read_text())
    assert report["prompts_computed"] == 2  # one prompt per round, so per part
    assert (tmp_path / "job.pkl").read_bytes() == uninterrupted


def test_resubmit_of_a_finished_job_keeps_its_figures(tmp_path, layerwise, rounds_of_one_prompt):
    job = write_job(tmp_path, layerwise("llama"))
    assert submit(job) == 0
    first = json.loads((tmp_path / "job.job" / "report.json").read_text())
    assert submit(job) == 0
    again = json.loads((tmp_path / "job.job" / "report.json").read_text())
    assert again["prompts_reused"] == len(PROMPTS) and again["prompts_computed"] == 0 and again["runs"] == 2
    (was,), (now,) = first["workers"], again["workers"]
    assert now["status"] == "reused" and now["bytes_read"] == was["bytes_read"] > 0
    assert now["peak_rss"] == was["peak_rss"] and now["seconds"] == was["seconds"]


def test_failed_restart_keeps_the_finished_output(tmp_path, layerwise, uninterrupted):
    job = write_job(tmp_path, layerwise("llama"), devices=["cpu", "cpu"])
    assert submit(job) == 0
    faults = {"worker0": WorkerHooks(sigkill_after_rounds=0)}
    assert controller.submit(job, Console(stderr=True), restart=True, faults=faults) == 1
    assert (tmp_path / "job.pkl").read_bytes() == uninterrupted  # until a new one replaces it
    assert submit(job) == 0
    assert (tmp_path / "job.pkl").read_bytes() == uninterrupted


def test_edited_config_json_is_never_served_stale_results(tmp_path, layerwise, capsys):
    model = tmp_path / "model.layers"
    shutil.copytree(layerwise("llama"), model)
    job = write_job(tmp_path, model)
    assert submit(job) == 0
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.1}))  # changes every score
    capsys.readouterr()
    assert submit(job) == 2
    assert "holds results of a different job (changed: model)" in capsys.readouterr().err


def test_leftovers_of_dead_runs_are_removed(tmp_path, layerwise):
    job = write_job(tmp_path, layerwise("llama"), storage="disk")
    dead = 2**22 + 12345  # above pid_max on common systems: never a live process
    leftovers = [tmp_path / f".job.pkl.{dead}.0123abcd.tmp", tmp_path / "job.job" / f".report.json.{dead}.0123abcd.tmp",
                 tmp_path / "job.job" / "activations" / "worker0" / f"activations-{dead}-x1y2"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if path.name.startswith("activations") else path.write_bytes(b"x" * 1000)
    mine = tmp_path / f".job.pkl.{os.getpid()}.0123abcd.tmp"  # a live owner's file stays
    mine.write_bytes(b"x")
    assert submit(job) == 0
    assert not any(path.exists() for path in leftovers) and mine.exists()
