"""What a running job shows: live rich bars on a terminal, plain log lines otherwise.

Both consume the executor's messages. A worker's position is counted in prompts: those committed
(reused from an earlier run included) plus the fraction of the current round's passes done, where
a round streams the model once per generation step (`stages` shards per pass), and the engine
reports each batch within a shard too (a shard of a big model over many batches takes minutes).
Shards weigh what the planner predicts they cost (WorkerPlan.predicted_pass_shares: the embedding is a lookup, the
decoder shards carry the FLOPs), so the bar does not jump to a third after the embedding.

ETAs: a worker's blends the planner's prediction with its own pace since it started, weighted by the
share done, so it starts at the prediction and converges on the pace instead of leaping after the
first shard; the job's is its slowest worker's, since workers run side by side.
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


@dataclass(frozen=True)
class WorkerLine:
    """What the display knows of a worker before it starts."""

    name: str
    device: str
    prompts: int  # in its slice, reused ones included
    reused: int  # of those, committed by an earlier run
    rounds: int  # planned rounds
    predicted_seconds: float = 0.0  # the planner's time for the whole slice (start-up included)
    pass_shares: tuple[float, ...] = ()  # each shard's share of a pass's predicted time; () = equal


@dataclass
class _WorkerState:
    line: WorkerLine
    done: int  # prompts committed, reused included
    round_prompts: int = 0
    event: ProgressEvent | None = None
    status: str = "waiting"  # waiting | running | done | reused (nothing left to compute)
    started: float | None = None  # clock at Ready

    def pass_fraction(self) -> float:
        """Fraction of the current round's work done: passes done (one per step), plus the predicted
        share of the shards done in the current one."""
        e = self.event
        if e is None or e.stages == 0:
            return 0.0
        shares = self.line.pass_shares if len(self.line.pass_shares) == e.stages else (1 / e.stages,) * e.stages
        in_pass = sum(shares[:e.stage])
        if e.batches and e.stage < e.stages:  # within the shard computing now
            in_pass += shares[e.stage] * e.batch / e.batches
        return (e.step - 1 + in_pass) / e.steps

    def eta_seconds(self, now: float) -> float | None:
        """Seconds left: the planner's total for this run and the one its pace so far implies, weighted
        by the share done (so the estimate starts at the prediction and converges on the pace)."""
        todo = self.line.prompts - self.line.reused
        left = self.line.prompts - self.position()
        if left <= 0 or self.status == "done":
            return 0.0
        done = (self.position() - self.line.reused) / todo if todo else 1.0
        elapsed = now - self.started if self.started is not None else 0.0
        predicted = self.line.predicted_seconds or None
        if done <= 0 or self.started is None:
            return predicted * left / todo if predicted else None
        total = (1 - done) * (predicted if predicted else elapsed / done) + done * (elapsed / done)
        return max(total - elapsed, 0.0)

    def position(self) -> float:
        """Prompts done, counting the current round in part."""
        return min(self.line.prompts, self.done + self.round_prompts * self.pass_fraction())

    def tokens_per_second(self) -> float:
        """Tokens through the whole model per second in the current round."""
        e = self.event
        if e is None or e.seconds <= 0:
            return 0.0
        shards_done = (e.step - 1) * e.stages + e.stage
        return e.tokens_done * shards_done / e.stages / e.seconds

    def detail(self, now: float | None = None) -> str:
        e = self.event
        eta = self.eta_seconds(now) if now is not None else None
        left = f"  ETA {_duration(eta)}" if eta is not None and self.status != "done" else ""
        if e is None:  # between rounds, before the first, or done
            return f"{self.status}  prompts {self.done}/{self.line.prompts}{left}"
        within = f" batch {e.batch}/{e.batches}" if e.batches else ""
        rate = f"  {_si(self.tokens_per_second())} tok/s" if e.tokens_done else ""
        return (f"shard {e.stage}/{e.stages}{within} step {e.step}/{e.steps}  prompts {self.done}/{self.line.prompts}"
                f"{rate}{left}")


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class JobProgress:
    """Tracks every worker from the executor's messages; subclasses render. A context manager."""

    def __init__(self, console: Console, workers: Sequence[WorkerLine], clock: Callable[[], float] = time.monotonic):
        self.console = console
        self.clock = clock
        self.started = clock()
        self.workers = {w.name: _WorkerState(w, done=w.reused, status="waiting" if w.reused < w.prompts else "reused")
                        for w in workers}
        self.total = sum(w.prompts for w in workers)
        self.reused = sum(w.reused for w in workers)

    def __enter__(self) -> "JobProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def position(self) -> float:
        return sum(w.position() for w in self.workers.values())

    def eta_seconds(self) -> float | None:
        """The slowest worker's: they run side by side (reused prompts cost nothing)."""
        etas = [w.eta_seconds(self.clock()) for w in self.workers.values()]
        return None if any(eta is None for eta in etas) else max(etas, default=0.0)

    def handle(self, message) -> None:
        state = self.workers.get(getattr(message, "worker", None))
        if state is None:
            return
        if isinstance(message, Ready):
            state.status, state.started = "running", self.clock()
        elif isinstance(message, ProgressMessage):
            state.event = message.event
            state.round_prompts = message.event.prompts
        elif isinstance(message, RoundDone):
            state.done += len(message.indices)
            state.event, state.round_prompts = None, 0
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
                                               detail=f"{self.total} prompts, {self.reused} reused")
        self.tasks: dict[str, TaskID] = {}
        for name, state in self.workers.items():
            label = f"{name} ({state.line.device})"
            self.tasks[name] = self.progress.add_task(label, total=max(state.line.prompts, 1),
                                                      completed=state.done, detail=state.detail())
        self.progress.start()

    def render(self, state: _WorkerState, message) -> None:
        now = self.clock()
        self.progress.update(self.tasks[state.line.name], completed=state.position(), detail=state.detail(now))
        eta = self.eta_seconds()
        self.progress.update(self.job_task, completed=self.position(),
                             detail=f"{self.total} prompts, {self.reused} reused"
                                    + (f"  ETA {_duration(eta)}" if eta is not None else ""))

    def close(self) -> None:
        self.progress.stop()


class LogProgress(JobProgress):
    """Plain lines for logs and pipes: a worker's start, its rounds, and its position every
    LOG_INTERVAL_S."""

    def __init__(self, console: Console, workers: Sequence[WorkerLine], clock=time.monotonic):
        super().__init__(console, workers, clock)
        self.last_line = {name: float("-inf") for name in self.workers}

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
            if self.clock() - self.last_line[line.name] >= LOG_INTERVAL_S:
                self._line(state, state.detail(self.clock()) + self._job_status())

    def _job_status(self) -> str:
        eta = self.eta_seconds()
        percent = 100 * self.position() / max(self.total, 1)
        return f"; job {percent:.0f}%" + (f", ETA {_duration(eta)}" if eta is not None else "")


def make_progress(console: Console, workers: Sequence[WorkerLine]) -> JobProgress:
    """Live bars on a terminal, plain lines otherwise (a pipe, a file, CI)."""
    return LiveProgress(console, workers) if console.is_terminal else LogProgress(console, workers)
