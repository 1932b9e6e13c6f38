"""Parts (a worker's committed rounds) and the merge into the output file."""

from __future__ import annotations

import errno
import json
import pickle

import numpy as np
import pytest

from flexorch.orchestrator.merge import collect_results, write_output
from flexorch.orchestrator.prompts import Prompt
from flexorch.contract.protocol import PromptResult
from flexorch.contract.messages import Round
from flexorch.contract.parts import DiskFullError, PartError, part_name, read_part, read_part_indices, write_part


def _probs(index: int, n_suffixes: int = 2, steps: int = 2, vocab: int = 5) -> PromptResult:
    rng = np.random.default_rng(index)
    scores = rng.random((n_suffixes, steps, vocab), dtype=np.float32)
    generated = tuple(tuple(int(t) for t in rng.integers(0, vocab, steps)) for _ in range(n_suffixes))
    return PromptResult(index, scores, generated)


def _logprob(index: int, n_suffixes: int = 3) -> PromptResult:
    rng = np.random.default_rng(index)
    scores = {"logprob": -rng.random(n_suffixes), "is_greedy": rng.random(n_suffixes) > 0.5,
              "n_tokens": rng.integers(1, 5, n_suffixes)}
    return PromptResult(index, scores, ())


def _assert_same(a: PromptResult, b: PromptResult) -> None:
    assert a.index == b.index and a.generated == b.generated
    if isinstance(a.scores, dict):
        assert a.scores.keys() == b.scores.keys()
        for key in a.scores:
            assert a.scores[key].dtype == b.scores[key].dtype
            np.testing.assert_array_equal(a.scores[key], b.scores[key])
    else:
        assert a.scores.dtype == b.scores.dtype == np.float32
        np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("kind, make", [("next_token_probs", _probs), ("suffix_logprob", _logprob)])
def test_part_round_trip_keeps_arrays_dtypes_and_generated_ids(tmp_path, kind, make):
    results = [make(7), make(3), make(12)]
    path = write_part(tmp_path / "p.npz", kind, results)
    assert read_part_indices(path) == (7, 3, 12)
    for a, b in zip(results, read_part(path)):
        _assert_same(a, b)
    assert not list(tmp_path.glob(".*.tmp"))


def test_part_with_an_object_array_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, indices=np.array([0]), kind=np.array("next_token_probs"), s0=np.array([object()], dtype=object),
             g0=np.zeros((0, 0), np.int64))
    with pytest.raises(PartError, match="evil.npz: damaged part .*allow_pickle"):
        read_part(path)


def test_part_names_differ_by_prompt_set():
    a = part_name("w0", Round(0, ()))
    assert a.startswith("part-w0-r0000-") and a.endswith(".npz")
    from flexorch.contract.protocol import TokenizedPrompt

    one = Round(0, (TokenizedPrompt(1, (1,), ((2,),)),))
    two = Round(0, (TokenizedPrompt(2, (1,), ((2,),)),))
    assert part_name("w0", one) != part_name("w0", two)


def test_disk_full_names_the_path_and_keeps_committed_parts(tmp_path, monkeypatch):
    committed = write_part(tmp_path / "a.npz", "next_token_probs", [_probs(0)])
    before = committed.read_bytes()

    def savez_on_a_full_disk(file, **arrays):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", savez_on_a_full_disk)
    with pytest.raises(DiskFullError, match=r"disk full while writing results to .*b\.npz") as info:
        write_part(tmp_path / "b.npz", "next_token_probs", [_probs(1)])
    assert info.value.errno == errno.ENOSPC
    assert committed.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]  # no temp file, no torn part


def test_collect_results_orders_by_prompt_and_refuses_a_gap(tmp_path):
    write_part(tmp_path / "x.npz", "next_token_probs", [_probs(2), _probs(0)])
    write_part(tmp_path / "y.npz", "next_token_probs", [_probs(1), _probs(3)])
    parts = sorted(tmp_path.glob("*.npz"))
    results = collect_results(parts, 4)
    assert [r.index for r in results] == [0, 1, 2, 3]
    for r in results:
        _assert_same(r, _probs(r.index))
    with pytest.raises(RuntimeError, match=r"no committed result for prompt\(s\) \[4\]"):
        collect_results(parts, 5)


def test_pkl_output_is_the_seeds_list(tmp_path):
    results = [_probs(0), _probs(1)]
    path = write_output(tmp_path / "out.pkl", "next_token_probs", results)
    data = path.read_bytes()
    assert data[:2] == b"\x80\x04"  # pickle protocol 4
    loaded = pickle.loads(data)
    assert isinstance(loaded, list) and len(loaded) == 2
    for got, want in zip(loaded, results):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.scores)


def test_pkl_output_of_suffix_logprob_holds_dicts(tmp_path):
    results = [_logprob(0), _logprob(1)]
    loaded = pickle.loads(write_output(tmp_path / "out.pkl", "suffix_logprob", results).read_bytes())
    assert set(loaded[1]) == {"logprob", "is_greedy", "n_tokens"}
    assert loaded[1]["logprob"].dtype == np.float64 and loaded[1]["is_greedy"].dtype == bool
    np.testing.assert_array_equal(loaded[1]["n_tokens"], results[1].scores["n_tokens"])


def test_jsonl_output_has_index_id_and_lists(tmp_path):
    results = [_probs(0), _probs(1)]
    prompts = [Prompt("Q", (" a", " b"), id="q-a", answer=1, fields={"subject": "bio", "meta": [1, 2]}),
               Prompt("R", (" a", " b"))]
    path = write_output(tmp_path / "out.jsonl", "next_token_probs", results, prompts=prompts)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["index"] == 0 and lines[0]["id"] == "q-a" and lines[0]["answer"] == 1
    assert lines[0]["subject"] == "bio" and lines[0]["meta"] == [1, 2]  # extra fields pass through
    assert "id" not in lines[1] and "answer" not in lines[1] and "tokens" not in lines[1]
    got = np.array(lines[1]["next_token_probs"], dtype=np.float32)
    np.testing.assert_array_equal(got, results[1].scores)  # float32 survives the JSON round trip exactly

    path = write_output(tmp_path / "lp.jsonl", "suffix_logprob", [_logprob(4)])
    record = json.loads(path.read_text())
    assert set(record) == {"index", "logprob", "is_greedy", "n_tokens"}
    assert record["logprob"] == _logprob(4).scores["logprob"].tolist()


def test_jsonl_output_of_token_probs_names_its_tokens(tmp_path):
    result = PromptResult(0, np.full((1, 1, 2), 0.5, dtype=np.float32))
    path = write_output(tmp_path / "tp.jsonl", "token_probs", [result], token_labels=(" A", " B"))
    record = json.loads(path.read_text())
    assert record["tokens"] == [" A", " B"] and record["token_probs"] == [[[0.5, 0.5]]]


def test_output_write_that_fails_leaves_no_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle")

    with pytest.raises(TypeError):
        write_output(tmp_path / "out.pkl", "next_token_probs", [PromptResult(0, Unpicklable())])
    assert list(tmp_path.iterdir()) == []
