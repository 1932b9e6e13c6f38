"""Prompts: .jsonl and the seed's .pkl read (a malicious pickle refused, never run), tokenized as
JOBSPEC says, and written back extended by generated text."""

from __future__ import annotations

import builtins
import json
import os
import pickle
from pathlib import Path

import pytest

from flexorch.orchestrator.prompts import (
    Prompt,
    load_tokenizer,
    model_max_length,
    read_prompts,
    token_ids_for,
    tokenize_prompts,
    updated_prompts_path,
    write_updated_prompts,
)
from flexorch.contract.errors import UserError
from flexorch.contract.protocol import TokenizedPrompt


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        call(*args, **kwargs)
    return str(info.value)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- .jsonl ----------------------------------------------------------------------------------------


def test_jsonl_reads_in_order_skipping_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        '\ufeff{"prefix": "Q1", "suffixes": [" A", " B"], "id": "q1"}',  # a BOM, as Windows editors write
        "",
        '  {"prefix": "Q2", "suffixes": [""], "id": 7}  ',
        '{"prefix": "", "suffixes": ["x"]}',
    ])
    assert read_prompts(path) == [Prompt("Q1", (" A", " B"), "q1"), Prompt("Q2", ("",), 7), Prompt("", ("x",), None)]


@pytest.mark.parametrize("line, expected", [
    ('{"prefix": "Q", "suffixes": [" A"]', "line 2: invalid JSON: Expecting ',' delimiter"),
    ('["Q", [" A"]]', 'line 2: expected an object {"prefix": ..., "suffixes": [...]}, got a list'),
    ('{"prefix": "Q"}', "line 2: missing key 'suffixes'"),
    ('{"prefix": "Q", "suffix": [" A"]}', "line 2: unknown key 'suffix' (did you mean 'suffixes'?)"),
    ('{"prefix": 3, "suffixes": [" A"]}', "line 2: prefix: expected a string, got 3"),
    ('{"prefix": "Q", "suffixes": " A"}', "line 2: suffixes: expected a list of strings, got ' A'"),
    ('{"prefix": "Q", "suffixes": [" A", null]}', "line 2: suffixes[1]: expected a string, got null"),
    ('{"prefix": "Q", "suffixes": []}', "line 2: suffixes: empty; each prompt needs at least one suffix"),
    ('{"prefix": "Q", "suffixes": [" A"], "id": [1]}', "line 2: id: expected a string, number, boolean or null"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "p.jsonl", ['{"prefix": "ok", "suffixes": ["ok"]}', line])
    assert error_of(read_prompts, path).startswith(f"{path}: {expected}")


def test_jsonl_many_errors_are_summarized(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ['{"prefix": "Q", "suffixes": []}'] * 8)
    lines = error_of(read_prompts, path).splitlines()
    assert len(lines) == 6 and lines[0].startswith(f"{path}: line 1: ")
    assert lines[-1] == f"{path}: ... and 3 more problems"


@pytest.mark.parametrize("name, data", [("p.jsonl", b"\n\n"), ("p.pkl", pickle.dumps([]))])
def test_no_prompts_is_an_error(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    assert error_of(read_prompts, tmp_path / name) == f"{tmp_path / name}: holds no prompts"


def test_missing_prompts_file(tmp_path):
    assert error_of(read_prompts, tmp_path / "p.jsonl").startswith(f"{tmp_path / 'p.jsonl'}: cannot read")


# -- .pkl --------------------------------------------------------------------------------------------


def test_seed_pickle_formats(tmp_path):
    seed = [("Question 1?", (" yes", " no")), ["Question 2?", [" maybe"]],
            {"prefix": "Question 3?", "suffixes": [" A"], "id": 3}]
    path = tmp_path / "p.pkl"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # old seeds wrote protocol 0..2 pickles too
        path.write_bytes(pickle.dumps(seed, protocol=protocol))
        assert read_prompts(path) == [Prompt("Question 1?", (" yes", " no")), Prompt("Question 2?", (" maybe",)),
                                      Prompt("Question 3?", (" A",), 3)]


@pytest.mark.parametrize("data, expected", [
    ({"prefix": "Q"}, "expected a list of (prefix, suffixes) pairs, got a dict"),
    ([("Q", (" A",)), ("Q", (" A",), "extra")], "prompt index 1: expected a (prefix, suffixes) pair"),
    ([("Q", (" A",)), (b"Q", (" A",))], "prompt index 1: prefix: expected a string, got a bytes"),
    ([("Q", ())], "prompt index 0: suffixes: empty"),
    ([("Q", (" A", 2))], "prompt index 0: suffixes[1]: expected a string, got 2"),
    ([{"prefix": "Q", "sufixes": [" A"]}], "prompt index 0: unknown key 'sufixes' (did you mean 'suffixes'?)"),
])
def test_pickle_errors_name_file_and_index(tmp_path, data, expected):
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(data))
    assert error_of(read_prompts, path).startswith(f"{path}: {expected}")


def test_garbled_pickle(tmp_path):
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps([("Q", (" A",))])[:-5])
    assert error_of(read_prompts, path).startswith(f"{path}: not a valid pickle")


class RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsEval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload, refused", [(RunsShell, f"{os.system.__module__}.system"), (RunsEval, "builtins.eval")])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "p.pkl"
    # Hidden behind a valid prompt, as an attacker would.
    path.write_bytes(pickle.dumps([("Q", (" A",)), ("Q", (payload(marker),))]))
    message = error_of(read_prompts, path)
    assert message.startswith(f"{path}: refused to load the global '{refused}'")
    assert "nothing in it was run" in message
    assert not marker.exists()
    # The test pickle is real: an ordinary unpickler runs it.
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_pickle_of_other_objects_is_refused(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps([("Q", np.array([1, 2]))]))
    assert "refused to load the global 'numpy." in error_of(read_prompts, path)
    path.write_bytes(pickle.dumps([("Q", {" A", " B"})], protocol=2))  # protocol 2 builds sets by a global
    assert "refused to load the global '__builtin__.set'" in error_of(read_prompts, path)  # Python 2's name


# -- writing the prompts extended by generation ------------------------------------------------------


def test_updated_pickle_round_trips_in_seed_format(tmp_path):
    prompts = [Prompt("Q1", (" A", " B")), Prompt("Q2", (" C",), id="x")]
    written = write_updated_prompts(tmp_path / "out" / "scores.jsonl", prompts, [[" one", " two"], [""]], "pkl")
    assert written == tmp_path / "out" / "scores_updated.pkl" == updated_prompts_path(tmp_path / "out/scores.jsonl", "pkl")
    assert pickle.loads(written.read_bytes()) == [("Q1", (" A one", " B two")), ("Q2", (" C",))]
    assert read_prompts(written) == [Prompt("Q1", (" A one", " B two")), Prompt("Q2", (" C",))]
    assert sorted(p.name for p in written.parent.iterdir()) == ["scores_updated.pkl"]  # no temp file left


def test_updated_jsonl_carries_the_generated_token_ids_and_reads_back(tmp_path):
    prompts = [Prompt("Q1", (" A", " B"), id=1)]
    written = write_updated_prompts(tmp_path / "scores.jsonl", prompts, [[" x", "\ufffd"]], "jsonl",
                                    generated_ids=[((87, 88), (200, 201))])
    assert json.loads(written.read_text(encoding="utf-8")) == {
        "prefix": "Q1", "suffixes": [" A x", " B\ufffd"], "id": 1, "generated_ids": [[87, 88], [200, 201]]}
    assert read_prompts(written) == [Prompt("Q1", (" A x", " B\ufffd"), 1)]


def test_updated_jsonl_keeps_ids(tmp_path):
    prompts = [Prompt("Q1", (" A",), id=1), Prompt("Qé", (" B",))]
    written = write_updated_prompts(tmp_path / "scores.pkl", prompts, [[" x"], [" ÿ"]], "jsonl")
    assert written == tmp_path / "scores_updated.jsonl"
    assert [json.loads(line) for line in written.read_text(encoding="utf-8").splitlines()] == [
        {"prefix": "Q1", "suffixes": [" A x"], "id": 1}, {"prefix": "Qé", "suffixes": [" B ÿ"]}]
    assert read_prompts(written) == [Prompt("Q1", (" A x",), 1), Prompt("Qé", (" B ÿ",))]


# -- tokenizing ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from flexorch.orchestrator.demo import build_checkpoint

    model_dir = build_checkpoint(tmp_path_factory.mktemp("prompts") / "m", "llama")
    return load_tokenizer(model_dir)


PROMPTS = [
    Prompt("Question: What is the capital of France? Answer:", (" Paris", " Mars", "")),
    Prompt("", (" A",), id="empty-prefix"),  # BOS alone conditions the suffix
    Prompt("The quick brown fox", (" jumps over the lazy dog.",), id=3),
]


def test_tokenization_matches_the_tokenizer(tokenizer):
    tokenized = tokenize_prompts(PROMPTS, tokenizer, max_length=None, source=Path("p.jsonl"))
    expected = [
        TokenizedPrompt(index, tuple(tokenizer(p.prefix)["input_ids"]),
                        tuple(tuple(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in p.suffixes))
        for index, p in enumerate(PROMPTS)
    ]
    assert tokenized == expected
    bos = tokenizer.bos_token_id
    for prompt in tokenized:  # BOS starts each prefix, and no suffix
        assert prompt.prefix_ids[0] == bos and bos not in prompt.prefix_ids[1:]
        assert all(bos not in suffix for suffix in prompt.suffix_ids)
    assert tokenized[0].suffix_ids[2] == ()  # an empty suffix scores the token right after the prefix
    assert tokenized[1].prefix_ids == (bos,)


def test_max_length(tokenizer):
    tokenized = tokenize_prompts(PROMPTS, tokenizer, None, Path("p.jsonl"))
    longest = [len(p.prefix_ids) + max(map(len, p.suffix_ids)) for p in tokenized]
    # Suffixes do not add up: each is scored after the prefix with its own positions.
    assert tokenize_prompts(PROMPTS, tokenizer, max(longest), Path("p.jsonl")) == tokenized
    message = error_of(tokenize_prompts, PROMPTS, tokenizer, longest[2] - 1, Path("p.jsonl"))
    assert message == (f"p.jsonl: prompt index 2 (id 3): {longest[2]} tokens (prefix {len(tokenized[2].prefix_ids)}"
                       f" + longest suffix {len(tokenized[2].suffix_ids[0])}), more than max_length {longest[2] - 1}")
    # Generated tokens are appended to the suffix: they count too.
    message = error_of(tokenize_prompts, PROMPTS, tokenizer, max(longest), Path("p.pkl"), generate_tokens=3)
    assert f": {max(longest) + 2} tokens" in message and "+ 2 generated)" in message


def test_empty_prefix_without_bos_is_an_error():
    from flexorch.orchestrator.demo import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.post_processor = None  # like tokenizers that add no BOS (GPT-2, Qwen)
    message = error_of(tokenize_prompts, PROMPTS, tokenizer, None, Path("p.jsonl"))
    assert message == ("p.jsonl: prompt index 1 (id 'empty-prefix'): the prefix is empty and the tokenizer adds no "
                       "BOS token: nothing to condition on")


def test_token_ids_for(tokenizer):
    single = [text for text in (" A", "A", "B", " the", "Paris") if len(tokenizer(text, add_special_tokens=False)
                                                                        ["input_ids"]) == 1]
    assert len(single) >= 2
    ids = token_ids_for(tuple(single), tokenizer)
    assert ids == tuple(tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in single)
    many = " Paris is"
    n = len(tokenizer(many, add_special_tokens=False)["input_ids"])
    assert n > 1
    message = error_of(token_ids_for, (single[0], many), tokenizer, Path("job.yaml"))
    assert message.startswith(f"job.yaml: score.tokens: {many!r} is {n} tokens (")
    assert message.endswith("expected exactly one")


def test_load_tokenizer_error_names_dir(tmp_path):
    message = error_of(load_tokenizer, tmp_path)
    assert message.startswith(f"{tmp_path}: cannot load the tokenizer (") and "\n" not in message


@pytest.mark.parametrize("config, expected", [
    ({"max_position_embeddings": 4096}, 4096),
    ({"n_positions": 1024}, 1024),
    ({"text_config": {"max_position_embeddings": 8192}}, 8192),
    ({"hidden_size": 64}, None),
    ({"max_position_embeddings": None}, None),
])
def test_model_max_length(config, expected):
    assert model_max_length(config) == expected


def test_answer_and_extra_fields_are_kept(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prefix": "Q", "suffixes": [" a", " b"], "answer": 1, "subject": "bio", "meta": {"n": [1]}}\n')
    (prompt,) = read_prompts(path)
    assert prompt.answer == 1 and prompt.fields == {"subject": "bio", "meta": {"n": [1]}}
    assert prompt.to_dict() == {"prefix": "Q", "suffixes": [" a", " b"], "answer": 1, "subject": "bio",
                                "meta": {"n": [1]}}


@pytest.mark.parametrize("line, expected", [
    ('{"prefix": "Q", "suffixes": [" a", " b"], "answer": 2}', "answer: 2 is not the index of one of its 2 suffixes"),
    ('{"prefix": "Q", "suffixes": [" a"], "answer": true}', "answer: expected the index"),
    ('{"prefix": "Q", "suffixes": [" a"], "answer": -1}', "answer: expected the index"),
    ('{"prefix": "Q", "suffixes": [" a"], "logprob": 1}', "key 'logprob': the output uses this name"),
])
def test_bad_answers_and_reserved_fields_are_named(tmp_path, line, expected):
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    assert error_of(read_prompts, path) == f"{path}: line 1: {expected}" or error_of(read_prompts, path).startswith(f"{path}: line 1: {expected}")


def test_single_suffix_answers_index_the_score_tokens():
    from flexorch.orchestrator.prompts import Prompt, check_answers

    check_answers([Prompt("Q", (":",), answer=3)], "token_probs", 4, Path("p.jsonl"))
    with pytest.raises(UserError, match=r"prompt index 0: answer: 4 is not an index of score.tokens"):
        check_answers([Prompt("Q", (":",), answer=4)], "token_probs", 4, Path("p.jsonl"))
    with pytest.raises(UserError, match=r"answer: 1 is not an index of its 1 suffix"):
        check_answers([Prompt("Q", (":",), answer=1)], "suffix_logprob", 0, Path("p.jsonl"))


# -- prompts given as token ids ----------------------------------------------------------------------


def test_token_id_prompts_are_read_and_kept_as_given(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [
        '{"prefix_ids": [1, 40, 41], "suffix_ids": [[50], [51, 52], []], "id": "q", "answer": 1, "subject": "x"}',
        '{"prefix": "The quick brown fox", "suffixes": [" jumps"]}',  # text and ids mix across prompts
    ])
    ids_prompt, text_prompt = read_prompts(path)
    assert ids_prompt == Prompt("", (), "q", 1, {"subject": "x"}, prefix_ids=(1, 40, 41),
                                suffix_ids=((50,), (51, 52), ()))
    assert ids_prompt.is_tokenized and ids_prompt.n_suffixes == 3 and not text_prompt.is_tokenized
    assert ids_prompt.to_dict() == json.loads(path.read_text().splitlines()[0])  # round-trips
    tokenized = tokenize_prompts([ids_prompt, text_prompt], tokenizer, None, path, vocab_size=len(tokenizer))
    assert tokenized[0] == TokenizedPrompt(0, (1, 40, 41), ((50,), (51, 52), ()))
    assert tokenized[1] == TokenizedPrompt(1, tuple(tokenizer(text_prompt.prefix)["input_ids"]),
                                           (tuple(tokenizer(" jumps", add_special_tokens=False)["input_ids"]),))


@pytest.mark.parametrize("line, expected", [
    ('{"prefix_ids": [], "suffix_ids": [[5]]}', "prefix_ids: empty; the model needs at least one token"),
    ('{"prefix_ids": [1, -2], "suffix_ids": [[5]]}', "prefix_ids: expected a list of token ids (integers >= 0), got a list"),
    ('{"prefix_ids": "1 2", "suffix_ids": [[5]]}', "prefix_ids: expected a list of token ids (integers >= 0), got '1 2'"),
    ('{"prefix_ids": [1], "suffix_ids": [[5], [true]]}', "suffix_ids[1]: expected a list of token ids"),
    ('{"prefix_ids": [1], "suffix_ids": []}', "suffix_ids: empty; each prompt needs at least one suffix"),
    ('{"prefix_ids": [1], "suffix_ids": [[5]], "answer": 1}', "answer: 1 is not an index of its 1 suffix"),
    ('{"prefix_ids": [1]}', "missing key 'suffix_ids'"),
    ('{"prefix_ids": [1], "suffixes": [" a"]}', "give either prefix and suffixes (text) or prefix_ids and"),
])
def test_bad_token_id_prompts_are_named(tmp_path, line, expected):
    from flexorch.orchestrator.prompts import check_answers

    path = write_jsonl(tmp_path / "p.jsonl", [line])
    with pytest.raises(UserError) as info:
        check_answers(read_prompts(path), "suffix_logprob", 0, path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value) and "\n" not in str(info.value)


def test_token_ids_outside_the_vocabulary_are_refused(tokenizer):
    prompt = Prompt("", (), prefix_ids=(1, 2), suffix_ids=((3,), (len(tokenizer),)))
    message = error_of(tokenize_prompts, [prompt], tokenizer, None, Path("p.jsonl"), vocab_size=len(tokenizer))
    assert message == (f"p.jsonl: prompt index 0: suffix_ids[1]: token id {len(tokenizer)} is not in the model's "
                       f"vocabulary (ids 0 to {len(tokenizer) - 1})")
    message = error_of(tokenize_prompts, [prompt], tokenizer, 2, Path("p.jsonl"), vocab_size=len(tokenizer) + 1)
    assert message == "p.jsonl: prompt index 0: 3 tokens (prefix 2 + longest suffix 1), more than max_length 2"


def test_updated_token_id_prompts_extend_their_ids(tmp_path):
    prompts = [Prompt("", (), id=1, prefix_ids=(1, 2), suffix_ids=((3,), ())), Prompt("Q", (" A",))]
    for fmt in ("jsonl", "pkl"):
        written = write_updated_prompts(tmp_path / "scores.pkl", prompts, [["ab", "c"], [" x"]], fmt,
                                        generated_ids=[((7, 8), (9,)), ((10,),)])
        assert read_prompts(written) == [
            Prompt("", (), id=1, prefix_ids=(1, 2), suffix_ids=((3, 7, 8), (9,))), Prompt("Q", (" A x",))]
