"""The Python API: same machinery and outputs as `flexorch submit`, prompts as Python objects, the
same one-line errors, resume through job_dir, and Results people can read."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import flexorch
from flexorch.orchestrator import cli

from test_controller import PROMPTS, write_job

MC = [{"prefix": "The capital of France is", "suffixes": [" Paris", " Rome", " a city in Europe"], "answer": 0,
       "id": "q1", "subject": "geography"},
      {"prefix": "2 + 2 =", "suffixes": [" 4", " 5"], "answer": 1},
      (("Red, green and", (" blue", " yellow")))]


@pytest.fixture(scope="module")
def model(layerwise):
    return layerwise("llama")


def test_api_and_cli_give_identical_outputs(tmp_path, model):
    job = write_job(tmp_path, model, score={"kind": "token_probs", "tokens": [" A", " the"]}, batch_tokens=256,
                    layers_per_shard=1)
    assert cli.main(["submit", str(job)]) == 0
    from_cli = pickle.loads((tmp_path / "job.pkl").read_bytes())

    results = flexorch.score(model, tmp_path / "prompts.jsonl", score="token_probs", tokens=[" A", " the"],
                             devices="cpu", batch_tokens=256, layers_per_shard=1, progress=False,
                             output=tmp_path / "api.pkl")
    from_api = pickle.loads((tmp_path / "api.pkl").read_bytes())
    assert len(from_cli) == len(from_api) == len(results) == len(PROMPTS)
    for a, b, r in zip(from_cli, from_api, results):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, r.scores)
    assert results.token_labels == (" A", " the")
    assert results.ids == [p.get("id") for p in PROMPTS]


def test_prompts_as_objects_resume_and_results(tmp_path, model):
    job_dir = tmp_path / "job"
    first = flexorch.score(model, MC, score="suffix_logprob", devices="cpu", job_dir=job_dir, progress=False)
    assert first.report["prompts_computed"] == 3
    again = flexorch.score(model, MC, score="suffix_logprob", devices="cpu", job_dir=job_dir, progress=False)
    assert again.report["prompts_reused"] == 3 and again.report["prompts_computed"] == 0
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.scores["logprob"], b.scores["logprob"])

    assert first[0].id == "q1" and first[0].fields == {"subject": "geography"} and first[2].answer is None
    assert first[0].choice == int(np.argmax(first[0].scores["logprob"]))
    hits = [p.choice == p.answer for p in first if p.answer is not None]
    assert first.accuracy == pytest.approx(sum(hits) / 2)
    records = first.to_records()
    assert len(records) == 7  # one per prompt and suffix
    assert records[0]["subject"] == "geography" and records[2]["suffix"] == " a city in Europe"
    assert records[0]["logprob"] == first[0].scores["logprob"][0]
    # The job dir holds a job file the CLI can resume from, and `flexorch show` reads it.
    assert cli.main(["submit", str(job_dir / "job.yaml")]) == 0
    assert json.loads((job_dir / "report.json").read_text())["prompts_reused"] == 3


def test_errors_are_one_line_user_errors_naming_the_keyword(model):
    with pytest.raises(flexorch.UserError, match=r"unknown key 'layer_per_shard' \(did you mean 'layers_per_shard'") as err:
        flexorch.score(model, MC, layer_per_shard=2)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    with pytest.raises(flexorch.UserError, match=r"prompts: \[1\]: suffixes: expected a list of strings"):
        flexorch.score(model, [MC[0], {"prefix": "x", "suffixes": "not a list"}])
    with pytest.raises(flexorch.UserError, match=r"answer: 5 is not the index of one of its 2 suffixes"):
        flexorch.plan(model, [{"prefix": "x", "suffixes": [" a", " b"], "answer": 5}])


def test_plan_runs_and_writes_nothing(tmp_path, model):
    plan = flexorch.plan(model, MC, devices="cpu", layers_per_shard=2)
    assert plan.workers[0].settings.layers_per_shard == 2
    assert list(tmp_path.iterdir()) == []


def test_works_from_a_script_under_main_guard(tmp_path, model):
    """Workers are spawned: the calling script is re-imported in them, as users' scripts are."""
    script = tmp_path / "score.py"
    script.write_text(textwrap.dedent(f"""
        import flexorch

        if __name__ == "__main__":
            results = flexorch.score({str(model)!r}, [("Hello", [" world", " there"])], score="suffix_logprob",
                                     devices=["cpu", "cpu"], progress=False)
            print(len(results), results[0].scores["logprob"].shape)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "(2,)"]


def test_works_from_a_script_without_main_guard_and_from_stdin(tmp_path, model):
    """Workers never re-run the caller's script: without a main guard it would start the job again,
    and a script read from stdin cannot be found by spawn at all."""
    code = (f"import flexorch\nr = flexorch.score({str(model)!r}, [('Hi', [' a'])], score='suffix_logprob', "
            "devices='cpu', progress=False)\nprint(len(r))\n")
    script = tmp_path / "bare.py"
    script.write_text(code)
    for command, stdin in (([sys.executable, str(script)], None), ([sys.executable, "-"], code)):
        out = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["1"]


def test_token_id_prompts_score_as_the_text_they_encode(tmp_path, model):
    """The same ids as text or as prefix_ids/suffix_ids: the same scores (within float32 rounding:
    the four prompts share batches differently from two)."""
    from flexorch.orchestrator.prompts import load_tokenizer

    tokenizer = load_tokenizer(model)
    text = MC[:2]
    ids = [{"prefix_ids": tokenizer(p["prefix"])["input_ids"],
            "suffix_ids": [tokenizer(s, add_special_tokens=False)["input_ids"] for s in p["suffixes"]],
            "answer": p["answer"]} for p in text]
    results = flexorch.score(model, text + ids, score="suffix_logprob", devices="cpu", progress=False)
    for as_text, as_ids in zip(results[:2], results[2:]):
        np.testing.assert_allclose(as_text.scores["logprob"], as_ids.scores["logprob"], rtol=0, atol=1e-5)
        assert as_ids.prefix_ids == tuple(ids[as_text.index]["prefix_ids"]) and as_ids.suffixes == ()
    assert results.to_records()[-1]["suffix_ids"] == ids[1]["suffix_ids"][-1]
    with pytest.raises(flexorch.UserError, match=r"prompt index 0: prefix_ids: token id 99999 is not in the model's"):
        flexorch.score(model, [{"prefix_ids": [1, 99999], "suffix_ids": [[2]]}], score="suffix_logprob", devices="cpu")


# -- hostile use: refused calls write nothing, a job's files are its own ----------------------------


def test_a_refused_call_writes_nothing(tmp_path, model, monkeypatch):
    """Validated first: the user's own prompts.jsonl in job_dir, the working folder (job_dir="") and
    the model dir are left as they were."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "prompts.jsonl").write_text("my own notes\n")
    before = {p: p.read_bytes() for p in [*folder.iterdir(), *model.rglob("*")] if p.is_file()}
    with pytest.raises(flexorch.UserError, match="batch_tokens: expected an integer >= 1 or auto, got -1"):
        flexorch.score(model, MC, job_dir=folder, batch_tokens=-1, progress=False)
    monkeypatch.chdir(folder)
    with pytest.raises(flexorch.UserError, match="job_dir: expected a path, got ''"):
        flexorch.score(model, MC, job_dir="", progress=False)
    with pytest.raises(flexorch.UserError, match="lies inside the model dir"):
        flexorch.score(model, MC, job_dir=model / "job", progress=False)
    after = {p: p.read_bytes() for p in [*folder.iterdir(), *model.rglob("*")] if p.is_file()}
    assert after == before


def test_a_job_dir_holding_files_of_the_users_is_refused(tmp_path, model):
    (tmp_path / "prompts.jsonl").write_text("my own notes\n")
    with pytest.raises(flexorch.UserError, match=r"holds a prompts.jsonl that is not this job's"):
        flexorch.score(model, MC, job_dir=tmp_path, devices="cpu", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]
    assert (tmp_path / "prompts.jsonl").read_text() == "my own notes\n"


def test_a_job_dir_in_use_is_refused_without_touching_its_files(tmp_path, model):
    from flexorch.orchestrator import jobstate

    job_dir = tmp_path / "job"
    flexorch.score(model, MC, score="suffix_logprob", devices="cpu", job_dir=job_dir, progress=False)
    files = {p: p.read_bytes() for p in job_dir.rglob("*") if p.is_file() and p.name != jobstate.LOCK_FILE}
    with jobstate.locked(job_dir):  # a job running there
        for prompts in (MC, MC[:2]):
            with pytest.raises(flexorch.UserError, match=f"job_dir {job_dir} is in use|not this job's|different job"):
                flexorch.score(model, prompts, score="suffix_logprob", devices="cpu", job_dir=job_dir,
                               batch_tokens=64, progress=False)
    assert {p: p.read_bytes() for p in files} == files
    assert cli.main(["submit", str(job_dir / "job.yaml")]) == 0  # the first job re-runs from its job file


def test_two_threads_scoring_at_once_both_return(model):
    import threading

    results = {}

    def run(name):
        try:
            results[name] = flexorch.score(model, MC, score="suffix_logprob", devices="cpu", progress=False)
        except BaseException as exc:  # noqa: BLE001 - the test reports what a thread raised
            results[name] = exc

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert all(isinstance(r, flexorch.Results) for r in results.values()) and len(results) == 2, results
    for a, b in zip(results["a"], results["b"]):
        np.testing.assert_array_equal(a.scores["logprob"], b.scores["logprob"])


def test_an_output_another_job_writes_is_refused_and_a_dead_jobs_lock_is_taken_over(tmp_path, model):
    from flexorch.orchestrator import jobstate

    output = tmp_path / "out" / "scores.pkl"
    with jobstate.locked_output(output):
        with pytest.raises(flexorch.UserError, match=rf"output {output} is being written by another job \(pid "):
            flexorch.score(model, MC, score="suffix_logprob", devices="cpu", output=output, job_dir=tmp_path / "b",
                           progress=False)
    assert not output.exists()
    lock = jobstate.output_lock_path(output)
    lock.write_text("999999999\n")  # left by a killed job: nothing holds it
    flexorch.score(model, MC, score="suffix_logprob", devices="cpu", output=output, progress=False)
    assert len(pickle.loads(output.read_bytes())) == len(MC)
    assert not lock.exists()


def test_a_call_without_job_dir_names_no_temporary_path(model, capsys):
    results = flexorch.score(model, MC, score="suffix_logprob", devices="cpu")
    err = capsys.readouterr().err
    assert "done: 3 prompts" in err and "flexorch-job-" not in err.split("done:")[1]
    assert results.output is None and results.report["output"] is None and results.report["job"] is None


def _holding_itself():
    fields = {"prefix": "x", "suffixes": [" a"]}
    fields["me"] = fields
    return fields


@pytest.mark.parametrize("arguments, expected", [
    (dict(score="token_probs", tokens=" A"), "score.tokens: expected a list of strings, got ' A'"),
    (dict(score="token_probs", tokens=" Paris"), "score.tokens: expected a list of strings, got ' Paris'"),
    (dict(score="token_probs", tokens=5), "score.tokens: expected a list of strings, got 5"),
    (dict(job_dir=5), "job_dir: expected a path, got 5"),
    (dict(prompts=[{"prefix": "x", "suffixes": [" a"], "n": np.int64(3)}]),
     r"prompts\[0\]: not JSON data: Object of type int64"),
    (dict(prompts=[{"prefix": "x", "suffixes": [" a"], "v": np.float32(0.5)}]), r"prompts\[0\]: not JSON data"),
    (dict(prompts=[_holding_itself()]), r"prompts\[0\]: not JSON data: Circular reference"),
    (dict(prompts=[{"prefix": "x", "suffixes": [" a"], "id": float("nan")}]), "id: expected a finite number, got nan"),
    (dict(prompts=[("x", [np.str_(" a")])], dtype=np.str_("float32"), worker_timeout=np.float64(60)), None),
    (dict(limits=_holding_itself()), "a keyword's value is nested too deeply"),
])
def test_bad_arguments_are_user_errors(tmp_path, model, arguments, expected):
    arguments = {"prompts": MC, **arguments}
    if expected is None:  # numpy's str and float subclasses: accepted, and written as plain YAML
        results = flexorch.score(model, devices="cpu", progress=False, job_dir=tmp_path / "job",
                                 score="suffix_logprob", **arguments)
        assert len(results) == 1 and "float32" in (tmp_path / "job" / "job.yaml").read_text()
        return
    with pytest.raises(flexorch.UserError, match=expected):
        flexorch.score(model, devices="cpu", progress=False, **arguments)


def test_a_job_dir_that_is_a_file_is_a_user_error(tmp_path, model):
    (tmp_path / "file").write_text("x")
    with pytest.raises(flexorch.UserError, match="job_dir: .* is a file, expected a folder"):
        flexorch.score(model, MC, job_dir=tmp_path / "file", progress=False)
    assert (tmp_path / "file").read_text() == "x"


def test_score_as_the_kind_alone_is_the_job_files_score(tmp_path, model):
    job = write_job(tmp_path, model, score="suffix_logprob")
    assert cli.main(["plan", str(job)]) == 0
    assert flexorch.plan(model, MC, score="suffix_logprob", devices="cpu").workers
