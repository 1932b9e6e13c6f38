"""A worker as a Ray actor (executor: ray): the same `run_task` as a local worker process, with its
messages kept in an outbox the controller drains instead of sent on a pipe.

Ray-free on purpose: the Ray executor (orchestrator/rayexecutor.py) wraps this class with
`ray.remote`, so nothing here imports ray and the worker code is one for both executors. The task
comes with `return_results` set: this worker's machine may not see the controller's job_dir, so each
round's results travel back in `RoundResults` and the controller writes the part.
"""

from __future__ import annotations

import os
import queue
import threading
import traceback

from flexorch.contract.messages import Failed, Finished, Ready, WorkerMessage, WorkerTask
from flexorch.workers.worker import failure_of, redirect_output, run_task


class WorkerActor:
    """`run(task)` starts the worker and returns; `take()` blocks until it has said something."""

    def __init__(self):
        self._outbox: queue.Queue[WorkerMessage] = queue.Queue()

    def run(self, task: WorkerTask) -> None:
        # As in a local worker: the planner numbers GPUs as NVML does (by PCI bus), not fastest first.
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        redirect_output(task.log_path)
        self._outbox.put(Ready(task.name, os.getpid()))
        # A thread, so that `take` (the actor's own thread) can answer while the rounds run.
        threading.Thread(target=self._run, args=(task,), name=f"flexorch-{task.name}", daemon=True).start()

    def _run(self, task: WorkerTask) -> None:
        try:
            run_task(task, self._outbox.put)
        except BaseException as exc:  # the top of the worker: everything is reported, with its traceback
            traceback.print_exc()  # into the worker's log
            self._outbox.put(failure_of(task, exc))

    def take(self) -> list[WorkerMessage]:
        """Every message waiting, at least one (blocks until there is one). After Finished or Failed
        the worker says nothing more: the controller stops asking."""
        messages = [self._outbox.get()]
        while not isinstance(messages[-1], (Finished, Failed)):
            try:
                messages.append(self._outbox.get_nowait())
            except queue.Empty:
                break
        return messages
