"""The worker process: runs its rounds of the engine over its slice of prompts and commits each
round's results durably as a part file, telling the controller what it does on a pipe.

One process per device. What crosses the process boundary is plain frozen dataclasses: the
`WorkerTask` in, messages (`Ready`, `Progress`, `RoundDone`, `Finished`, `Failed`) out. Nothing
heavy is built before `Ready`: the controller learns at once that the process is up and its pipe
works, and torch is imported afterwards.

In pipeline mode (`WorkerTask.pipeline`) every stage runs the same rounds over the same prompts,
streaming only its shards (workers/pipeline.py); the stage owning the head writes the parts, the
others report their rounds with no part.

Parts (the resume granularity: one per round) are numpy `.npz` files written to a temporary file,
flushed, fsynced and renamed into `parts/`, so a part on disk is always complete. They are read
back with `allow_pickle=False`: a part holds arrays only, never code.

This module imports numpy and the standard library only, so the controller (which never imports
torch at import time) can use its task, message and part definitions.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workers.atomic import atomic_writer
from workers.errors import UserError
from workers.protocol import EngineSettings, EngineSummary, ProgressEvent, PromptResult, ScoreSpec, TokenizedPrompt
from workers.stepdown import is_out_of_memory, step_down

# Progress messages are throttled to this interval: enough for a live bar and for the controller's
# hung-worker clock, without flooding the pipe with one message per layer of a small model.
PROGRESS_INTERVAL_S = 0.25
EXIT_ORPHANED = 3  # the controller went away (death pipe closed)
EXIT_FAILED = 1


# -- what the controller hands a worker -------------------------------------------------------------
@dataclass(frozen=True)
class WorkerHooks:
    """Fault injection for tests, applied around engine calls (no mock of the worker needed).

    Counts are of rounds completed (committed) in this run; 0 means before the first round.
    """

    sigkill_after_rounds: int | None = None  # SIGKILL itself, as the OOM killer would
    sigkill_after_progress: int | None = None  # SIGKILL itself on the N-th engine progress event
    hang_after_rounds: int | None = None  # block forever, sending nothing (a hung worker)
    raise_after_rounds: int | None = None  # raise RuntimeError (an internal failure)
    disk_full_after_rounds: int | None = None  # the next part write fails with ENOSPC

    @classmethod
    def from_dict(cls, data: dict) -> "WorkerHooks":
        return cls(**data)


@dataclass(frozen=True)
class Round:
    """One engine call: the model is streamed once per generation step over these prompts."""

    round_id: int  # position in the worker's planned rounds (kept when earlier rounds are skipped)
    prompts: tuple[TokenizedPrompt, ...]

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(p.index for p in self.prompts)


@dataclass(frozen=True)
class PipelineLinks:
    """A pipeline stage's place and its ends of the ring: `inbound` from stage index-1, `outbound`
    to stage index+1 (bounded multiprocessing queues, made by the executor, handed over at spawn)."""

    index: int
    count: int
    inbound: object
    outbound: object


@dataclass(frozen=True)
class WorkerTask:
    name: str  # "w0", ...: names the worker in messages, parts and logs
    model_dir: str  # layerwise dir
    settings: EngineSettings
    score: ScoreSpec
    rounds: tuple[Round, ...]  # only the rounds (and prompts) still to compute
    parts_dir: str
    planned_rounds: int = 0  # rounds in the plan, for "round k/N" in progress
    log_path: str | None = None  # the worker's stdout/stderr go here (keeps a live display clean)
    hooks: WorkerHooks = field(default_factory=WorkerHooks)
    engine_hooks: object | None = None  # passed to the engine as is (workers.engine.EngineHooks)
    pipeline: PipelineLinks | None = None  # None: data mode (this worker streams the whole model)

    @property
    def n_prompts(self) -> int:
        return sum(len(r.prompts) for r in self.rounds)


# -- what a worker says -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    worker: str
    pid: int


@dataclass(frozen=True)
class Progress:
    worker: str
    round_id: int
    event: ProgressEvent


@dataclass(frozen=True)
class RoundDone:
    worker: str
    round_id: int
    indices: tuple[int, ...]  # prompts committed by this round (a pipeline stage: computed, for progress)
    part: str  # the part file holding them; "" for a pipeline stage that does not own the head
    summary: EngineSummary


@dataclass(frozen=True)
class SteppedDown:
    """An out-of-memory error was survived by retrying the round with smaller settings."""

    worker: str
    round_id: int
    change: str  # e.g. "batch_tokens 4096 -> 2048"
    error: str  # the out-of-memory error, one line
    settings: EngineSettings  # what the worker runs with from now on


@dataclass(frozen=True)
class Finished:
    worker: str
    seconds: float


# Failed.kind: what the controller makes of it.
FAIL_ERROR, FAIL_USER, FAIL_DISK_FULL = "error", "user", "disk_full"


@dataclass(frozen=True)
class Failed:
    worker: str
    error: str  # one line
    traceback: str = ""
    kind: str = FAIL_ERROR  # FAIL_USER: bad input found while running (a corrupt layer file)


WorkerMessage = Ready | Progress | RoundDone | SteppedDown | Finished | Failed


# -- parts: one committed round ---------------------------------------------------------------------
PART_SUFFIX = ".npz"


class DiskFullError(OSError):
    """The disk filled while committing a part; parts committed before are intact."""


def part_name(worker: str, rnd: Round) -> str:
    """Unique per prompt set, so runs with a different placement never overwrite each other's parts."""
    digest = hashlib.sha256(",".join(map(str, rnd.indices)).encode()).hexdigest()[:12]
    return f"part-{worker}-r{rnd.round_id:04d}-{digest}{PART_SUFFIX}"


def _part_arrays(kind: str, results: Sequence[PromptResult]) -> dict[str, np.ndarray]:
    arrays = {"indices": np.array([r.index for r in results], dtype=np.int64), "kind": np.array(kind)}
    for j, result in enumerate(results):
        if isinstance(result.scores, dict):
            for key, value in result.scores.items():
                arrays[f"s{j}_{key}"] = np.asarray(value)
        else:
            arrays[f"s{j}"] = np.asarray(result.scores)
        # generated: (n_suffixes, G-1); every suffix takes the same number of greedy steps
        n_suffixes = len(result.generated)  # 0 for suffix_logprob, which generates nothing
        generated = np.array(result.generated, dtype=np.int64)
        arrays[f"g{j}"] = generated.reshape(n_suffixes, -1) if n_suffixes else np.zeros((0, 0), np.int64)
    return arrays


def write_part(path: str | Path, kind: str, results: Sequence[PromptResult]) -> Path:
    """Commit `results` to `path` atomically (temp file, flush, fsync, rename, fsync dir).

    Raises DiskFullError naming the path when the disk is full; the temp file is removed and every
    part committed before stays as it was.
    """
    path = Path(path)
    arrays = _part_arrays(kind, results)
    try:
        with atomic_writer(path) as handle:
            np.savez(handle, **arrays)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                exc.errno, f"disk full while writing results to {path} (parts committed before are intact; "
                "free some space and resubmit to resume)"
            ) from exc
        raise
    return path


def read_part_indices(path: str | Path) -> tuple[int, ...]:
    """The prompt indices a part holds (reads only that member of the archive)."""
    with np.load(path, allow_pickle=False) as data:
        return tuple(int(i) for i in data["indices"])


def read_part(path: str | Path) -> list[PromptResult]:
    """Read a part back into PromptResults (arrays only: allow_pickle=False)."""
    with np.load(path, allow_pickle=False) as data:
        indices = [int(i) for i in data["indices"]]
        kind = str(data["kind"])
        results = []
        for j, index in enumerate(indices):
            if kind == "suffix_logprob":
                prefix = f"s{j}_"
                scores = {key[len(prefix):]: data[key] for key in data.files if key.startswith(prefix)}
            else:
                scores = data[f"s{j}"]
            generated = tuple(tuple(int(t) for t in row) for row in data[f"g{j}"])
            results.append(PromptResult(index=index, scores=scores, generated=generated))
    return results


# -- the process -----------------------------------------------------------------------------------------
class _ProgressForwarder:
    """The engine's progress callback: forwards events to the controller, throttled, never
    dropping the last event of a pass (so the bar ends at 100%). One per task; `round_id` is set
    as rounds start."""

    def __init__(self, send: Callable, task: WorkerTask, clock=time.monotonic):
        self.send, self.task, self.clock = send, task, clock
        self.round_id = 0
        self.last = float("-inf")
        self.count = 0  # events of the whole task, for the sigkill_after_progress hook

    def __call__(self, event: ProgressEvent) -> None:
        self.count += 1
        if self.count == self.task.hooks.sigkill_after_progress:
            os.kill(os.getpid(), signal.SIGKILL)
        now = self.clock()
        final = event.stage >= event.stages and event.step >= event.steps
        if final or now - self.last >= PROGRESS_INTERVAL_S:
            self.last = now
            self.send(Progress(self.task.name, self.round_id, event))


def _inject_faults(hooks: WorkerHooks, rounds_done: int) -> None:
    if hooks.sigkill_after_rounds == rounds_done:
        os.kill(os.getpid(), signal.SIGKILL)
    if hooks.hang_after_rounds == rounds_done:
        threading.Event().wait()  # never set: the process blocks here, sending nothing
    if hooks.raise_after_rounds == rounds_done:
        raise RuntimeError(f"injected fault after {rounds_done} round(s)")


def configure_device(settings: EngineSettings) -> None:
    """Pin this process to its GPU, or split the CPU between workers sharing it."""
    import torch

    if settings.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(settings.device))
    elif settings.threads > 0:
        torch.set_num_threads(settings.threads)


def run_task(task: WorkerTask, send: Callable[[WorkerMessage], None]) -> None:
    """Run every round of `task`, committing each as a part, then send Finished.

    Exceptions propagate (worker_main turns them into Failed)."""
    start = time.monotonic()
    configure_device(task.settings)
    # torch and transformers: only once the pipe is known to work
    from workers.engine import score_prompts
    from workers.pipeline import PipelineStage

    parts_dir = Path(task.parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    forward = _ProgressForwarder(send, task)
    settings = task.settings
    with _open_ring(task.pipeline) as ring:
        for rounds_done, rnd in enumerate(task.rounds):
            _inject_faults(task.hooks, rounds_done)
            forward.round_id = rnd.round_id
            if ring is None:
                results, summary, settings = _score_round(task, rnd, settings, forward, send)
            else:  # no step-down: one stage batching differently would desynchronise the pipeline
                stage = PipelineStage(ring.index, ring.count, ring, rnd.round_id)
                results, summary = score_prompts(task.model_dir, rnd.prompts, task.score, settings,
                                                 on_progress=forward, hooks=task.engine_hooks, stage=stage)
                if not results:  # a stage without the head: nothing to commit
                    send(RoundDone(task.name, rnd.round_id, rnd.indices, "", summary))
                    continue
            _commit(task, rnd, rounds_done, results, summary, parts_dir, send)
    _inject_faults(task.hooks, len(task.rounds))
    send(Finished(task.name, time.monotonic() - start))


def _open_ring(links: PipelineLinks | None):
    """The stage's ring (its receiver thread runs until the task ends); a null context in data mode."""
    if links is None:
        return contextlib.nullcontext()
    from workers.pipeline import Ring

    return Ring(links.index, links.count, links.inbound, links.outbound)


def _score_round(task: WorkerTask, rnd: Round, settings: EngineSettings, forward, send):
    """Data mode: the round's (results, summary, settings), stepping down after out-of-memory errors."""
    from workers.engine import score_prompts

    while True:
        try:
            results, summary = score_prompts(task.model_dir, rnd.prompts, task.score, settings,
                                             on_progress=forward, hooks=task.engine_hooks)
            return results, summary, settings
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            settings = _smaller_settings(task, rnd, settings, exc, send)


def _commit(task: WorkerTask, rnd: Round, rounds_done: int, results, summary, parts_dir: Path, send) -> None:
    """Write the round's part and tell the controller."""
    got = tuple(r.index for r in results)
    if got != rnd.indices:
        raise RuntimeError(f"engine returned prompts {got[:8]} for round {rnd.round_id}, "
                           f"expected {rnd.indices[:8]}")
    path = parts_dir / part_name(task.name, rnd)
    if task.hooks.disk_full_after_rounds == rounds_done:
        raise DiskFullError(errno.ENOSPC, f"disk full while writing results to {path} (injected)")
    write_part(path, task.score.kind, results)
    send(RoundDone(task.name, rnd.round_id, rnd.indices, str(path), summary))


class OutOfMemoryFailure(RuntimeError):
    """Out of memory with the smallest settings there are."""


def _smaller_settings(task: WorkerTask, rnd: Round, settings: EngineSettings, exc: BaseException,
                      send: Callable[[WorkerMessage], None]) -> EngineSettings:
    """The settings to retry `rnd` with after an out-of-memory error, announced to the controller;
    raises OutOfMemoryFailure naming the smallest settings tried when there is nothing smaller."""
    import gc

    import torch

    longest = max(p.n_tokens + len(p.suffix_ids) * (task.score.generate_tokens - 1) for p in rnd.prompts)
    error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    smaller = step_down(settings, min_batch_tokens=longest)
    if smaller is None:
        raise OutOfMemoryFailure(
            f"out of memory even with the smallest settings (batch_tokens {settings.batch_tokens}, "
            f"layers_per_shard {settings.layers_per_shard}, storage {settings.storage}): {error}"
        ) from exc
    del exc  # its traceback holds the failed attempt's tensors
    gc.collect()
    if settings.device.startswith("cuda"):
        torch.cuda.empty_cache()
    settings, change = smaller
    send(SteppedDown(task.name, rnd.round_id, change, error, settings))
    return settings


def _exit_when_closed(death_conn) -> None:
    """Exit as soon as the controller closes its end of the death pipe, or dies: no orphan outlives
    a killed controller. The parent never sends on it; EOF is the only signal."""

    def watch():
        try:
            death_conn.recv()
        except (EOFError, OSError):
            pass
        os._exit(EXIT_ORPHANED)  # parts are committed atomically, so stopping mid-write loses nothing

    threading.Thread(target=watch, name="death-pipe", daemon=True).start()


def _redirect_output(log_path: str | None) -> None:
    if log_path is None:
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def failure_of(task: WorkerTask, exc: BaseException) -> Failed:
    """The Failed message for an exception raised by run_task."""
    trace = "".join(traceback.format_exception(exc))
    if isinstance(exc, UserError):
        return Failed(task.name, str(exc), trace, FAIL_USER)
    if isinstance(exc, DiskFullError):
        return Failed(task.name, exc.strerror or str(exc), trace, FAIL_DISK_FULL)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" ({exc.filename})" if exc.filename else ""
        return Failed(task.name, f"disk full{where}: {exc}", trace, FAIL_DISK_FULL)
    message = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return Failed(task.name, message, trace, FAIL_ERROR)


def worker_main(task: WorkerTask, conn, death_conn) -> None:
    """Process entry point (spawned by orchestrator.executor.LocalProcessExecutor)."""
    # Ctrl-C reaches the whole foreground process group; the controller owns shutdown and stops
    # workers through the death pipe, so a worker must not die half-way on its own SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The planner numbers GPUs as NVML does (by PCI bus); CUDA's default order is fastest first,
    # which on a machine with mixed cards would give this worker another card than planned.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    _exit_when_closed(death_conn)
    _redirect_output(task.log_path)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} worker {task.name} pid {os.getpid()} on {task.settings.device}: "
          f"{len(task.rounds)} rounds, {task.n_prompts} prompts", flush=True)
    conn.send(Ready(task.name, os.getpid()))
    try:
        run_task(task, conn.send)
    except BaseException as exc:  # the top of a process: everything is reported, with its traceback
        traceback.print_exc()  # into the worker's log
        conn.send(failure_of(task, exc))
        conn.close()
        sys.exit(EXIT_FAILED)
    conn.close()
