"""The Python API: `flexorch.score(...)` and `flexorch.plan(...)`, the same machinery as
`flexorch submit` (validation, plan, one worker process per device, parts, resume, report).

Every job-file key is a keyword (`layers_per_shard=2`, `limits={"ram": "8GB"}`), validated as the
job file is, with the same one-line `UserError`s naming the keyword. Prompts are a .jsonl/.pkl path
or Python objects (dicts as in a .jsonl line, or the seed's `(prefix, suffixes)` pairs); objects are
written to `job_dir/prompts.jsonl`, and the job itself to `job_dir/job.yaml`, so a job started
from Python can be resumed, inspected (`flexorch show JOB_DIR`) or re-run from the command line.
Those two files are written only once the job is accepted (validated, job_dir and output its own),
and never over a file of the user's. Without `job_dir` the job runs in a temporary folder that is
removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from flexorch.contract.atomic import atomic_write_text
from flexorch.contract.errors import UserError
from flexorch.contract.protocol import ScoreKind
from flexorch.orchestrator.jobstate import JOB_FILE as JOB_STATE_FILE
from flexorch.orchestrator.planner import Plan
from flexorch.orchestrator.prompts import Prompt, prompts_from_objects
from flexorch.orchestrator.generation import DEFAULT_MAX_NEW_TOKENS
from flexorch.orchestrator.merge import generate_fields
from flexorch.orchestrator.spec import JobSpec, job_from_mapping

_SOURCE = "flexorch"  # what errors about keywords name
JOB_FILE, PROMPTS_FILE, OUTPUT_FILE = "job.yaml", "prompts.jsonl", "scores.pkl"


@dataclass(frozen=True)
class PromptScores:
    """One prompt and its scores (see README "Outputs" for `scores` per kind)."""

    index: int
    id: object
    prefix: str
    suffixes: tuple[str, ...]
    answer: int | None
    # float32 (n_suffixes, steps, k), suffix_logprob's dict of (n_suffixes,) arrays, or generate's
    # dict: text (a list per suffix), ids, n_new, stop (StopReason codes), logprobs (asked for)
    scores: object
    generated: tuple[tuple[int, ...], ...]  # per suffix, the argmax id of each greedy step
    choice: object  # the summary's argmax: a suffix index, a token index, argmax ids per suffix (generate: texts)
    fields: dict = field(default_factory=dict)  # the prompt's extra keys
    prefix_ids: tuple[int, ...] | None = None  # a prompt given as token ids (prefix and suffixes are then empty)
    suffix_ids: tuple[tuple[int, ...], ...] | None = None


class Results(Sequence):
    """Scores of every prompt in prompt order: `results[i]` is a PromptScores; `report` is
    report.json (plan, workers, `summary` with accuracy where prompts have answers)."""

    def __init__(self, kind: str, prompts: list[PromptScores], token_labels: tuple[str, ...], report: dict,
                 output: Path | None):
        self.kind, self.prompts, self.token_labels = ScoreKind(kind), prompts, token_labels
        self.report, self.output = report, output

    def __getitem__(self, i):
        return self.prompts[i]

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        acc = self.summary.get("acc")
        return (f"Results({len(self)} prompts, {self.kind.value}"
                + (f", acc {acc:.4f}" if acc is not None else "") + ")")

    @property
    def ids(self) -> list:
        return [p.id for p in self.prompts]

    @property
    def summary(self) -> dict:
        return self.report.get("summary") or {}

    @property
    def accuracy(self) -> float | None:
        return self.summary.get("acc")

    def to_records(self) -> list[dict]:
        """One flat record per prompt and suffix (and generation step for the probability kinds),
        for `pandas.DataFrame(results.to_records())`."""
        return [record for prompt in self.prompts for record in _records(self.kind, prompt, self.token_labels)]


def _records(kind: ScoreKind, prompt: PromptScores, labels: tuple[str, ...]) -> Iterator[dict]:
    suffixes = prompt.suffixes if prompt.suffix_ids is None else [list(ids) for ids in prompt.suffix_ids]
    for j, suffix in enumerate(suffixes):
        base = {"index": prompt.index, "id": prompt.id, "suffix_index": j,
                ("suffix" if prompt.suffix_ids is None else "suffix_ids"): suffix,
                "answer": prompt.answer, **prompt.fields}
        if kind is ScoreKind.GENERATE:
            fields = generate_fields(prompt.scores)
            yield {**base, **{key: values[j] for key, values in fields.items()}}
            continue
        if kind is ScoreKind.SUFFIX_LOGPROB:
            yield {**base, **{key: np.asarray(value)[j].item() for key, value in prompt.scores.items()}}
            continue
        for step, probs in enumerate(np.asarray(prompt.scores)[j]):
            if kind is ScoreKind.TOKEN_PROBS:
                yield {**base, "step": step, **{label: float(p) for label, p in zip(labels, probs)}}
            else:
                top = int(np.argmax(probs))
                yield {**base, "step": step, "argmax_id": top, "argmax_prob": float(probs[top])}


def score(model, prompts, *, score: str | dict = "next_token_probs", tokens: Sequence[str] | None = None,
          devices="auto", job_dir=None, output=None, restart: bool = False, progress: bool = True,
          **settings) -> Results:
    """Score `prompts` with the model in `model` (a layerwise dir or a Hugging Face checkpoint dir).

    score: next_token_probs | token_probs | suffix_logprob; tokens: token_probs' strings.
    devices, and every other job-file key as a keyword (layers_per_shard, storage, dtype,
    batch_tokens, generate_tokens, limits={"gpu_memory": "6GB"}, ...): as in the job file.
    job_dir: where parts, logs and report.json go; given, a re-run resumes from what is committed
    (restart=True discards it). output: also write the output file (.pkl or .jsonl).
    Raises flexorch.UserError (bad input, one line), flexorch.JobFailed (a worker failed).
    """
    from rich.console import Console

    from flexorch.orchestrator.controller import done_line, run_job

    with _job(model, prompts, score, tokens, devices, job_dir, output, settings) as job:
        console = Console(stderr=True, quiet=not progress)
        if job_dir is not None:
            _check_own_files(job.spec.job_dir, job.files)
        done = run_job(job.spec, console, restart=restart,
                       on_accepted=job.write_files if job_dir is not None else None)
        console.out(done_line(done, paths=job_dir is not None), highlight=False)  # a temporary job_dir is gone
        summary = done.report.get("summary") or {}
        choices = summary.get("choices") or [None] * len(done.prompts)
        scored = [PromptScores(r.index, p.id, p.prefix, p.suffixes, p.answer, r.scores, r.generated, c, p.fields,
                               p.prefix_ids, p.suffix_ids)
                  for p, r, c in zip(done.prompts, done.results, choices)]
        # the paths of a temporary job are gone once this returns: the report does not name them
        gone = {} if job_dir is not None else {"job": None, **({"output": None} if output is None else {})}
        return Results(job.spec.score.kind, scored, job.spec.score.tokens, {**done.report, **gone},
                       job.spec.output if output is not None else None)


def generate(model, prompts, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stop: Sequence[str] | None = None,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, logprobs: bool = False,
             **settings) -> Results:
    """Continue `prompts` (text, or dicts whose suffixes may be absent and which may carry their own
    max_new_tokens and stop): score(..., score={"kind": "generate", ...}); `results[i].choice` is
    prompt i's text per suffix, `results[i].scores` its ids, stop reasons and log-probs."""
    kind = {"kind": "generate", "max_new_tokens": max_new_tokens, "stop": list(stop or []),
            "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed, "logprobs": logprobs}
    return score(model, prompts, score=kind, **settings)


def plan(model, prompts, *, score: str = "next_token_probs", tokens: Sequence[str] | None = None,
         devices="auto", **settings) -> Plan:
    """The plan `score(...)` with the same arguments would run (devices, layers per shard,
    storage, batch size, predicted memory and time, and why); runs and writes nothing."""
    from flexorch.orchestrator.controller import plan_spec

    with _job(model, prompts, score, tokens, devices, None, None, settings) as job:
        return plan_spec(job.spec)


@dataclass(frozen=True)
class _ApiJob:
    """A validated job of keywords, and the files it writes into its job_dir once it is accepted:
    the job file (`flexorch submit JOB_DIR/job.yaml` re-runs it) and the prompts given as objects."""

    spec: JobSpec
    files: dict[str, str]  # name in job_dir -> text

    def write_files(self) -> None:
        for name, text in self.files.items():
            path = self.spec.job_dir / name
            if not (path.is_file() and path.read_text(encoding="utf-8") == text):
                atomic_write_text(path, text)


@contextlib.contextmanager
def _job(model, prompts, kind, tokens, devices, job_dir, output, settings) -> Iterator[_ApiJob]:
    """The keywords validated as a job file's keys are (the same parser), writing nothing: prompts
    given as objects wait in a private temporary file, and without a job_dir the job runs in a
    temporary folder; both are removed on the way out."""
    with contextlib.ExitStack() as stack:
        if job_dir is None:
            job_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="flexorch-job-"))
        files = {}
        if not isinstance(prompts, (str, Path)):
            generates = (kind.get("kind") if isinstance(kind, dict) else kind) == ScoreKind.GENERATE
            files[PROMPTS_FILE] = _prompts_text(prompts, generates)
            staged = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flexorch-prompts-"))) / PROMPTS_FILE
            staged.write_text(files[PROMPTS_FILE], encoding="utf-8")
            prompts = staged
        job_path = Path(job_dir).expanduser() if _is_path(job_dir) else None
        if output is None:  # the default needs a job_dir that is a path; one that is not is refused below
            output = job_path / OUTPUT_FILE if job_path is not None else OUTPUT_FILE
        try:
            raw = {"model": _plain(model), "prompts": _plain(prompts), "output": _plain(output),
                   "job_dir": _plain(job_dir),
                   "score": _plain(kind) if tokens is None else {"kind": _plain(kind), "tokens": _plain(tokens)},
                   "devices": _plain(devices), **{key: _plain(value) for key, value in settings.items()}}
        except RecursionError:
            raise UserError(f"{_SOURCE}: a keyword's value is nested too deeply (or holds itself)") from None
        spec = job_from_mapping(raw, (job_path or Path()).absolute() / JOB_FILE, source=_SOURCE, base=Path.cwd())
        if any(spec.output == spec.job_dir / name for name in files):
            raise UserError(f"{_SOURCE}: output {spec.output} is where the job keeps its {spec.output.name}; "
                            "choose another output")
        job_file = {**raw, "model": str(spec.model), "output": str(spec.output), "job_dir": str(spec.job_dir),
                    "prompts": str(spec.job_dir / PROMPTS_FILE if PROMPTS_FILE in files else spec.prompts)}
        files[JOB_FILE] = yaml.safe_dump(job_file, sort_keys=False)
        yield _ApiJob(spec, files)


def _is_path(value) -> bool:
    return isinstance(value, Path) or (isinstance(value, str) and bool(value.strip()))


def _plain(value):
    """Keyword values as a YAML job file holds them (tuples as lists, paths as text); anything else
    as it is, for the job file's parser to accept or refuse."""
    if isinstance(value, (Path, str)):  # str subclasses too (numpy's): the job file is YAML's plain data
        return str(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _prompts_text(prompts, generate: bool = False) -> str:
    """Python objects as the .jsonl lines they are read back from (errors name `prompts[i]`)."""
    parsed: list[Prompt] = prompts_from_objects(prompts, source="prompts", generate=generate)
    return "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in parsed)


def _check_own_files(job_dir: Path, files: dict[str, str]) -> None:
    """Refuse a job_dir whose job files are someone else's: a folder of the user's that holds a
    prompts.jsonl or job.yaml of its own, which the job would replace. In a flexorch job_dir (its
    resume state) they are the job's: the job takes them only once accepted (same job, or restart)."""
    if job_dir.is_dir() and (job_dir / JOB_STATE_FILE).is_file():
        return
    for name, text in files.items():
        path = job_dir / name
        if path.exists() and not (path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text):
            raise UserError(f"{_SOURCE}: job_dir {job_dir} holds a {name} that is not this job's (no flexorch job "
                            f"state beside it); flexorch never replaces it: choose another job_dir")
