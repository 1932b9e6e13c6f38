"""Accuracy as lm-evaluation-harness reports it, and `flexorch show`."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest

from flexorch.orchestrator import cli
from flexorch.orchestrator.merge import write_output
from flexorch.orchestrator.prompts import Prompt
from flexorch.orchestrator.summary import summarize
from flexorch.contract.protocol import PromptResult


def logprob(*values):
    return {"logprob": np.array(values, dtype=np.float64), "is_greedy": np.zeros(len(values), bool),
            "n_tokens": np.ones(len(values), np.int64)}


def test_acc_and_acc_norm_with_lm_evals_stderr():
    # prompt 0: raw argmax " a" (-1.0) but per byte " long answer" wins (-1.2 / 12 bytes)
    prompts = [Prompt("q", (" a", " long answer"), answer=1), Prompt("q", (" x", " y"), answer=0),
               Prompt("q", (" x", " y")), Prompt("q", (" x", " y"), answer=0)]
    entries = [logprob(-1.0, -1.2), logprob(-0.5, -2.0), logprob(-3.0, -1.0), logprob(-2.0, -1.0)]
    s = summarize("suffix_logprob", entries, prompts)
    assert s.choices == (0, 0, 1, 1) and s.answered == 3 and s.answers == (1, 0, None, 0)
    assert s.acc == pytest.approx(1 / 3)
    assert s.acc_stderr == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))
    assert s.acc_norm == pytest.approx(2 / 3)  # prompt 0 right per byte, 1 right, 3 wrong either way


def test_token_probs_choice_indexes_the_tokens_and_next_token_has_no_accuracy():
    entries = [np.array([[[0.1, 0.7, 0.2]]], np.float32), np.array([[[0.5, 0.3, 0.2]]], np.float32)]
    s = summarize("token_probs", entries, [Prompt("q", (":",), answer=1), Prompt("q", (":",), answer=1)])
    assert s.choices == (1, 0) and s.acc == 0.5 and s.acc_norm is None
    s = summarize("next_token_probs", entries, [Prompt("q", (":",), answer=1)] * 2)
    assert s.choices == ([1], [0]) and s.acc is None


def test_show_reads_a_pkl_output_and_refuses_foreign_pickles(tmp_path, capsys):
    results = [PromptResult(0, logprob(-1.0, -0.5)), PromptResult(1, logprob(-0.1, -0.5))]
    path = write_output(tmp_path / "out.pkl", "suffix_logprob", results)
    assert cli.main(["show", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["choices"] == [1, 0]

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps([Payload()]))
    assert cli.main(["show", str(evil)]) == 2
    err = capsys.readouterr()
    assert "refused the global 'builtins.print'" in err.err and "ran" not in err.out
    assert cli.main(["show", str(tmp_path / "missing")]) == 2


def test_show_of_a_job_dir_prints_accuracy(tmp_path, layerwise, capsys):
    from test_controller import write_job

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in [
        {"prefix": "The sky is", "suffixes": [" blue", " green"], "answer": 0, "topic": "colour"},
        {"prefix": "One, two,", "suffixes": [" three", " four"], "answer": 0}]))
    job = write_job(tmp_path, layerwise("llama"), score={"kind": "suffix_logprob"}, output=str(tmp_path / "o.jsonl"))
    assert cli.main(["submit", str(job)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert lines[0]["answer"] == 0 and lines[0]["topic"] == "colour"
    report = json.loads((tmp_path / "o.job" / "report.json").read_text())
    assert report["summary"]["answered"] == 2 and report["summary"]["acc"] in (0.0, 0.5, 1.0)
    capsys.readouterr()
    assert cli.main(["show", str(tmp_path / "o.job")]) == 0
    out = capsys.readouterr().out
    assert "acc:" in out and "acc_norm:" in out and "2 prompts with an answer" in out
