"""What a run's scores say, in a few numbers: each prompt's argmax and, where prompts carry an
`answer`, accuracy as lm-evaluation-harness reports it.

- suffix_logprob: the choice is the suffix with the highest log-prob (`acc`), and the one with the
  highest log-prob per UTF-8 byte of the suffix (`acc_norm`; lm-eval's acc_norm divides by
  characters, the same for ASCII answers).
- token_probs: the choice is the most probable of score.tokens after a prompt's first suffix (a
  multiple-choice prompt with one suffix and tokens " A", " B", ...: the answer indexes the tokens).
- next_token_probs: the argmax token id after each suffix; no accuracy.

Standard errors are lm-eval's: the sample standard deviation over the answered prompts / sqrt(n).
Works on the output entries (as written to .pkl) so `flexorch show` can summarise a file alone.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flexorch.contract.errors import UserError
from flexorch.contract.guard import scan_pickle
from flexorch.contract.manifest import read_json_object
from flexorch.contract.protocol import ScoreKind
from flexorch.orchestrator.prompts import Prompt


@dataclass(frozen=True)
class Summary:
    prompts: int
    kind: str
    choices: tuple  # per prompt: a suffix index (suffix_logprob), a token index (token_probs), argmax ids
    answers: tuple = ()  # per prompt: its answer or None (empty when no prompt has one)
    answered: int = 0  # prompts with an answer
    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None  # suffix_logprob only
    acc_norm_stderr: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(kind: str, entries: Sequence, prompts: Sequence[Prompt] | None = None) -> Summary:
    """entries: one output entry per prompt (an array, or suffix_logprob's dict of arrays)."""
    kind = ScoreKind(kind)
    choices = tuple(_choice(kind, entry) for entry in entries)
    answers = [p.answer for p in prompts] if prompts is not None else [None] * len(entries)
    if kind is ScoreKind.NEXT_TOKEN_PROBS or not any(a is not None for a in answers):
        return Summary(len(entries), kind.value, choices)
    answered = [i for i, a in enumerate(answers) if a is not None]
    acc, acc_stderr = _mean_and_stderr([choices[i] == answers[i] for i in answered])
    norm = norm_stderr = None
    # acc_norm needs the suffixes' text: not there when summarising an output file alone, nor for
    # prompts given as token ids
    if (kind is ScoreKind.SUFFIX_LOGPROB and prompts is not None
            and all(prompts[i].suffixes and not prompts[i].is_tokenized for i in answered)):
        norm_choices = [_norm_choice(entries[i], prompts[i]) for i in answered]
        norm, norm_stderr = _mean_and_stderr([c == answers[i] for c, i in zip(norm_choices, answered)])
    return Summary(len(entries), kind.value, choices, tuple(answers), len(answered), acc, acc_stderr, norm,
                   norm_stderr)


def _choice(kind: ScoreKind, entry):
    if kind is ScoreKind.SUFFIX_LOGPROB:
        return int(np.argmax(np.asarray(entry["logprob"])))
    probs = np.asarray(entry)  # (n_suffixes, steps, k)
    if kind is ScoreKind.TOKEN_PROBS:
        return int(np.argmax(probs[0, 0]))
    return [int(i) for i in np.argmax(probs[:, 0], axis=-1)]


def _norm_choice(entry: Mapping, prompt: Prompt) -> int:
    lengths = np.array([max(1, len(s.encode("utf-8"))) for s in prompt.suffixes], dtype=np.float64)
    return int(np.argmax(np.asarray(entry["logprob"]) / lengths))


def _mean_and_stderr(hits: list[bool]) -> tuple[float | None, float | None]:
    n = len(hits)
    if n == 0:
        return None, None
    mean = sum(hits) / n
    if n < 2:
        return mean, None
    variance = sum((h - mean) ** 2 for h in hits) / (n - 1)
    return mean, math.sqrt(variance / n)


# -- flexorch show -----------------------------------------------------------------------------------
REPORT_NAME = "report.json"


def load_summary(path: Path) -> tuple[dict, Path]:
    """The summary of a job dir, or of an output file (from its job's report.json when that is the
    default job dir next to it, else computed from the file alone); and what it was read from."""
    path = Path(path)
    if path.is_dir():
        return _report_summary(path / REPORT_NAME), path / REPORT_NAME
    if not path.is_file():
        raise UserError(f"{path}: no such output file or job dir")
    report = path.with_suffix(".job") / REPORT_NAME
    if report.is_file() and Path(read_json_object(report).get("output", "")) == path.resolve():
        return _report_summary(report), report
    return _file_summary(path).to_dict(), path


def _report_summary(report: Path) -> dict:
    if not report.is_file():
        raise UserError(f"{report.parent}: not a job dir (no {REPORT_NAME})")
    data = read_json_object(report)
    if data.get("status") != "completed" or not isinstance(data.get("summary"), dict):
        raise UserError(f"{report}: the job has not completed (status {data.get('status')!r}): nothing to show")
    return data["summary"]


def _file_summary(path: Path) -> Summary:
    if path.suffix == ".jsonl":
        try:
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise UserError(f"{path}: not a flexorch .jsonl output ({type(exc).__name__})") from None
        if not records or not all(isinstance(r, dict) for r in records):
            raise UserError(f"{path}: holds no results")
        kind = next((k for k in ScoreKind if k.value in records[0]), ScoreKind.SUFFIX_LOGPROB)
        entries = [{key: r[key] for key in ("logprob",)} if kind is ScoreKind.SUFFIX_LOGPROB else r[kind.value]
                   for r in records]
        prompts = [Prompt("", (), answer=r.get("answer")) for r in records]
        return summarize(kind, entries, prompts)
    if path.suffix == ".pkl":
        entries = _ArraysOnlyUnpickler(path).load()
        kind = ScoreKind.SUFFIX_LOGPROB if entries and isinstance(entries[0], dict) else ScoreKind.NEXT_TOKEN_PROBS
        return summarize(kind, entries)
    raise UserError(f"{path}: expected a .pkl or .jsonl output file")


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """An output .pkl holds lists, dicts and numpy arrays: numpy's array reconstruction is the only
    global admitted, so a foreign pickle runs no code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def __init__(self, path: Path):
        self.path, self._file = path, io.BytesIO(path.read_bytes())
        super().__init__(self._file)

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise UserError(f"{self.path}: not a flexorch output (refused the global '{module}.{name}')")

    def load(self):
        scan_pickle(self._file.getvalue(), str(self.path), refuse_code=None)  # memo bombs; globals: find_class
        try:
            return super().load()
        except UserError:  # a refused global (UserError is a ValueError: caught here first)
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            raise UserError(f"{self.path}: not a valid output pickle ({type(exc).__name__}: {exc})") from None


def render_summary(summary: dict, source: Path, console, shown: int | None = 20) -> None:
    from rich.table import Table

    choices = summary.get("choices") or []
    table = Table(title=f"{summary['prompts']} prompts, {summary['kind']} ({source})", caption=(
        f"first {shown} of {len(choices)}: flexorch show --all lists every prompt" if shown and len(choices) > shown
        else None))
    answers = summary.get("answers") or []
    table.add_column("prompt", justify="right")
    table.add_column("argmax")
    if answers:
        table.add_column("answer")
    for index, choice in enumerate(choices[:shown] if shown else choices):
        answer = answers[index] if answers else None
        mark = "" if answer is None else (" ✓" if answer == choice else " ✗")
        table.add_row(str(index), str(choice), *([f"{answer if answer is not None else '-'}{mark}"] if answers else []))
    console.print(table)
    for name in ("acc", "acc_norm"):
        if summary.get(name) is not None:
            stderr = summary.get(f"{name}_stderr")
            console.print(f"{name}: {summary[name]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
                          + f" ({summary['answered']} prompts with an answer)")
