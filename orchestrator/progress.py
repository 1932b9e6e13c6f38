"""What a running job shows: live rich bars on a terminal, plain log lines otherwise.

Both consume the executor's messages. A worker's position is counted in prompts: those committed
(reused from an earlier run included) plus the fraction of the current round's passes done, where
a round streams the model once per generation step (`stages` shards per pass).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

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


@dataclass
class _WorkerState:
    line: WorkerLine
    done: int  # prompts committed, reused included
    round_prompts: int = 0
    event: ProgressEvent | None = None
    status: str = "waiting"  # waiting | running | done | reused (nothing left to compute)

    def pass_fraction(self) -> float:
        """Fraction of the current round's work done: shards over all passes (one per step)."""
        e = self.event
        if e is None or e.stages == 0:
            return 0.0
        return ((e.step - 1) * e.stages + e.stage) / (e.steps * e.stages)

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

    def detail(self) -> str:
        e = self.event
        if e is None:  # between rounds, before the first, or done
            return f"{self.status}  prompts {self.done}/{self.line.prompts}"
        return (f"shard {e.stage}/{e.stages} step {e.step}/{e.steps}  prompts {self.done}/{self.line.prompts}  "
                f"{_si(self.tokens_per_second())} tok/s")


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
        """From this run's pace (reused prompts cost nothing, so they do not count as pace)."""
        done_now = self.position() - self.reused
        left = self.total - self.position()
        elapsed = self.clock() - self.started
        return None if done_now <= 0 else elapsed * left / done_now

    def handle(self, message) -> None:
        state = self.workers.get(getattr(message, "worker", None))
        if state is None:
            return
        if isinstance(message, Ready):
            state.status = "running"
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
            TimeRemainingColumn(), TextColumn("{task.fields[detail]}"), console=console, transient=False,
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
        self.progress.update(self.tasks[state.line.name], completed=state.position(), detail=state.detail())
        self.progress.update(self.job_task, completed=self.position())

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
                self._line(state, state.detail() + self._job_status())

    def _job_status(self) -> str:
        eta = self.eta_seconds()
        percent = 100 * self.position() / max(self.total, 1)
        return f"; job {percent:.0f}%" + (f", ETA {_duration(eta)}" if eta is not None else "")


def make_progress(console: Console, workers: Sequence[WorkerLine]) -> JobProgress:
    """Live bars on a terminal, plain lines otherwise (a pipe, a file, CI)."""
    return LiveProgress(console, workers) if console.is_terminal else LogProgress(console, workers)
