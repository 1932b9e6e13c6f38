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

from flexorch.contract.messages import Failed, Finished, Ready, RoundResults, WorkerMessage, WorkerTask
from flexorch.workers.worker import failure_of, redirect_output, run_task


class WorkerActor:
    """`run(task)` starts the worker and returns; `take()` blocks until it has said something.

    A round counts as committed once its part is written, and a local worker writes it before it
    starts the next round; so here the worker waits after sending RoundResults until the controller
    has committed them, which it says by asking for more (the next `take`). A worker killed mid-round
    then loses at most that round, as a local one, and results never pile up in the outbox.
    """

    def __init__(self):
        self._outbox: queue.Queue[WorkerMessage] = queue.Queue()
        self._sent = 0  # messages put in the outbox
        self._returned = 0  # messages handed out by `take` (the actor's thread)
        self._acked = threading.Condition()
        self._acknowledged = 0  # messages the controller has handled: those of every earlier `take`

    def run(self, task: WorkerTask) -> None:
        # As in a local worker: the planner numbers GPUs as NVML does (by PCI bus), not fastest first.
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        try:
            redirect_output(task.log_path)  # job_dir/logs at the same path on this node
        except OSError as exc:  # nobody reads this call's result: the failure goes to the outbox
            self._send(failure_of(task, exc))
            return
        self._send(Ready(task.name, os.getpid()))
        # A thread, so that `take` (the actor's own thread) can answer while the rounds run.
        threading.Thread(target=self._run, args=(task,), name=f"flexorch-{task.name}", daemon=True).start()

    def _run(self, task: WorkerTask) -> None:
        try:
            run_task(task, self._send)
        except BaseException as exc:  # the top of the worker: everything is reported, with its traceback
            traceback.print_exc()  # into the worker's log
            self._send(failure_of(task, exc))

    def _send(self, message: WorkerMessage) -> None:
        with self._acked:  # numbered in the order they enter the outbox
            self._sent += 1
            sequence = self._sent
            self._outbox.put(message)
            if isinstance(message, RoundResults):
                self._acked.wait_for(lambda: self._acknowledged >= sequence)

    def take(self) -> list[WorkerMessage]:
        """Every message waiting, at least one (blocks until there is one). After Finished or Failed
        the worker says nothing more: the controller stops asking."""
        with self._acked:
            self._acknowledged = self._returned
            self._acked.notify_all()
        messages = [self._outbox.get()]
        while not isinstance(messages[-1], (Finished, Failed)):
            try:
                messages.append(self._outbox.get_nowait())
            except queue.Empty:
                break
        self._returned += len(messages)
        return messages
