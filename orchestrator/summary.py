"""What a run's scores say, in a few numbers: each prompt's argmax and, where prompts carry an
`answer`, accuracy as lm-evaluation-harness (0.4) reports it for a multiple_choice task.

- suffix_logprob: the choice is the suffix with the highest log-prob (`acc`), and the one with the
  highest log-prob per character of the choice (`acc_norm`): lm-eval's continuation is
  target_delimiter + choice and it divides by len(choice), the characters (code points, not bytes)
  without the delimiter, " " by default; so a suffix is counted without one leading space.
- token_probs: the choice is the most probable of score.tokens after a prompt's first suffix (a
  multiple-choice prompt with one suffix and tokens " A", " B", ...: the answer indexes the tokens).
- next_token_probs: the argmax token id after each suffix; no accuracy.

Standard errors are lm-eval's: the sample standard deviation over the answered prompts / sqrt(n).
`by_field` gives the same per value of a prompt's extra field (`flexorch show --by subject`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from flexorch.contract.errors import UserError
from flexorch.contract.protocol import ScoreKind
from flexorch.orchestrator.prompts import Prompt

# lm-eval's default target_delimiter: the part of a suffix that is not the choice's.
TARGET_DELIMITER = " "
# An extra field is kept in the summary (for --by) when every value is a scalar this short: a group
# label such as a subject, not a passage that would make report.json as big as the prompts.
MAX_LABEL_CHARS = 100


@dataclass(frozen=True)
class Summary:
    prompts: int
    kind: str
    choices: tuple  # per prompt: a suffix index (suffix_logprob), a token index (token_probs), argmax ids
    answers: tuple = ()  # per prompt: its answer or None (empty when no prompt has one)
    answered: int = 0  # prompts with an answer
    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None  # suffix_logprob of text prompts only
    acc_norm_stderr: float | None = None
    norm_choices: tuple = ()  # per prompt: the acc_norm choice (empty when acc_norm is None)
    ids: tuple = ()  # per prompt: its id, or None (empty when no prompt has one)
    labels: tuple = ()  # token_probs: score.tokens, what a choice indexes
    fields: dict = field(default_factory=dict)  # extra field -> per prompt value (short scalars only)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where: str) -> "Summary":
        """A summary read back from report.json, checked: a hand-edited or foreign report is one
        line naming it, not a traceback later."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: not a flexorch summary (no summary object)")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            summary = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except TypeError as exc:
            raise UserError(f"{where}: not a flexorch summary ({exc})") from None
        problem = summary._problem()
        if problem:
            raise UserError(f"{where}: not a flexorch summary ({problem})")
        return summary

    def _problem(self) -> str | None:
        if not _is_int(self.prompts) or self.kind not in {k.value for k in ScoreKind}:
            return "prompts or kind"
        if not isinstance(self.choices, tuple) or len(self.choices) != self.prompts:
            return "choices do not match prompts"
        for name in ("answers", "norm_choices", "ids"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) not in (0, self.prompts):
                return f"{name} do not match prompts"
        for name in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
                return f"{name} is not a number"
        if not isinstance(self.fields, dict) or any(
                not isinstance(v, list | tuple) or len(v) != self.prompts for v in self.fields.values()):
            return "fields do not match prompts"
        return None


@dataclass(frozen=True)
class Group:
    """Accuracy over the answered prompts whose field has one value."""

    value: object
    answered: int
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None


def summarize(kind: str, entries: Sequence, prompts: Sequence[Prompt] | None = None,
              token_labels: Sequence[str] = ()) -> Summary:
    """entries: one output entry per prompt (an array, or suffix_logprob's dict of arrays)."""
    kind = ScoreKind(kind)
    choices = tuple(_choice(kind, entry) for entry in entries)
    ids = tuple(p.id for p in prompts) if prompts is not None and any(p.id is not None for p in prompts) else ()
    labels = tuple(token_labels) if kind is ScoreKind.TOKEN_PROBS else ()
    extra = _label_fields(prompts) if prompts is not None else {}
    answers = [p.answer for p in prompts] if prompts is not None else [None] * len(entries)
    if kind in (ScoreKind.NEXT_TOKEN_PROBS, ScoreKind.GENERATE) or not any(a is not None for a in answers):
        return Summary(len(entries), kind.value, choices, ids=ids, labels=labels, fields=extra)
    answered = [i for i, a in enumerate(answers) if a is not None]
    acc, acc_stderr = _mean_and_stderr([choices[i] == answers[i] for i in answered])
    norm_choices, norm, norm_stderr = (), None, None
    # acc_norm needs the suffixes' text: not there when summarising an output file alone, nor for
    # prompts given as token ids
    if (kind is ScoreKind.SUFFIX_LOGPROB and prompts is not None
            and all(p.suffixes and not p.is_tokenized for p in prompts)):
        norm_choices = tuple(_norm_choice(entry, prompt) for entry, prompt in zip(entries, prompts))
        norm, norm_stderr = _mean_and_stderr([norm_choices[i] == answers[i] for i in answered])
    return Summary(len(entries), kind.value, choices, tuple(answers), len(answered), acc, acc_stderr, norm,
                   norm_stderr, norm_choices, ids, labels, extra)


def norm_length(suffix: str) -> int:
    """What lm-eval's acc_norm divides a suffix's log-prob by: the characters of its choice, the
    suffix less one leading TARGET_DELIMITER (at least 1: lm-eval would divide an empty choice by 0)."""
    choice = suffix[len(TARGET_DELIMITER):] if suffix.startswith(TARGET_DELIMITER) else suffix
    return max(1, len(choice))


def by_field(summary: Summary, name: str) -> tuple[Group, ...]:
    """acc (and acc_norm) per value of the extra field `name`, over the answered prompts, ordered by value."""
    if name not in summary.fields:
        known = ", ".join(sorted(summary.fields)) or "none"
        raise UserError(f"--by {name}: not a field of these prompts with short values (fields: {known})")
    if not summary.answered:
        raise UserError(f"--by {name}: no prompt has an answer, so there is no accuracy to group")
    groups: dict[str, list[int]] = {}
    for i, value in enumerate(summary.fields[name]):
        if summary.answers[i] is not None:
            groups.setdefault(_label(value), []).append(i)
    out = []
    for value, members in sorted(groups.items()):
        acc, acc_stderr = _mean_and_stderr([summary.choices[i] == summary.answers[i] for i in members])
        norm = norm_stderr = None
        if summary.norm_choices:
            norm, norm_stderr = _mean_and_stderr([summary.norm_choices[i] == summary.answers[i] for i in members])
        out.append(Group(value, len(members), acc, acc_stderr, norm, norm_stderr))
    return tuple(out)


def _label(value) -> str:
    return "-" if value is None else str(value)


def _label_fields(prompts: Sequence[Prompt]) -> dict:
    names = sorted({name for p in prompts for name in p.fields})
    kept = {}
    for name in names:
        values = [p.fields.get(name) for p in prompts]
        if all(_is_label(v) for v in values):
            kept[name] = tuple(values)
    return kept


def _is_label(value) -> bool:
    return value is None or isinstance(value, (int, float, bool)) or (
        isinstance(value, str) and len(value) <= MAX_LABEL_CHARS)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choice(kind: ScoreKind, entry):
    if kind is ScoreKind.GENERATE:  # the text of each suffix's continuation
        return [str(t) for t in entry["text"]]
    if kind is ScoreKind.SUFFIX_LOGPROB:
        return int(np.argmax(np.asarray(entry["logprob"])))
    probs = np.asarray(entry)  # (n_suffixes, steps, k)
    if kind is ScoreKind.TOKEN_PROBS:
        return int(np.argmax(probs[0, 0]))
    return [int(i) for i in np.argmax(probs[:, 0], axis=-1)]


def _norm_choice(entry, prompt: Prompt) -> int:
    lengths = np.array([norm_length(s) for s in prompt.suffixes], dtype=np.float64)
    return int(np.argmax(np.asarray(entry["logprob"], dtype=np.float64) / lengths))


def _mean_and_stderr(hits: list[bool]) -> tuple[float | None, float | None]:
    n = len(hits)
    if n == 0:
        return None, None
    mean = sum(hits) / n
    if n < 2:
        return mean, None
    variance = sum((h - mean) ** 2 for h in hits) / (n - 1)
    return mean, math.sqrt(variance / n)
