"""What the controller and a worker say to each other: the task handed over at spawn and the
messages sent back on the pipe. Plain frozen dataclasses, torch-free, picklable."""

from __future__ import annotations

from dataclasses import dataclass, field

from flexorch.contract.protocol import (EngineSettings, EngineSummary, ProgressEvent, PromptResult, ScoreSpec,
                                       TokenizedPrompt)


# -- what the controller hands a worker -------------------------------------------------------------
@dataclass(frozen=True)
class WorkerHooks:
    """Fault injection for tests, applied around engine calls (no mock of the worker needed).

    Counts are of rounds completed (committed) in this run; 0 means before the first round.
    """

    sigkill_after_rounds: int | None = None  # SIGKILL itself, as the OOM killer would
    sigkill_after_progress: int | None = None  # SIGKILL itself on the N-th engine progress event
    sigkill_after_shard: int | None = None  # SIGKILL itself after the N-th shard step of this run (mid-pass)
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
    # True: send each round's results back (RoundResults) for the controller to commit, instead of
    # writing the part: a worker on another machine (a Ray actor) may not see the job_dir.
    return_results: bool = False

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
class RoundResults:
    """A round's results, sent instead of a part by a worker whose task has `return_results`; the
    executor commits them as the part a local worker would have written and passes on RoundDone."""

    worker: str
    round_id: int
    indices: tuple[int, ...]
    results: tuple[PromptResult, ...]  # in the order of `indices`
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


WorkerMessage = Ready | Progress | RoundDone | RoundResults | SteppedDown | Finished | Failed
