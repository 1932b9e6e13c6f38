"""The Ray executor (executor: ray): one actor per worker on the node the plan chose, reporting as
the same message stream as LocalProcessExecutor.

Each actor runs the worker code of a local process (workers/actor.py around workers.worker.run_task).
The controller long-polls every actor (`take` blocks in the actor until it has messages) and waits
on all those calls at once with `ray.wait`, so a message, an actor's death and a silence longer than
worker_timeout (ray.wait's timeout) each wake it at once, with no polling: when an actor dies (its
node lost, `ray.kill`, the OOM killer) its pending call fails with a RayActorError, which becomes
`Died` naming the node. Results come back in `RoundResults` and are committed here as the parts a
local worker writes, in the controller's job_dir, so resume works as on one machine.

Only the ray path imports this module (it imports ray).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flexorch.contract.choices import on_cpu
from flexorch.contract.messages import (Failed, Ready, RoundDone, RoundResults, WorkerMessage,
                                        WorkerTask)
from flexorch.contract.parts import part_name, write_part
from flexorch.orchestrator.executor import Died, ExecutorMessage, Executor
from flexorch.orchestrator.hardware import Node
from flexorch.orchestrator.raycluster import RUNTIME_ENV
from flexorch.workers.actor import WorkerActor
from flexorch.workers.worker import failure_of


_RemoteWorker = ray.remote(WorkerActor)  # the class is shipped to the cluster once, not per actor


@dataclass
class _Actor:
    """Controller-side state of one worker's actor."""

    task: WorkerTask
    node: Node
    actor: object  # the ray ActorHandle
    pending: object  # the ObjectRef of its outstanding `take` call
    last_heard: float
    pid: int | None = None
    computing: bool = False  # has sent progress: worker_timeout applies from now on
    done: bool = False  # sent Finished, or a failure was reported


def _kill_all(actors: list[_Actor]) -> None:
    """Module-level (not a method) so weakref.finalize holds no reference to the executor."""
    for handle in actors:
        ray.kill(handle.actor, no_restart=True)


class RayExecutor(Executor):
    """`placement`: each worker's node (WorkerPlan.node resolved to the probed Node);
    `worker_timeout`, `start_seconds`: the hung-worker clock (Executor). Start-up on a cluster also
    includes Ray placing the actor and starting its process: the plan's start-up allowance covers it."""

    def __init__(self, placement: Mapping[str, Node], worker_timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic, start_seconds: float = 0.0):
        super().__init__(worker_timeout, start_seconds, clock)
        self.placement = placement
        self._actors: dict[str, _Actor] = {}
        self._finalizer: weakref.finalize | None = None

    def start(self, tasks: Sequence[WorkerTask]) -> None:
        actors: list[_Actor] = []
        self._finalizer = weakref.finalize(self, _kill_all, actors)
        try:
            for task in tasks:
                actors.append(self._start_one(task))
                self._actors[task.name] = actors[-1]
        except BaseException:
            self.stop()
            raise

    def _start_one(self, task: WorkerTask) -> _Actor:
        node = self.placement[task.name]
        # A GPU worker holds its GPU (Ray counts it; the plan chose which); a CPU worker its threads.
        gpu = not on_cpu(task.settings.device)
        options = dict(num_gpus=1, num_cpus=0) if gpu else dict(num_cpus=max(1, task.settings.threads))
        # max_restarts 0: a restarted actor would come back without its task; a death is reported instead.
        actor = _RemoteWorker.options(
            max_restarts=0, runtime_env=RUNTIME_ENV, **options,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        ).remote()
        actor.run.remote(task)
        return _Actor(task, node, actor, actor.take.remote(), last_heard=self.clock())

    def pid(self, worker: str) -> int | None:
        handle = self._actors.get(worker)
        return handle.pid if handle else None  # known once its Ready arrives

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # kills every actor once; later calls do nothing

    # -- the message stream ---------------------------------------------------------------------
    def messages(self) -> Iterator[ExecutorMessage]:
        while waiting := [h for h in self._actors.values() if not h.done]:
            by_ref = {h.pending: h for h in waiting}
            ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=self._time_left(waiting))
            if not ready:
                yield from self._hung(waiting)
                continue
            handle = by_ref[ready[0]]
            try:
                batch = ray.get(ready[0])
            except RayError as exc:
                handle.done = True
                yield Died(handle.task.name, None, cause=_death_cause(handle, exc))
                continue
            for message in batch:
                yield self._receive(handle, message)
            if not handle.done:  # asking again also tells the worker its RoundResults are committed
                handle.pending = handle.actor.take.remote()

    def _receive(self, handle: _Actor, message: WorkerMessage) -> ExecutorMessage:
        if isinstance(message, RoundResults):
            message = self._commit(handle.task, message)
        if isinstance(message, Ready):
            handle.pid = message.pid
        self._heard(handle, message)
        return message

    @staticmethod
    def _commit(task: WorkerTask, message: RoundResults) -> RoundDone | Failed:
        """Write the round's part here, where the job_dir is, as a local worker would have."""
        rnd = next(r for r in task.rounds if r.round_id == message.round_id)
        path = Path(task.parts_dir) / part_name(task.name, rnd)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_part(path, task.score.kind, message.results)
        except OSError as exc:  # a full disk: reported as the worker's, as when it writes the part itself
            return failure_of(task, exc)
        return RoundDone(task.name, message.round_id, message.indices, str(path), message.summary)

    def _kill(self, handle: _Actor) -> None:
        ray.kill(handle.actor, no_restart=True)


def _death_cause(handle: _Actor, exc: RayError) -> str:
    """One line: where the actor died and Ray's first word on why (its full text is long)."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return (f"its Ray actor died on {handle.node.name} ({handle.node.address}): {first} "
            f"(a SIGKILL from the out-of-memory killer, `ray.kill` or a lost node look alike: check "
            f"`ray logs` and `dmesg` on {handle.node.address})")
