"""Accuracy as lm-evaluation-harness reports it (acc_norm checked against lm-eval's own code), and per
value of a prompt field."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flexorch.orchestrator.prompts import Prompt
from flexorch.contract.errors import UserError
from flexorch.orchestrator.summary import Summary, by_field, norm_length, summarize


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


def _lm_eval_acc_norm(choices: list[str], lls: list[float], gold: int) -> float:
    """lm-eval's own multiple_choice scoring (ConfigurableTask.process_results) of one document."""
    from types import SimpleNamespace

    task_module = pytest.importorskip("lm_eval.api.task", reason="lm-eval is not installed")
    task = SimpleNamespace(config=SimpleNamespace(process_results=None), OUTPUT_TYPE="multiple_choice",
                           _metric_fn_list={"acc": None, "acc_norm": None}, multiple_input=False,
                           multiple_target=False, doc_to_choice=lambda doc: doc["choices"],
                           doc_to_target=lambda doc: doc["gold"])
    doc = {"choices": choices, "gold": gold}
    return task_module.ConfigurableTask.process_results(task, doc, [(ll, False) for ll in lls])["acc_norm"]


# Each case: lm-eval's choices (its continuation is " " + choice), their log-probs, and the gold index;
# per UTF-8 byte, or counting the leading space, each would pick the other answer.
ACC_NORM_CASES = [
    (["éé", "abc"], [-2.1, -3.0], 1),  # per char -1.05 < -1.0: "abc"; per byte of " éé" (5) and " abc" (4): "éé"
    (["ab", "abcd"], [-2.2, -4.0], 1),  # per char -1.1 < -1.0: "abcd"; counting the space (3 and 5): "ab"
    (["café", "cafe"], [-5.2, -4.2], 0),  # wrong whichever way it is divided
    (["日本", "abcd"], [-1.9, -4.2], 0),  # per char -0.95 > -1.05: "日本" (6 bytes), right either way
]


def test_acc_norm_is_lm_evals_on_multibyte_and_leading_space_choices():
    prompts = [Prompt("q", tuple(" " + c for c in choices), answer=gold) for choices, _, gold in ACC_NORM_CASES]
    entries = [logprob(*lls) for _, lls, _ in ACC_NORM_CASES]
    s = summarize("suffix_logprob", entries, prompts)
    expected = [_lm_eval_acc_norm(choices, lls, gold) for choices, lls, gold in ACC_NORM_CASES]
    assert [float(c == p.answer) for c, p in zip(s.norm_choices, prompts)] == expected
    assert s.acc_norm == pytest.approx(sum(expected) / len(expected))
    # the old definitions disagree with lm-eval on these cases: per UTF-8 byte, or with the space counted
    per_byte = [int(np.argmax(np.array(lls) / [len((" " + c).encode()) for c in choices]))
                for choices, lls, _ in ACC_NORM_CASES]
    assert [float(c == gold) for c, (_, _, gold) in zip(per_byte, ACC_NORM_CASES)] != expected
    assert [norm_length(" " + c) for c in ACC_NORM_CASES[3][0]] == [2, 4]
    assert norm_length("ab") == 2 and norm_length(" ") == 1  # no delimiter; an empty choice divides by 1


def test_token_probs_choice_indexes_the_tokens_and_next_token_has_no_accuracy():
    entries = [np.array([[[0.1, 0.7, 0.2]]], np.float32), np.array([[[0.5, 0.3, 0.2]]], np.float32)]
    s = summarize("token_probs", entries, [Prompt("q", (":",), answer=1), Prompt("q", (":",), answer=1)])
    assert s.choices == (1, 0) and s.acc == 0.5 and s.acc_norm is None
    s = summarize("next_token_probs", entries, [Prompt("q", (":",), answer=1)] * 2)
    assert s.choices == ([1], [0]) and s.acc is None


def test_by_field_gives_accuracy_and_stderr_per_value_of_a_short_field():
    subjects = ["bio", "math", "bio", "math", "bio", None]
    prompts = [Prompt("q", (" x", " y"), answer=a, fields={"subject": s, "passage": "long " * 30})
               for a, s in zip([0, 0, 1, 1, 0, 0], subjects)]
    entries = [logprob(-1.0, -2.0)] * 6  # always chooses 0
    s = summarize("suffix_logprob", entries, prompts)
    assert set(s.fields) == {"subject"}  # the 150-character passage is no group label
    groups = {g.value: g for g in by_field(s, "subject")}
    assert set(groups) == {"bio", "math", "-"}
    assert (groups["bio"].answered, groups["bio"].acc) == (3, pytest.approx(2 / 3))
    assert groups["bio"].acc_stderr == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))
    assert (groups["math"].acc, groups["math"].acc_norm) == (0.5, 0.5) and groups["-"].acc_stderr is None
    with pytest.raises(UserError, match="--by passage: not a field .* \\(fields: subject\\)"):
        by_field(s, "passage")
    # read back from report.json's JSON: the same groups
    again = Summary.from_dict(json.loads(json.dumps(s.to_dict())), "report.json")
    assert by_field(again, "subject") == by_field(s, "subject")
