"""What a running job shows: live rich bars on a terminal, plain log lines otherwise.

Both consume the executor's messages. A worker's position is counted in prompts: those committed
(reused from an earlier run included) plus the fraction of the current round's passes done, where
a round streams the model once per generation step (`stages` shards per pass), and the engine
reports each batch within a shard too (a shard of a big model over many batches takes minutes), so
the line moves batch by batch, not only when a round commits. Shards weigh what the planner predicts
they cost (WorkerPlan.predicted_pass_shares: the embedding is a lookup, the decoder shards carry the
FLOPs), so the bar does not jump to a third after the embedding.

Phases: a worker is `starting` from its spawn (importing torch, building the model: 10-30 s on a
busy CPU) to its first progress event, then `computing`; the display says so from the moment the
workers are spawned, so no stretch of a job passes in silence.

ETAs (`eta_seconds`, a pure function): before a worker computes, the planner's start-up left plus its
compute time; once it computes, the time left at a seconds-per-slice rate blended from the plan's
towards the one measured on the engine's clock, the measurement weighing done / (done + PRIOR_SHARE),
so it converges on each worker's pace as work completes. The job's is its slowest worker's, since
workers run side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from flexorch.contract.protocol import ProgressEvent
from flexorch.contract.messages import Finished, Progress as ProgressMessage, Ready, RoundDone, SteppedDown

# Plain mode writes a worker's line at most this often (plus one per committed round): enough to
# see a job move in a CI log without a line per layer of an 80-layer model.
LOG_INTERVAL_S = 10.0
# The plan's rate counts as much as a measurement over this share of a worker's slice. The plan's
# figures come from a calibration that may have been taken under other load (two CPU workers took
# 188 s where the plan said 270 s, and an ETA that followed the plan stayed 37-51% high); a fiftieth
# of the slice measured is already as good a guide, a quarter of it leaves the plan 7% of the say.
PRIOR_SHARE = 0.02


@dataclass(frozen=True)
class WorkerLine:
    """What the display knows of a worker before it starts."""

    name: str
    device: str
    prompts: int  # in its slice, reused ones included
    reused: int  # of those, committed by an earlier run
    rounds: int  # planned rounds
    predicted_seconds: float = 0.0  # the planner's compute time for the whole slice (start-up excluded)
    pass_shares: tuple[float, ...] = ()  # each shard's share of a pass's predicted time; () = equal
    predicted_start_seconds: float = 0.0  # the planner's start-up: spawn to the first forward


def pass_fraction(event: ProgressEvent | None, shares: Sequence[float] = ()) -> float:
    """Fraction of a round's work done at `event`: passes done (one per step), plus the predicted
    share of the shards done in the current one, and of the batches done in the shard computing."""
    if event is None or event.stages == 0:
        return 0.0
    shares = shares if len(shares) == event.stages else (1 / event.stages,) * event.stages
    in_pass = sum(shares[:event.stage])
    if event.batches and event.stage < event.stages:  # within the shard computing now
        in_pass += shares[event.stage] * event.batch / event.batches
    return (event.step - 1 + in_pass) / event.steps


def eta_seconds(done: float, computed: float | None, since_spawn: float, predicted_compute: float,
                predicted_start: float = 0.0, spared: float = 0.0) -> float | None:
    """Seconds a worker has left, or None where nothing supports a figure.

    done: fraction of its slice's work done (0..1); computed: seconds its engine has computed (None
    while starting); since_spawn: seconds since its process was started; predicted_*: the plan's;
    spared: of `done`, what a checkpoint spared the round in progress (done, but not at this pace)."""
    if done >= 1:
        return 0.0
    if computed is None:  # starting: the start-up left (none once overdue), then the whole compute
        return max(predicted_start - since_spawn, 0.0) + predicted_compute if predicted_compute else None
    paced = done - spared  # what this run computed
    if paced <= 0:  # computing, nothing measurable done yet (the embedding costs nothing)
        left = predicted_compute * (1 - spared) - computed
        return left if left > 0 else None
    measured = computed / paced  # seconds per slice at the pace so far
    weight = paced / (paced + PRIOR_SHARE)
    per_slice = measured if not predicted_compute else (1 - weight) * predicted_compute + weight * measured
    return (1 - done) * per_slice


@dataclass
class _WorkerState:
    line: WorkerLine
    done: int  # prompts committed, reused included
    spawned: float  # clock when the display began, just before the workers were spawned
    round_prompts: int = 0
    event: ProgressEvent | None = None
    status: str = "starting"  # starting | computing | done | reused (nothing left to compute)
    pid: int | None = None
    computed: float = 0.0  # engine seconds of the rounds committed in this run
    round_began: float | None = None  # clock at the engine's start of the round in progress

    def pass_fraction(self) -> float:
        return pass_fraction(self.event, self.line.pass_shares)

    def position(self) -> float:
        """Prompts done, counting the current round in part."""
        return min(self.line.prompts, self.done + self.round_prompts * self.pass_fraction())

    def done_fraction(self) -> float:
        todo = self.line.prompts - self.line.reused
        return (self.position() - self.line.reused) / todo if todo else 1.0

    def spared_fraction(self) -> float:
        """Of `done_fraction`, what a checkpoint spared the round in progress (not computed by this run)."""
        e, todo = self.event, self.line.prompts - self.line.reused
        if e is None or not e.shards_resumed or not todo:
            return 0.0
        return self.round_prompts * e.shards_resumed / (e.stages * e.steps) / todo

    def eta_seconds(self, now: float) -> float | None:
        if self.status in ("done", "reused"):
            return 0.0
        computed = None if self.status == "starting" else self.computed + (
            now - self.round_began if self.round_began is not None else 0.0)
        return eta_seconds(self.done_fraction(), computed, now - self.spawned, self.line.predicted_seconds,
                           self.line.predicted_start_seconds, self.spared_fraction())

    def tokens_per_second(self) -> float:
        """Tokens through the whole model per second in the current round."""
        e = self.event
        if e is None or e.seconds <= 0:
            return 0.0
        shards_done = (e.step - 1) * e.stages + e.stage - e.shards_resumed  # those this run computed
        return e.tokens_done * shards_done / e.stages / e.seconds

    def detail(self, now: float | None = None) -> str:
        e = self.event
        eta = self.eta_seconds(now) if now is not None else None
        left = f"  ETA {_duration(eta)}" if eta is not None and self.status not in ("done", "reused") else ""
        if self.status == "starting":
            return f"starting (loading torch and the model)  prompts {self.done}/{self.line.prompts}{left}"
        if e is None:  # between rounds, or done
            return f"{self.status}  prompts {self.done}/{self.line.prompts}{left}"
        within = f" batch {e.batch}/{e.batches}" if e.batches else ""
        rate = self.tokens_per_second()  # 0 until a shard of the pass has ended
        rate = f"  {_si(rate)} tok/s" if rate > 0 else ""
        committed = f" ({self.done} committed)" if self.position() > self.done else ""
        return (f"shard {e.stage}/{e.stages}{within} step {e.step}/{e.steps}  "
                f"prompts {self.position():.1f}/{self.line.prompts}{committed}{rate}{left}")


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "<1s"
    seconds = int(seconds + 0.5)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class JobProgress:
    """Tracks every worker from the executor's messages; subclasses render. A context manager.
    `starting()` marks the moment the workers are spawned."""

    def __init__(self, console: Console, workers: Sequence[WorkerLine], clock: Callable[[], float] = time.monotonic):
        self.console = console
        self.clock = clock
        self.started = clock()
        self.workers = {w.name: _WorkerState(w, done=w.reused, spawned=self.started,
                                             status="starting" if w.reused < w.prompts else "reused")
                        for w in workers}
        self.total = sum(w.prompts for w in workers)
        self.reused = sum(w.reused for w in workers)

    def __enter__(self) -> "JobProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def starting(self) -> None:
        """The workers are being spawned now: their start-up counts from here."""
        self.started = self.clock()
        for state in self.workers.values():
            state.spawned = self.started

    def position(self) -> float:
        return sum(w.position() for w in self.workers.values())

    def eta_seconds(self) -> float | None:
        """The slowest worker's: they run side by side (reused prompts cost nothing). None once every
        worker is done (nothing left to estimate), or where a worker's is unknown."""
        if all(w.status in ("done", "reused") for w in self.workers.values()):
            return None
        etas = [w.eta_seconds(self.clock()) for w in self.workers.values()]
        return None if any(eta is None for eta in etas) else max(etas, default=0.0)

    def computing(self) -> bool:
        return any(w.status != "starting" for w in self.workers.values() if w.status != "reused")

    def handle(self, message) -> None:
        state = self.workers.get(getattr(message, "worker", None))
        if state is None:
            return
        now = self.clock()
        if isinstance(message, Ready):
            state.pid = message.pid
        elif isinstance(message, ProgressMessage):
            if state.round_began is None:  # the engine's clock starts with the round
                state.round_began = now - message.event.seconds
            state.status, state.event, state.round_prompts = "computing", message.event, message.event.prompts
        elif isinstance(message, RoundDone):
            state.done += len(message.indices)
            state.computed += message.summary.seconds
            state.event, state.round_prompts, state.round_began = None, 0, None
        elif isinstance(message, SteppedDown):  # the round starts again: its time so far was spent all the same
            if state.round_began is not None:
                state.computed += now - state.round_began
            state.event, state.round_began = None, None
        elif isinstance(message, Finished):
            state.status = "done"
        self.render(state, message)

    def render(self, state: _WorkerState, message) -> None:
        raise NotImplementedError


class LiveProgress(JobProgress):
    """One rich bar per worker and one for the job, with its ETA."""

    def __init__(self, console: Console, workers: Sequence[WorkerLine], clock=time.monotonic):
        super().__init__(console, workers, clock)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[detail]}"), console=console, transient=False,
        )
        self.job_task = self.progress.add_task("[bold]job", total=max(self.total, 1), completed=self.reused,
                                               detail=self._job_detail())
        self.tasks: dict[str, TaskID] = {}
        for name, state in self.workers.items():
            label = f"{name} ({state.line.device})"
            self.tasks[name] = self.progress.add_task(label, total=max(state.line.prompts, 1),
                                                      completed=state.done, detail=state.detail())
        self.progress.start()

    def starting(self) -> None:
        super().starting()
        now = self.clock()
        for name, state in self.workers.items():
            self.progress.update(self.tasks[name], detail=state.detail(now))
        self.progress.update(self.job_task, detail=self._job_detail())

    def _job_detail(self) -> str:
        eta = self.eta_seconds()
        phase = "" if self.computing() else "  starting workers"
        return (f"{self.total} prompts, {self.reused} reused{phase}"
                + (f"  ETA {_duration(eta)}" if eta is not None else ""))

    def render(self, state: _WorkerState, message) -> None:
        now = self.clock()
        self.progress.update(self.tasks[state.line.name], completed=state.position(), detail=state.detail(now))
        self.progress.update(self.job_task, completed=self.position(), detail=self._job_detail())

    def close(self) -> None:
        self.progress.stop()


class LogProgress(JobProgress):
    """Plain lines for logs and pipes: the workers' start, each worker's first computing moment, its
    rounds, and its position every LOG_INTERVAL_S."""

    def __init__(self, console: Console, workers: Sequence[WorkerLine], clock=time.monotonic):
        super().__init__(console, workers, clock)
        self.last_line = {name: float("-inf") for name in self.workers}
        self.announced: set[str] = set()  # workers whose first progress (start-up over) was written

    def starting(self) -> None:
        super().starting()
        running = [w for w in self.workers.values() if w.status == "starting"]
        predicted = max((w.line.predicted_start_seconds for w in running), default=0.0)
        eta = f" (predicted {_duration(predicted)})" if predicted else ""
        self.console.out(f"starting workers: {len(running)} process(es) importing torch and loading the "
                         f"model{eta}", highlight=False)

    def _line(self, state: _WorkerState, text: str) -> None:
        self.last_line[state.line.name] = self.clock()
        # out(): no markup, highlighting or wrapping; a log line stays one line
        self.console.out(f"{state.line.name} ({state.line.device}): {text}", highlight=False)

    def render(self, state: _WorkerState, message) -> None:
        line = state.line
        if isinstance(message, Ready):
            reused = f", {line.reused} reused" if line.reused else ""
            self._line(state, f"started (pid {message.pid}): {line.prompts} prompts{reused}, "
                              f"{line.rounds} round{'s' if line.rounds != 1 else ''}")
        elif isinstance(message, RoundDone):
            self._line(state, f"round {message.round_id + 1}/{line.rounds} committed "
                              f"({state.done}/{line.prompts} prompts){self._job_status()}")
        elif isinstance(message, Finished):
            self._line(state, f"finished in {message.seconds:.1f} s")
        elif isinstance(message, SteppedDown):
            self._line(state, f"out of memory in round {message.round_id + 1}: retrying with {message.change}")
        elif isinstance(message, ProgressMessage):
            first = line.name not in self.announced
            self.announced.add(line.name)
            if first or self.clock() - self.last_line[line.name] >= LOG_INTERVAL_S:
                self._line(state, ("computing: " if first else "") + state.detail(self.clock()) + self._job_status())

    def _job_status(self) -> str:
        eta = self.eta_seconds()
        percent = 100 * self.position() / max(self.total, 1)
        return f"; job {percent:.0f}%" + (f", ETA {_duration(eta)}" if eta is not None else "")


def make_progress(console: Console, workers: Sequence[WorkerLine]) -> JobProgress:
    """Live bars on a terminal, plain lines otherwise (a pipe, a file, CI)."""
    return LiveProgress(console, workers) if console.is_terminal else LogProgress(console, workers)
