"""`flexorch show`: an output file or job dir read back and printed in 80 columns with the prompts'
ids, decoded argmax tokens and accuracy per field; a file that is not a flexorch output is exit 2
with one line naming it, without allocating what it declares."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from flexorch.orchestrator import cli
from flexorch.orchestrator.merge import write_output
from flexorch.contract.protocol import PromptResult

from test_controller import write_job, write_prompts


def logprob(*values):
    return {"logprob": np.array(values, dtype=np.float64), "is_greedy": np.zeros(len(values), bool),
            "n_tokens": np.ones(len(values), np.int64)}


def test_show_reads_a_pkl_output_and_refuses_foreign_pickles(tmp_path, capsys):
    results = [PromptResult(0, logprob(-1.0, -0.5)), PromptResult(1, logprob(-0.1, -0.5))]
    path = write_output(tmp_path / "out.pkl", "suffix_logprob", results)
    assert cli.main(["show", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["choices"] == [1, 0]
    # protocol 5 (numpy's _frombuffer) reads the same
    (tmp_path / "p5.pkl").write_bytes(pickle.dumps([r.scores for r in results], protocol=5))
    assert cli.main(["show", str(tmp_path / "p5.pkl"), "--json"]) == 0
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


def _declared_shape(array: np.ndarray, length: int) -> bytes:
    """`array`'s pickle (protocol 3: no frames to patch) with its 1-d shape replaced by (length,)."""
    data = pickle.dumps([array], protocol=3)
    shape = b"K" + bytes([len(array)]) + b"\x85"  # BININT1 n, TUPLE1: the array's shape
    assert data.count(shape) == 1
    return data.replace(shape, b"\x8a\x08" + length.to_bytes(8, "little") + b"\x85")  # LONG1


# float32 (2**43,): 32 TiB declared, 12 bytes given; object (2**40,): numpy would allocate 8 TiB of
# pointers before reading an item
HUGE_SHAPE = _declared_shape(np.arange(3, dtype=np.float32), 2**43)
OBJECT_ARRAY = _declared_shape(np.array([None, None], dtype=object), 2**40)


HOSTILE = {
    "a dict.pkl": (pickle.dumps({"logprob": [1.0]}), "a dict, not a non-empty list"),
    "an int.pkl": (pickle.dumps(5), "a int, not a non-empty list"),
    "a 1-d array.pkl": (pickle.dumps(np.arange(4.0)), "a ndarray, not a non-empty list"),
    "a list of 1-d arrays.pkl": (pickle.dumps([np.arange(4.0)]), "entry 0 is an array of shape (4,)"),
    "an empty list.pkl": (pickle.dumps([]), "not a non-empty list"),
    "strings.pkl": (pickle.dumps(["a", "b"]), "entry 0 is a str"),
    "dicts without logprob.pkl": (pickle.dumps([{"x": 1}]), "entry 0 has no 'logprob' array"),
    "a 5000-digit integer.pkl": (pickle.dumps([10**5000]), "entry 0 is a int"),
    "32 TiB shape.pkl": (HUGE_SHAPE, "declares 35184372088832 bytes, holds 12"),
    "object dtype.pkl": (OBJECT_ARRAY, "an array of dtype 'O8'"),
    "text.pkl": (b"hello world\n", "not a valid pickle"),
    "empty.pkl": (b"", "not a valid pickle"),
    "truncated.pkl": (pickle.dumps([np.arange(3.0)])[:40], "not a valid"),
    "no logprob.jsonl": (b'{"index": 0, "answer": 1}\n', "line 1: no 'logprob' field"),
    "a 5000-digit integer.jsonl": (b'{"logprob": [' + b"9" * 5000 + b"]}\n", "line 1:"),
    "logprob a string.jsonl": (b'{"logprob": "abc"}\n', "'logprob' is not an array of numbers"),
    "empty logprob.jsonl": (b'{"logprob": []}\n', "'logprob' has shape (0,)"),
    "a JSON array.jsonl": (b"[1, 2]\n", "line 1: not a JSON object"),
    "ragged probs.jsonl": (b'{"next_token_probs": [[[0.1]], [[0.1, 0.2]]]}\n', "is not an array of numbers"),
    "2-d probs.jsonl": (b'{"next_token_probs": [[0.1, 0.2]]}\n', "has shape (1, 2), expected 3"),
    "bad answer.jsonl": (b'{"logprob": [-1.0], "answer": "A"}\n', "'answer' is 'A', not an index"),
    "binary.jsonl": (b"\xff\xfe\x00", "not UTF-8 text"),
    "output.txt": (b"{}", "expected a .pkl or .jsonl output file"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_file_that_is_not_an_output_is_one_line_naming_it_exit_2(tmp_path, capsys, name):
    content, needle = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(content)
    assert cli.main(["show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}") and "Traceback" not in err, err
    assert needle in err, err


@pytest.mark.parametrize("summary", [None, [], {"prompts": 2, "kind": "suffix_logprob", "choices": "ab"},
                                     {"prompts": 1, "kind": "x", "choices": [0]},
                                     {"prompts": 1, "kind": "suffix_logprob", "choices": [0], "acc": "high"}])
def test_a_report_whose_summary_is_not_ours_is_one_line(tmp_path, capsys, summary):
    (tmp_path / "report.json").write_text(json.dumps({"status": "completed", "summary": summary}))
    assert cli.main(["show", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "report.json: " in err and "not a flexorch summary" in err, err


SUBJECT_PROMPTS = [
    {"prefix": "The sky is", "suffixes": [" blue", " green"], "answer": 0, "subject": "colour", "id": "sky"},
    {"prefix": "Grass is", "suffixes": [" green", " blue"], "answer": 0, "subject": "colour", "id": "grass"},
    {"prefix": "One, two,", "suffixes": [" three", " four"], "answer": 0, "subject": "counting",
     "id": "a-rather-long-prompt-identifier-that-would-not-fit-in-a-column-of-the-table-at-80-columns"},
    {"prefix": "Two, three,", "suffixes": [" four", " five"], "answer": 1, "subject": "counting"},
]


def test_show_of_a_job_dir_prints_ids_accuracy_by_field_in_80_columns(tmp_path, layerwise, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    write_prompts(tmp_path / "prompts.jsonl", SUBJECT_PROMPTS)
    job = write_job(tmp_path, layerwise("llama"), name="a-job-with-a-long-name-so-the-title-would-wrap",
                    score={"kind": "suffix_logprob"}, output=str(tmp_path / "o.jsonl"))
    assert cli.main(["submit", str(job)]) == 0
    report = json.loads((tmp_path / "o.job" / "report.json").read_text())
    summary = report["summary"]
    assert summary["ids"] == ["sky", "grass", SUBJECT_PROMPTS[2]["id"], None]
    assert summary["fields"] == {"subject": ["colour", "colour", "counting", "counting"]}
    capsys.readouterr()
    for source in (tmp_path / "o.job", tmp_path / "o.jsonl"):  # the job dir, and the output file alone
        assert cli.main(["show", str(source), "--by", "subject"]) == 0
        out = capsys.readouterr().out
        assert all(len(line) <= 80 for line in out.splitlines()), out
        assert "sky" in out and "grass" in out and "#3" in out  # ids; the index where a prompt has none
        assert "accuracy by subject" in out and "colour" in out and "counting" in out
        assert "acc:" in out and "4 prompts with an answer" in out
    assert cli.main(["show", str(tmp_path / "o.job"), "--by", "subject", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["by"]["subject"]
    hits = [c == a for c, a in zip(summary["choices"], summary["answers"])]
    assert [(g["value"], g["answered"], g["acc"]) for g in groups] == [
        ("colour", 2, sum(hits[:2]) / 2), ("counting", 2, sum(hits[2:]) / 2)]
    assert cli.main(["show", str(tmp_path / "o.job"), "--by", "topic"]) == 2
    assert "--by topic: not a field" in capsys.readouterr().err


def test_show_decodes_argmax_ids_with_the_jobs_tokenizer(tmp_path, layerwise, capsys, monkeypatch):
    from flexorch.orchestrator.prompts import load_tokenizer

    monkeypatch.setenv("COLUMNS", "80")
    model = layerwise("llama")
    write_prompts(tmp_path / "prompts.jsonl", SUBJECT_PROMPTS[:2])
    job = write_job(tmp_path, model, score={"kind": "next_token_probs"})
    assert cli.main(["submit", str(job)]) == 0
    capsys.readouterr()
    assert cli.main(["show", str(tmp_path / "job.job")]) == 0
    out = capsys.readouterr().out
    choices = json.loads((tmp_path / "job.job" / "report.json").read_text())["summary"]["choices"]
    tokenizer = load_tokenizer(model)
    for ids in choices:
        assert ", ".join(repr(tokenizer.decode([i])) for i in ids) in out.replace("\n", "") or \
            repr(tokenizer.decode([ids[0]])) in out, out
    assert all(len(line) <= 80 for line in out.splitlines()), out


def test_shows_acc_norm_equals_lm_evals_on_the_same_log_probs(tmp_path, layerwise, capsys):
    from test_summary import _lm_eval_acc_norm

    choices = [["café", "cafe", "naïve"], ["日本", "abcd"], ["ab", "abcdef"], ["é", "e", "ée"], ["x", "xyz"]]
    prompts = [{"prefix": f"Question {i}:", "suffixes": [" " + c for c in cs], "answer": i % len(cs)}
               for i, cs in enumerate(choices)]
    write_prompts(tmp_path / "prompts.jsonl", prompts)
    job = write_job(tmp_path, layerwise("llama"), score={"kind": "suffix_logprob"}, output=str(tmp_path / "o.jsonl"))
    assert cli.main(["submit", str(job)]) == 0
    capsys.readouterr()
    assert cli.main(["show", str(tmp_path / "o.job"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    expected = [_lm_eval_acc_norm(cs, line["logprob"], p["answer"]) for cs, line, p in zip(choices, lines, prompts)]
    assert shown["acc_norm"] == pytest.approx(sum(expected) / len(expected))
    assert [float(c == a) for c, a in zip(shown["norm_choices"], shown["answers"])] == expected


def test_an_output_another_job_rewrote_is_summarised_from_the_file(tmp_path, capsys):
    # two jobs given one `output`: the file holds the second's 3 prompts, report.json the first's 6
    results = [PromptResult(i, logprob(-1.0, -0.5)) for i in range(3)]
    path = write_output(tmp_path / "o.jsonl", "suffix_logprob", results)
    (tmp_path / "o.job").mkdir()
    (tmp_path / "o.job" / "report.json").write_text(json.dumps({
        "status": "completed", "output": str(path.resolve()),
        "summary": {"prompts": 6, "kind": "suffix_logprob", "choices": [0] * 6}}))
    assert cli.main(["show", str(path), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["prompts"] == 3 and json.loads(out.out)["choices"] == [1, 1, 1]
    assert "describes 6 prompts, the file holds 3: summarised from the file alone" in out.err
