"""`flexorch show`: a run's summary read back, from a job dir's report.json or from an output file
alone, and printed to fit 80 columns: per prompt its id, its choice (decoded tokens for
next_token_probs, with the tokenizer of the model dir the job recorded) and its answer; accuracy,
and per value of an extra field with `--by FIELD`.

Any file may be named here, so every reader checks what it got before using it: a file that is not
a flexorch output is one line naming the file and what is wrong (exit 2), and no declared size is
allocated before it is checked against the bytes that back it.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flexorch.contract.errors import UserError
from flexorch.contract.guard import Limits, check_plain, parse_guarded, scan_pickle
from flexorch.contract.manifest import read_json_object
from flexorch.contract.protocol import ScoreKind
from flexorch.orchestrator.prompts import Prompt
from flexorch.orchestrator.summary import Group, Summary, by_field, summarize

REPORT_NAME = "report.json"
# The .jsonl output's own fields; the others are the prompts' extra fields, passed through.
_OUTPUT_FIELDS = frozenset({"index", "id", "answer", "logprob", "is_greedy", "n_tokens", "next_token_probs",
                            "token_probs", "tokens", "generated_ids", "text", "stop_reason", "logprobs"})
# One output line holds a prompt's scores: a few top-k probabilities per suffix and step, or a
# full vocabulary's (262k floats as text: ~6 MB) for a handful of steps.
_LINE_LIMITS = Limits(max_bytes=256 << 20)
_NUMERIC = "biuf"  # numpy dtype kinds a score may have


@dataclass(frozen=True)
class Shown:
    summary: Summary
    source: Path  # what it was read from
    model_dir: Path | None = None  # the job's model dir, whose tokenizer decodes argmax ids
    note: str = ""  # said before the table: why the summary comes from where it does


def load(path: Path) -> Shown:
    """The summary of a job dir, or of an output file (from its job's report.json when that is the
    default job dir next to it, else computed from the file alone)."""
    path = Path(path)
    if path.is_dir():
        return _from_report(path / REPORT_NAME)
    if not path.is_file():
        raise UserError(f"{path}: no such output file or job dir")
    report = path.with_suffix(".job") / REPORT_NAME
    alone = _file_summary(path)
    if report.is_file():
        try:
            if Path(str(read_json_object(report).get("output", ""))) == path.resolve():
                shown = _from_report(report)
                if shown.summary.prompts == alone.prompts:
                    return shown
                # another job wrote this output since (two jobs given one `output`): the file is the truth
                return Shown(alone, path, note=f"{report} describes {shown.summary.prompts} prompts, the file "
                                               f"holds {alone.prompts}: summarised from the file alone")
        except UserError:  # a damaged or unfinished report next to a good output: the output alone
            pass
    return Shown(alone, path)


def _from_report(report: Path) -> Shown:
    if not report.is_file():
        raise UserError(f"{report.parent}: not a job dir (no {REPORT_NAME})")
    data = read_json_object(report)
    if data.get("status") != "completed":
        raise UserError(f"{report}: the job has not completed (status {data.get('status')!r}): nothing to show")
    model = data.get("model")
    return Shown(Summary.from_dict(data.get("summary"), str(report)), report,
                 Path(model) if isinstance(model, str) and model else None)


def _file_summary(path: Path) -> Summary:
    if path.suffix == ".jsonl":
        return _jsonl_summary(path)
    if path.suffix == ".pkl":
        entries = _ArraysOnlyUnpickler(path).load()
        kind = _pickle_kind(path, entries)
        return summarize(kind, entries)
    raise UserError(f"{path}: expected a .pkl or .jsonl output file")


# -- .jsonl ------------------------------------------------------------------------------------------
def _jsonl_summary(path: Path) -> Summary:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a flexorch .jsonl output (not UTF-8 text)") from None
    records = [parse_guarded(line, json.loads, f"{path} line {n}", _LINE_LIMITS)
               for n, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise UserError(f"{path}: holds no results")
    if not isinstance(records[0], dict):
        raise UserError(f"{path} line 1: not a JSON object")
    kind = next((k for k in (ScoreKind.NEXT_TOKEN_PROBS, ScoreKind.TOKEN_PROBS) if k.value in records[0]),
                ScoreKind.GENERATE if "stop_reason" in records[0] else ScoreKind.SUFFIX_LOGPROB)
    key = {ScoreKind.SUFFIX_LOGPROB: "logprob", ScoreKind.GENERATE: "text"}.get(kind, kind.value)
    entries, prompts = [], []
    for n, record in enumerate(records, 1):
        where = f"{path} line {n}"
        if not isinstance(record, dict) or key not in record:
            raise UserError(f"{where}: no '{key}' field (not a flexorch {kind.value} output)")
        if kind is ScoreKind.GENERATE:
            entries.append({"text": _texts(record[key], where)})
        else:
            scores = _array(record[key], 1 if kind is ScoreKind.SUFFIX_LOGPROB else 3, where, key)
            entries.append({"logprob": scores} if kind is ScoreKind.SUFFIX_LOGPROB else scores)
        prompts.append(Prompt("", (), id=record.get("id"), answer=_answer(record.get("answer"), where),
                              fields={k: v for k, v in record.items() if k not in _OUTPUT_FIELDS}))
    labels = records[0].get("tokens") if kind is ScoreKind.TOKEN_PROBS else None
    labels = tuple(labels) if isinstance(labels, list) and all(isinstance(t, str) for t in labels) else ()
    return summarize(kind, entries, prompts, labels)


def _texts(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise UserError(f"{where}: 'text' is not a list of strings (not a flexorch generate output)")
    return value


def _array(value, ndim: int, where: str, key: str) -> np.ndarray:
    """`value` as a non-empty numeric array of `ndim` dimensions, or UserError."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise UserError(f"{where}: '{key}' is not an array of numbers") from None
    if array.ndim != ndim or array.size == 0:
        raise UserError(f"{where}: '{key}' has shape {array.shape}, expected {ndim} non-empty dimension(s)")
    return array


def _answer(value, where: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise UserError(f"{where}: 'answer' is {value!r}, not an index")


# -- .pkl --------------------------------------------------------------------------------------------
def _pickle_kind(path: Path, entries) -> ScoreKind:
    """An output pickle is a non-empty list of suffix_logprob dicts or of (suffixes, steps, k) arrays
    (next_token_probs and token_probs look alike: summarised as next_token_probs)."""
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: not a flexorch output (a {type(entries).__name__}, not a non-empty list)")
    if all(isinstance(e, dict) and "text" in e for e in entries):
        for i, entry in enumerate(entries):
            if not (isinstance(entry["text"], list) and all(isinstance(t, str) for t in entry["text"])):
                raise UserError(f"{path}: entry {i} has no 'text' list of strings (not a flexorch output)")
        return ScoreKind.GENERATE
    if all(isinstance(e, dict) for e in entries):
        for i, entry in enumerate(entries):
            logprob = entry.get("logprob")
            if not (isinstance(logprob, np.ndarray) and logprob.ndim == 1 and logprob.size
                    and logprob.dtype.kind in _NUMERIC):
                raise UserError(f"{path}: entry {i} has no 'logprob' array of numbers (not a flexorch output)")
        return ScoreKind.SUFFIX_LOGPROB
    for i, entry in enumerate(entries):
        if not (isinstance(entry, np.ndarray) and entry.ndim == 3 and entry.size and entry.dtype.kind in _NUMERIC):
            what = f"an array of shape {entry.shape}" if isinstance(entry, np.ndarray) else f"a {type(entry).__name__}"
            raise UserError(f"{path}: entry {i} is {what}, not a (suffixes, steps, k) array of numbers "
                            "(not a flexorch output)")
    return ScoreKind.NEXT_TOKEN_PROBS


class _DtypeStub:
    """numpy.dtype as a pickle rebuilds it, admitted only for a plain numeric dtype: an object dtype
    would allocate its declared shape before any data backs it."""

    def __init__(self, where: str, name, *_flags):
        try:
            dtype = np.dtype(name) if isinstance(name, str) else None
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in _NUMERIC or dtype.fields is not None:
            raise UserError(f"{where}: not a flexorch output (an array of dtype {name!r})")
        self.where, self.dtype = where, dtype

    def __setstate__(self, state) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        if order not in ("<", ">", "=", "|"):
            raise UserError(f"{self.where}: not a valid output pickle (byte order {order!r})")
        self.dtype = self.dtype.newbyteorder(order) if order in "<>" else self.dtype


class _ArrayStub:
    """An ndarray as a pickle rebuilds it (_reconstruct, then its state), built only once its shape
    is checked against the bytes given: a 32 TiB declared shape is refused, not allocated."""

    def __init__(self, where: str):
        self.where, self.array = where, None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise UserError(f"{self.where}: not a valid output pickle (an array's state)")
        _version, shape, dtype, fortran, data = state
        self.array = _checked_array(self.where, data, dtype, shape, "F" if fortran else "C")


def _checked_array(where: str, data, dtype, shape, order) -> np.ndarray:
    if not isinstance(dtype, _DtypeStub):
        raise UserError(f"{where}: not a valid output pickle (an array without a numeric dtype)")
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and 0 <= n < 2**63 for n in shape)):
        raise UserError(f"{where}: not a valid output pickle (an array's shape {str(shape)[:80]})")
    if not isinstance(data, (bytes, bytearray, pickle.PickleBuffer)):
        raise UserError(f"{where}: not a valid output pickle (an array's data is not bytes)")
    declared = math.prod(shape) * dtype.dtype.itemsize  # Python ints: no overflow
    got = memoryview(data).nbytes
    if declared != got:
        raise UserError(f"{where}: not a flexorch output (an array of shape {shape} declares {declared} bytes, "
                        f"holds {got})")
    return np.frombuffer(data, dtype=dtype.dtype).reshape(shape, order=order if order in ("C", "F") else "C")


# What the pickle's `numpy.ndarray` becomes: not the class, whose constructor allocates any shape.
_NDARRAY = object()


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """An output .pkl holds lists, dicts and numpy arrays: numpy's array and dtype reconstruction are
    the only globals admitted, each replaced by a stub that checks before it allocates, so a foreign
    pickle runs no code and cannot ask for memory its bytes do not hold."""

    _RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
    _FROMBUFFER = {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def __init__(self, path: Path):
        self.path, self._file = path, io.BytesIO(path.read_bytes())
        super().__init__(self._file)

    def find_class(self, module, name):
        where = str(self.path)
        if (module, name) in self._RECONSTRUCT:
            return lambda *_args: _ArrayStub(where)
        if (module, name) in self._FROMBUFFER:  # protocol 5
            return lambda data, dtype, shape, order="C", *_: _StubbedArray(_checked_array(where, data, dtype, shape,
                                                                                          order))
        if (module, name) == ("numpy", "dtype"):
            return lambda *args: _DtypeStub(where, *args)
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY  # only ever an argument of _reconstruct, which ignores it; called, a TypeError
        raise UserError(f"{self.path}: not a flexorch output (refused the global '{module}.{name}')")

    def load(self):
        scan_pickle(self._file.getvalue(), str(self.path), refuse_code=None)  # memo bombs; globals: find_class
        try:
            value = super().load()
        except UserError:  # a refusal above (UserError is a ValueError: caught here first)
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
                OverflowError, MemoryError, RecursionError) as exc:
            raise UserError(f"{self.path}: not a valid output pickle ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None
        return self._arrays(value)

    def _arrays(self, value):
        """The loaded entries with their stubs replaced by the arrays they built: a list of arrays or
        of dicts of arrays (anything deeper is not an output, and is refused by _pickle_kind)."""
        if isinstance(value, list):
            return [self._arrays_in(v) for v in value]
        if isinstance(value, (_ArrayStub, _StubbedArray)):
            return self._array_of(value)
        problem = check_plain(value) if not isinstance(value, _DtypeStub) else None
        if problem:
            raise UserError(f"{self.path}: not a flexorch output ({problem})")
        return value

    def _arrays_in(self, entry):
        if isinstance(entry, dict):
            return {k: self._array_of(v) for k, v in entry.items()}
        return self._array_of(entry)

    def _array_of(self, value):
        if isinstance(value, (_ArrayStub, _StubbedArray)):
            if value.array is None:
                raise UserError(f"{self.path}: not a valid output pickle (an array without its data)")
            return value.array
        return value


@dataclass
class _StubbedArray:
    array: np.ndarray | None


# -- printing ----------------------------------------------------------------------------------------
def render(shown: Shown, console, rows: int | None = 20, by: str | None = None) -> None:
    """The per-prompt table (its first `rows`, None: all), accuracy, and with `by` a table per value."""
    from rich.table import Table
    from rich.text import Text

    summary = shown.summary
    groups = by_field(summary, by) if by else ()  # a bad --by is refused before anything is printed
    if shown.note:
        console.print(Text(f"note: {shown.note}", overflow="fold"))
    console.print(Text(f"{summary.prompts} prompts, {summary.kind}: {shown.source}", overflow="fold"))
    decode = _decoder(shown.model_dir) if summary.kind == ScoreKind.NEXT_TOKEN_PROBS.value else None
    listed = summary.choices[:rows] if rows else summary.choices
    table = Table(caption=(f"first {rows} of {summary.prompts}: --all lists every prompt"
                           if rows and summary.prompts > rows else None))
    table.add_column("prompt", overflow="fold")
    table.add_column("text" if summary.kind == ScoreKind.GENERATE.value else "argmax", overflow="fold")
    if summary.norm_choices:
        table.add_column("argmax/char")
    if summary.answers:
        table.add_column("answer")
    for i, choice in enumerate(listed):
        answer = summary.answers[i] if summary.answers else None
        cells = [_prompt_label(summary, i), _choice_text(summary, choice, decode)]
        if summary.norm_choices:
            cells.append(str(summary.norm_choices[i]))
        if summary.answers:
            cells.append("-" if answer is None else f"{answer} {'✓' if answer == choice else '✗'}")
        table.add_row(*cells)
    console.print(table)
    for name in ("acc", "acc_norm"):
        value = getattr(summary, name)
        if value is not None:
            console.print(f"{name}: {_rate(value, getattr(summary, name + '_stderr'))} "
                          f"({summary.answered} prompts with an answer)")
    if by:
        console.print(_group_table(by, groups, summary.acc_norm is not None))


def groups_json(summary: Summary, by: str) -> list[dict]:
    from dataclasses import asdict

    return [asdict(g) for g in by_field(summary, by)]


def _group_table(by: str, groups: tuple[Group, ...], norm: bool):
    from rich.table import Table

    table = Table(title=f"accuracy by {by}")
    table.add_column(by, overflow="fold")
    table.add_column("prompts", justify="right")
    table.add_column("acc")
    if norm:
        table.add_column("acc_norm")
    for g in groups:
        table.add_row(str(g.value), str(g.answered), _rate(g.acc, g.acc_stderr),
                      *([_rate(g.acc_norm, g.acc_norm_stderr)] if norm else []))
    return table


def _rate(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _prompt_label(summary: Summary, i: int) -> str:
    """The prompt's id where the prompts have ids (its index where it has none), else its index."""
    if summary.ids and summary.ids[i] is not None:
        return str(summary.ids[i])
    return f"#{i}" if summary.ids else str(i)


def _choice_text(summary: Summary, choice, decode) -> str:
    if summary.kind == ScoreKind.GENERATE.value:  # per suffix, its text as a Python literal (newlines shown)
        return " | ".join(repr(t) for t in choice)
    if summary.kind == ScoreKind.TOKEN_PROBS.value and isinstance(choice, int) and 0 <= choice < len(summary.labels):
        return f"{choice} {summary.labels[choice]!r}"
    if isinstance(choice, (list, tuple)):
        return ", ".join(repr(decode(i)) if decode else str(i) for i in choice)
    return str(choice)


def _decoder(model_dir: Path | None):
    """token id -> its text, with the job's tokenizer; None (ids are shown) where it cannot be loaded."""
    if model_dir is None or not model_dir.is_dir():
        return None
    from flexorch.orchestrator.prompts import load_tokenizer

    try:
        tokenizer = load_tokenizer(model_dir)
    except UserError:
        return None
    return lambda token_id: tokenizer.decode([int(token_id)])
