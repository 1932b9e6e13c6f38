"""The `flexorch` entry point: bad input is exit 2 with one line naming the culprit and no output;
`plan` changes nothing; a prompt pickle's payload never runs; a corrupt layer file stops the job;
SIGINT (SIGTERM) to `flexorch submit` exits 130 (143) leaving no worker behind."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import psutil
import pytest

from flexorch.orchestrator import cli
from flexorch.contract.manifest import read_manifest

from test_controller import PROMPTS, write_job


def _fails_with(job, capsys, *needles, command="submit") -> str:
    status = cli.main([command, str(job)])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def _bad_jsonl(tmp_path, lines):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("case", ["unknown key", "missing prompts", "bad json line", "empty suffixes",
                                  "too long", "not a model", "multi-token score string", "bad value"])
def test_bad_input_exits_2_naming_the_culprit_with_no_output(tmp_path, layerwise, capsys, case):
    model = layerwise("llama")
    ok = json.dumps(PROMPTS[0])
    if case == "unknown key":
        job = write_job(tmp_path, model, layer_per_shard=2)
        needles = ["layer_per_shard", "did you mean 'layers_per_shard'"]
    elif case == "missing prompts":
        job = write_job(tmp_path, model, prompts=str(tmp_path / "nowhere.jsonl"))
        needles = ["prompts", "nowhere.jsonl"]
    elif case == "bad json line":
        _bad_jsonl(tmp_path, [ok, '{"prefix": "x", "suffixes": [" a"'])
        job = write_job(tmp_path, model)
        needles = ["prompts.jsonl", "line 2"]
    elif case == "empty suffixes":
        _bad_jsonl(tmp_path, [ok, ok, json.dumps({"prefix": "x", "suffixes": []})])
        job = write_job(tmp_path, model)
        needles = ["prompts.jsonl", "line 3", "suffixes"]
    elif case == "too long":
        _bad_jsonl(tmp_path, [ok, json.dumps({"prefix": "word " * 40, "suffixes": [" a"], "id": "long-one"})])
        job = write_job(tmp_path, model, max_length=32)
        needles = ["prompt index 1", "long-one", "max_length 32"]
    elif case == "not a model":
        (tmp_path / "empty-model").mkdir()
        job = write_job(tmp_path, tmp_path / "empty-model")
        needles = ["empty-model", "neither a layerwise dir"]
    elif case == "multi-token score string":
        job = write_job(tmp_path, model, score={"kind": "token_probs", "tokens": [" A", " Paris is lovely"]})
        needles = ["score.tokens", "' Paris is lovely'"]
    else:
        job = write_job(tmp_path, model, generate_tokens=0)
        needles = ["generate_tokens"]
    _fails_with(job, capsys, *needles)
    assert not (tmp_path / "job.pkl").exists()
    assert not (tmp_path / "job.job").exists()  # nothing started


class _Payload:
    """What a malicious prompts pickle carries: unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_prompt_pickle_is_refused_and_never_runs(tmp_path, layerwise, capsys):
    marker = tmp_path / "pwned"
    prompts = tmp_path / "prompts.pkl"
    prompts.write_bytes(pickle.dumps([("prefix", (" a", " b")), ("p", [_Payload(marker)])]))
    job = write_job(tmp_path, layerwise("llama"), prompts=str(prompts))
    _fails_with(job, capsys, "prompts.pkl", "refused", "system")
    assert not marker.exists()
    assert not (tmp_path / "job.pkl").exists()


def test_plan_of_an_hf_checkpoint_changes_nothing(tmp_path, checkpoint, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLEXORCH_CACHE", str(cache))
    job = write_job(tmp_path, checkpoint("llama"), devices=["cpu", "cpu"])
    assert cli.main(["plan", str(job), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [w["device"] for w in plan["workers"]] == ["cpu", "cpu"]
    assert sorted(i for w in plan["workers"] for i in w["prompt_indices"]) == list(range(len(PROMPTS)))
    assert not cache.exists()  # described, not converted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "prompts.jsonl"]


def test_altered_layer_file_stops_the_job_naming_the_layer(tmp_path, layerwise, capsys):
    model = tmp_path / "model.layers"
    shutil.copytree(layerwise("llama"), model)
    entry = read_manifest(model).entry("layer.1")
    with open(model / entry.file, "r+b") as f:  # flip one byte of the weights, size unchanged
        f.seek(entry.bytes - 3)
        byte = f.read(1)
        f.seek(entry.bytes - 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    job = write_job(tmp_path, model)
    assert cli.main(["submit", str(job)]) == 2  # the model is invalid: bad input, found while running
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: worker worker0 (cpu): ")
    assert entry.file in errors[0] and "checksum mismatch" in errors[0]
    assert not (tmp_path / "job.pkl").exists()
    assert json.loads((tmp_path / "job.job" / "report.json").read_text())["status"] == "failed"


def _read_until(stream, needle: str, deadline: float, seen: list[str]) -> None:
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise AssertionError("submit ended early:\n" + "".join(seen))
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"no {needle!r} in time:\n" + "".join(seen))


@pytest.mark.parametrize("signum, status, said", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_sigint_or_sigterm_stops_every_worker_and_exits_130_or_143(tmp_path, layerwise, signum, status, said):
    job = write_job(tmp_path, layerwise("llama"), devices=["cpu", "cpu"])
    env = {**os.environ, "FLEXORCH_TEST_FAULTS": json.dumps({"worker0": {"hang_after_rounds": 0},
                                                              "worker1": {"hang_after_rounds": 0}})}
    # as from a terminal: a suite run in the background (`cmd &`) ignores SIGINT, and a controller
    # started with it ignored rightly keeps ignoring it (nohup's contract)
    proc = subprocess.Popen([sys.executable, "-m", "flexorch.orchestrator.cli", "submit", str(job)], env=env,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        _read_until(proc.stderr, "started (pid", deadline, seen)
        _read_until(proc.stderr, "started (pid", deadline, seen)
        workers = psutil.Process(proc.pid).children(recursive=True)
        worker_pids = {int(line.split("pid ")[1].split(")")[0]) for line in seen if "started (pid" in line}
        assert worker_pids <= {p.pid for p in workers}
        proc.send_signal(signum)
        exit_status = proc.wait(timeout=30)
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert exit_status == status, "".join(seen) + rest
    assert said in rest
    _gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive
    assert not (tmp_path / "job.pkl").exists()
    report = json.loads((tmp_path / "job.job" / "report.json").read_text())
    assert report["status"] == "interrupted" and report["error"] == said


def test_untested_model_type_is_refused_before_any_work(tmp_path, layerwise, capsys):
    model = tmp_path / "model"
    shutil.copytree(layerwise("llama"), model)
    for name in ("flexorch_manifest.json", "config.json"):  # relabelled consistently: prepared as helium
        data = json.loads((model / name).read_text())
        data["model_type"] = "helium"
        (model / name).write_text(json.dumps(data))
    job = write_job(tmp_path, model)
    _fails_with(job, capsys, "model type 'helium' is not tested", "mixtral", "allow_untested_models: true")
    assert not (tmp_path / "job.job").exists()  # nothing started
    allowed = write_job(tmp_path, model, name="allowed", allow_untested_models=True)
    assert cli.main(["plan", str(allowed)]) == 0


# -- what plan and probe print (issue 29, friction 8) -------------------------------------------------
def test_plan_gives_the_same_time_in_its_table_and_its_text_with_the_start_up_shown(tmp_path, layerwise, capsys):
    job = write_job(tmp_path, layerwise("llama"), devices=["cpu", "cpu"])
    assert cli.main(["plan", str(job)]) == 0
    out = capsys.readouterr().out
    # the table's rows end with each worker's time; the text gives each worker's and the mode's (its slowest)
    times = dict(re.findall(r"^(worker\d) .* (\d+\.\d (?:s|min|h))$", out, re.MULTILINE))
    assert sorted(times) == ["worker0", "worker1"]
    for name, time_ in times.items():
        assert re.search(rf"^- {name}: predicted {re.escape(time_)} = \d+\.\d s start-up \+ ", out, re.MULTILINE), out
    mode = re.search(r"^- predicted data \(2 workers\): (\d+\.\d (?:s|min|h)) = \d+\.\d s start-up \+ ", out,
                     re.MULTILINE)
    assert mode and mode.group(1) in times.values(), out


def test_probe_shows_the_cached_calibration_saying_it_is_cached(tmp_path, monkeypatch, capsys):
    from test_calibrate import MEASURED

    from flexorch.orchestrator import calibrate

    monkeypatch.setenv("FLEXORCH_CACHE", str(tmp_path))
    monkeypatch.setenv("FLEXORCH_CALIBRATE", "1")
    monkeypatch.setattr(calibrate, "measure", lambda hardware, key, disk_dir: replace(MEASURED, machine=key))
    assert cli.main(["probe"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "no calibration cached for this machine" in out and "Calibration (" not in out
    assert not (tmp_path / "calibration").exists()  # probe alone never measures
    assert cli.main(["probe", "--calibrate"]) == 0
    assert "measured now, cached in" in " ".join(capsys.readouterr().out.split())
    assert cli.main(["probe"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps the caption
    (cache,) = (tmp_path / "calibration").glob("*.json")
    assert "Calibration (measured 2026-11-25 23:00 UTC in 12 s)" in out
    assert f"cachedin{cache}" in out.replace(" ", "")  # the path may be wrapped anywhere
    assert "worker fixed RAM" in out


def test_install_hints_are_commands_that_work_from_a_checkout(tmp_path):
    """Installing an extra through flexorch's name fails (flexorch is not on PyPI): every hint names
    the extra's own requirements, those pyproject.toml lists, and nothing in the tree suggests the other
    form."""
    import re
    import tomllib
    from pathlib import Path

    from flexorch.orchestrator.extras import install_hint

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("ray", "lm-eval"):
        hint = install_hint(extra)
        assert hint.startswith("pip install ") and "flexorch" not in hint
        listed = [r.strip("'") for r in hint.removeprefix("pip install ").split(" ")]
        assert sorted(_normal(r) for r in listed) == sorted(_normal(r) for r in extras[extra]), hint
    hide = ("import sys; sys.modules['lm_eval'] = None; from flexorch.orchestrator.cli import main; "
            "sys.exit(main(['eval', '--tasks', 'x']))")
    result = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: flexorch eval runs lm-evaluation-harness, which is not installed: {install_hint('lm-eval')}"]
    stale = re.compile(r"pip install ['\"]?flexorch\[")
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    offenders = [name for name in tracked.split() if name.endswith((".py", ".md", ".toml", ".yaml", ".txt"))
                 and name != "orchestrator/extras.py" and stale.search((root / name).read_text(errors="replace"))]
    assert not offenders


def _normal(requirement: str) -> tuple:
    """A requirement with its version clauses in one order (metadata may reorder `>=a,<b`)."""
    import re

    name = re.match(r"[\w.\-\[\]]+", requirement).group()
    return name, sorted(c.strip() for c in requirement[len(name):].split(","))
