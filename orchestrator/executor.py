"""Where workers run: a narrow interface (start, messages, stop) and its local implementation.

The controller never touches a device: it hands each worker a `WorkerTask` and reads the messages
workers send (`workers.worker`), plus two the executor itself makes up when a worker cannot speak
for itself: `Died` (its process ended without finishing) and `Hung` (it said nothing for longer
than `worker_timeout`).

`LocalProcessExecutor` runs one spawned process per task on this machine. `RayExecutor`
(orchestrator/rayexecutor.py, executor: ray) runs one Ray actor per task and implements the same
methods: `start` creates the actors, `messages` turns their replies and their deaths (`ray.wait` on
the actors' object refs) into the same message stream, `stop` kills them. The controller does not
change.
"""

from __future__ import annotations

import abc
import contextlib
import multiprocessing
import pickle
import shutil
import signal
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path

from flexorch.contract.atomic import atomic_write_bytes
from flexorch.contract.leftovers import TASKS, remove_dead

from flexorch.contract.messages import Failed, Finished, Progress, RoundDone, WorkerMessage, WorkerTask
from flexorch.workers.worker import worker_main

# How long stop() lets workers exit after closing their death pipes, then after SIGTERM, before SIGKILL.
STOP_GRACE_S = 5.0
TERMINATE_GRACE_S = 2.0
# worker_timeout measures silence while computing. Until its first progress a worker is starting
# (interpreter, torch import, CUDA context, first shard), which can take longer than a worker_timeout
# chosen for progress: start-up gets at least this many times the plan's predicted start-up (measured
# by calibration; a loaded machine starts slower). Not a fixed grace: at 300 s a worker hung while
# starting went unnoticed for minutes under worker_timeout: 20.
STARTUP_FACTOR = 2.0


@dataclass(frozen=True)
class Died:
    """A worker's process ended before it sent Finished (and without a Failed message)."""

    worker: str
    exitcode: int | None
    cause: str = ""  # where no exit code tells it (a Ray actor's death): what is known, one line

    def describe(self) -> str:
        if self.cause:
            return self.cause
        if self.exitcode is not None and self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            hint = " (the kernel's out-of-memory killer sends SIGKILL: check `dmesg`)" if name == "SIGKILL" else ""
            return f"process was killed by {name}{hint}"
        return f"process exited with status {self.exitcode} before finishing"


@dataclass(frozen=True)
class Hung:
    """A worker sent nothing for `seconds` (the job's worker_timeout)."""

    worker: str
    seconds: float
    starting: bool = False  # silent since it started: the start-up allowance ran out

    def describe(self) -> str:
        if self.starting:
            return (f"did not start computing within {self.seconds:g} s (interpreter, torch, device set-up); stopped "
                    "(raise worker_timeout if workers start slower on this machine)")
        return f"made no progress for {self.seconds:g} s (worker_timeout); stopped"


ExecutorMessage = WorkerMessage | Died | Hung
FAILURES = (Failed, Died, Hung)


class Executor(abc.ABC):
    """Runs WorkerTasks and reports, as one stream of messages, what their workers say.

    The hung-worker clock lives here, the same for every executor: `worker_timeout`, seconds of
    silence after which a worker counts as hung (None: never); `start_seconds`, the plan's predicted
    start-up, for the allowance before a worker's first progress. A worker's handle carries
    `task`, `last_heard`, `computing` and `done`; `_kill` stops one that stopped listening."""

    def __init__(self, worker_timeout: float | None, start_seconds: float, clock: Callable[[], float]):
        self.worker_timeout = worker_timeout
        self.start_seconds = start_seconds
        self.clock = clock

    @abc.abstractmethod
    def start(self, tasks: Sequence[WorkerTask]) -> None:
        """Start one worker per task. Raises (having stopped what it started) if one cannot start."""

    @abc.abstractmethod
    def messages(self) -> Iterator[ExecutorMessage]:
        """Messages as they arrive, until every worker has sent Finished. A worker that dies or
        hangs shows up as Died / Hung; after a failure the caller is expected to stop()."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop every worker still running. Idempotent; safe from a finally block."""

    @abc.abstractmethod
    def pid(self, worker: str) -> int | None:
        """The worker's process id, where there is one."""

    def channel(self, capacity: int):
        """A bounded queue its workers can share (put blocks while `capacity` items wait), to be
        placed in tasks before `start`: pipeline stages hand activations on through these."""
        raise NotImplementedError(f"{type(self).__name__} cannot link workers")

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the hung-worker clock --------------------------------------------------------------------
    def _time_left(self, waiting: Sequence) -> float | None:
        """Seconds until the earliest hung-worker deadline (None: wait for ever)."""
        if self.worker_timeout is None:
            return None
        deadline = min(h.last_heard + self._allowed_silence(h) for h in waiting)
        return max(0.0, deadline - self.clock())

    def _allowed_silence(self, handle) -> float:
        if handle.computing:
            return self.worker_timeout
        return max(self.worker_timeout, STARTUP_FACTOR * self.start_seconds)

    def _hung(self, waiting: Sequence) -> Iterator[Hung]:
        now = self.clock()
        for handle in waiting:
            silence = self._allowed_silence(handle)
            if now - handle.last_heard >= silence:
                handle.done = True
                self._kill(handle)  # it is not listening; the other workers are the caller's call
                yield Hung(handle.task.name, silence, starting=not handle.computing)

    def _heard(self, handle, message: WorkerMessage) -> None:
        """The clock restarts at each message; progress ends start-up, Finished or Failed the worker."""
        handle.last_heard = self.clock()
        if isinstance(message, (Progress, RoundDone)):
            handle.computing = True
        if isinstance(message, (Finished, Failed)):
            handle.done = True

    def _kill(self, handle) -> None:
        """Stop one hung worker at once."""
        raise NotImplementedError


@dataclass
class _Handle:
    """Parent-side state of one worker process."""

    task: WorkerTask
    process: multiprocessing.process.BaseProcess
    conn: Connection | None  # messages from the worker; None once it reached EOF
    death: Connection  # the parent's end of the death pipe: closing it stops the worker
    last_heard: float  # time.monotonic() of its last message (or of its start)
    computing: bool = False  # has sent progress: worker_timeout applies from now on
    done: bool = False  # sent Finished or a failure has been reported: its sentinel means nothing more


def run_from_file(target: Callable, task_file: str, pipeline, conn: Connection, death_conn: Connection) -> None:
    """The spawned process's entry: the task from `task_file` (written by the executor), then
    `target(task, conn, death_conn)`."""
    with open(task_file, "rb") as f:
        task = pickle.load(f)  # noqa: S301 - written by our own controller a moment ago
    target(replace(task, pipeline=pipeline), conn, death_conn)


def _stop_processes(handles: list[_Handle], task_dir: Path) -> None:
    """Close death pipes → bounded wait → terminate → bounded wait → kill, then remove the task
    files. Module-level (not a method) so weakref.finalize holds no reference to the executor."""
    for handle in handles:
        handle.death.close()  # the worker's watcher thread sees EOF and exits at once
    _join_all(handles, STOP_GRACE_S)
    for handle in handles:
        if handle.process.is_alive():
            handle.process.terminate()
    _join_all(handles, TERMINATE_GRACE_S)
    for handle in handles:
        if handle.process.is_alive():
            handle.process.kill()
        handle.process.join()
        if handle.conn is not None:
            handle.conn.close()
            handle.conn = None
    shutil.rmtree(task_dir, ignore_errors=True)


def _join_all(handles: list[_Handle], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for handle in handles:
        handle.process.join(max(0.0, deadline - time.monotonic()))


class LocalProcessExecutor(Executor):
    """One `spawn`ed process per task on this machine (spawn: CUDA cannot survive fork, and a fresh
    interpreter inherits no locks or threads from the controller).

    `worker_timeout`, `start_seconds`: the hung-worker clock (Executor).
    `target`: the process entry point `target(task, conn, death_conn)`; tests pass stand-ins.
    """

    def __init__(self, worker_timeout: float | None = None, target: Callable = worker_main,
                 clock: Callable[[], float] = time.monotonic, start_seconds: float = 0.0):
        super().__init__(worker_timeout, start_seconds, clock)
        self.target = target
        self._context = multiprocessing.get_context("spawn")
        self._handles: dict[str, _Handle] = {}
        self._finalizer: weakref.finalize | None = None

    def start(self, tasks: Sequence[WorkerTask]) -> None:
        handles: list[_Handle] = []
        remove_dead(tempfile.gettempdir(), TASKS)  # task dirs of controllers that were killed
        self._task_dir = Path(tempfile.mkdtemp(prefix=TASKS.prefix()))
        self._finalizer = weakref.finalize(self, _stop_processes, handles, self._task_dir)
        try:
            for task in tasks:
                handles.append(self._start_one(task))
                self._handles[task.name] = handles[-1]
        except BaseException:
            self.stop()
            raise

    def _start_one(self, task: WorkerTask) -> _Handle:
        receive, send = self._context.Pipe(duplex=False)
        death_child, death_parent = self._context.Pipe(duplex=False)
        # spawn writes the process's arguments into a pipe while the parent still holds its read end:
        # a child killed before reading them (the OOM killer at start-up) would leave that write
        # blocked for ever once they pass the pipe buffer (64 KiB, ~1,500 prompts). So the task goes
        # in a file the worker reads; only its path and the pipeline's queues travel in the pipe.
        task_file = self._task_dir / f"{task.name}.pkl"
        atomic_write_bytes(task_file, pickle.dumps(replace(task, pipeline=None), protocol=pickle.HIGHEST_PROTOCOL))
        process = self._context.Process(target=run_from_file,
                                        args=(self.target, str(task_file), task.pipeline, send, death_child),
                                        name=f"flexorch-{task.name}", daemon=True)
        with _callers_script_hidden():
            process.start()
        # The child holds its own copies now; closing ours means EOF arrives when the child exits.
        send.close()
        death_child.close()
        return _Handle(task, process, receive, death_parent, last_heard=self.clock())

    def pid(self, worker: str) -> int | None:
        handle = self._handles.get(worker)
        return handle.process.pid if handle else None

    def channel(self, capacity: int):
        # From the spawn context, like the processes: it travels to them inside their tasks at spawn.
        # A worker blocked on it is still stopped by stop(): the death pipe's thread exits the
        # process whatever the main thread waits on, and terminate/kill follow if it does not.
        return self._context.Queue(maxsize=capacity)

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs _stop_processes once; later calls do nothing

    # -- the message stream ---------------------------------------------------------------------
    def messages(self) -> Iterator[ExecutorMessage]:
        while any(not h.done for h in self._handles.values()):
            waiting = [h for h in self._handles.values() if not h.done]
            objects = [h.conn for h in waiting if h.conn is not None] + [h.process.sentinel for h in waiting]
            ready = wait(objects, timeout=self._time_left(waiting))
            if not ready:
                yield from self._hung(waiting)
                continue
            # Messages first: a worker that reported Failed and exited fires both, and its own
            # words beat "died".
            for handle in waiting:
                if handle.conn is not None and handle.conn in ready:
                    yield from self._receive(handle, drain=False)
            for handle in waiting:
                if not handle.done and handle.process.sentinel in ready:
                    yield from self._receive(handle, drain=True)
                    if not handle.done:
                        handle.done = True
                        handle.process.join()
                        yield Died(handle.task.name, handle.process.exitcode)

    def _kill(self, handle: _Handle) -> None:
        handle.process.kill()

    def _receive(self, handle: _Handle, drain: bool) -> Iterator[WorkerMessage]:
        """One message from `handle` (or, with `drain`, every message it left before exiting)."""
        while handle.conn is not None and handle.conn.poll():
            try:
                message = handle.conn.recv()
            except (EOFError, OSError):
                handle.conn.close()
                handle.conn = None
                return
            self._heard(handle, message)
            yield message
            if not drain or handle.done:
                return


@contextlib.contextmanager
def _callers_script_hidden() -> Iterator[None]:
    """Keep spawn from re-running the caller's script in the worker: a worker needs nothing from it
    (its entry point and task come from flexorch), a script calling flexorch.score() without an
    `if __name__ == "__main__":` guard would start the job again there, and a script read from
    stdin cannot be found at all. spawn re-imports __main__ from its __spec__ or __file__."""
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__spec__", "__file__") if hasattr(main, name)}
    try:
        if main is not None:
            main.__spec__ = None
            if "__file__" in saved:
                del main.__file__
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)
