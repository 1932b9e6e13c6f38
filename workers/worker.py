"""The worker process: runs its rounds of the engine over its slice of prompts and commits each
round's results durably as a part file (flexorch.contract.parts), telling the controller what it
does on a pipe (flexorch.contract.messages).

One process per device. Nothing heavy is built before `Ready`: the controller learns at once that
the process is up and its pipe works, and torch is imported afterwards.

In pipeline mode (`WorkerTask.pipeline`) every stage runs the same rounds over the same prompts,
streaming only its shards (workers/pipeline.py); the stage owning the head writes the parts, the
others report their rounds with no part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from flexorch.contract.choices import on_cpu
from flexorch.contract.errors import ExitCode, UserError
from flexorch.contract.messages import (FAIL_DISK_FULL, FAIL_ERROR, FAIL_USER, Failed, Finished, PipelineLinks,
                                        Progress, Ready, Round, RoundDone, RoundResults, SteppedDown, WorkerHooks,
                                        WorkerMessage, WorkerTask)
from flexorch.contract.parts import DiskFullError, part_name, write_part
from flexorch.contract.checkpoints import round_folder
from flexorch.contract.protocol import EngineSettings, ProgressEvent
from flexorch.workers.stepdown import is_out_of_memory, step_down

# Progress messages are throttled to this interval: enough for a live bar and for the controller's
# hung-worker clock, without flooding the pipe with one message per layer of a small model.
PROGRESS_INTERVAL_S = 0.25


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


def _with_shard_faults(task: WorkerTask) -> WorkerTask:
    """The task with its sigkill_after_shard fault in the engine's after_shard hook (after the
    checkpoint that shard may take), kept beside the task's own engine hooks."""
    if task.hooks.sigkill_after_shard is None:
        return task
    from flexorch.workers.engine import EngineHooks

    own = task.engine_hooks or EngineHooks()
    count = itertools.count(1)

    def after_shard(step: int, shard: int) -> None:
        if own.after_shard:
            own.after_shard(step, shard)
        if next(count) == task.hooks.sigkill_after_shard:
            os.kill(os.getpid(), signal.SIGKILL)

    return dataclasses.replace(task, engine_hooks=EngineHooks(own.before_batch, after_shard))


def configure_device(settings: EngineSettings) -> None:
    """Pin this process to its GPU, or split the CPU between workers sharing it."""
    import torch

    if not on_cpu(settings.device):
        torch.cuda.set_device(torch.device(settings.device))
    elif settings.threads > 0:
        torch.set_num_threads(settings.threads)


def run_task(task: WorkerTask, send: Callable[[WorkerMessage], None]) -> None:
    """Run every round of `task`, committing each as a part, then send Finished.

    Exceptions propagate (worker_main turns them into Failed)."""
    start = time.monotonic()
    configure_device(task.settings)
    # torch and transformers: only once the pipe is known to work
    from flexorch.workers.engine import score_prompts
    from flexorch.workers.pipeline import PipelineStage
    from flexorch.workers.prefetch import ResidentShards

    parts_dir = Path(task.parts_dir)
    if not task.return_results:  # otherwise the controller writes them, on its own machine
        parts_dir.mkdir(parents=True, exist_ok=True)
    forward = _ProgressForwarder(send, task)
    task = _with_shard_faults(task)
    settings = task.settings
    resident = ResidentShards() if settings.resident else None
    with _open_ring(task.pipeline) as ring:
        for rounds_done, rnd in enumerate(task.rounds):
            _inject_faults(task.hooks, rounds_done)
            forward.round_id = rnd.round_id
            if ring is None:
                results, summary, settings = _score_round(task, rnd, settings, forward, send, resident)
            else:  # no step-down: one stage batching differently would desynchronise the pipeline
                stage = PipelineStage(ring.index, ring.count, ring, rnd.round_id)
                results, summary = score_prompts(task.model_dir, rnd.prompts, task.score, settings,
                                                 on_progress=forward, hooks=task.engine_hooks, link=stage)
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
    from flexorch.workers.pipeline import Ring

    return Ring(links.index, links.count, links.inbound, links.outbound)


def _score_round(task: WorkerTask, rnd: Round, settings: EngineSettings, forward, send, resident=None):
    """Data mode: the round's (results, summary, settings), stepping down after out-of-memory errors.
    `resident`: the worker's ResidentShards (settings.resident), kept across its rounds."""
    from flexorch.workers.engine import score_prompts

    while True:
        try:
            results, summary = score_prompts(task.model_dir, rnd.prompts, task.score, settings,
                                             on_progress=forward, hooks=task.engine_hooks,
                                             resident=resident if settings.resident else None)
            return results, summary, settings
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if resident is not None:
                resident.tensors.clear()  # a retry re-reads them (or streams, after stepping down from resident)
            settings = _smaller_settings(task, rnd, settings, exc, send)


def _commit(task: WorkerTask, rnd: Round, rounds_done: int, results, summary, parts_dir: Path, send) -> None:
    """Write the round's part and tell the controller (or, with `return_results`, send the results
    for the controller to write)."""
    got = tuple(r.index for r in results)
    if got != rnd.indices:
        raise RuntimeError(f"engine returned prompts {got[:8]} for round {rnd.round_id}, "
                           f"expected {rnd.indices[:8]}")
    if task.return_results:
        send(RoundResults(task.name, rnd.round_id, rnd.indices, tuple(results), summary))
        return
    path = parts_dir / part_name(task.name, rnd)
    if task.hooks.disk_full_after_rounds == rounds_done:
        raise DiskFullError(errno.ENOSPC, f"disk full while writing results to {path} (injected)")
    write_part(path, task.score.kind, results)
    remove_round(task.settings, rnd.indices)  # committed: its checkpoints have served
    send(RoundDone(task.name, rnd.round_id, rnd.indices, str(path), summary))


def remove_round(settings: EngineSettings, indices: tuple[int, ...]) -> None:
    """A committed round's checkpoints (workers/checkpoint.py): no longer needed."""
    if settings.checkpoint_dir:
        shutil.rmtree(round_folder(settings.checkpoint_dir, indices), ignore_errors=True)


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
            f"layers_per_shard {settings.layers_per_shard}, storage {settings.storage}, one shard slot): {error}"
        ) from exc
    del exc  # its traceback holds the failed attempt's tensors
    gc.collect()
    if not on_cpu(settings.device):
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
        os._exit(ExitCode.ORPHANED)  # parts are committed atomically, so stopping mid-write loses nothing

    threading.Thread(target=watch, name="death-pipe", daemon=True).start()


def redirect_output(log_path: str | None) -> None:
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
    redirect_output(task.log_path)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} worker {task.name} pid {os.getpid()} on {task.settings.device}: "
          f"{len(task.rounds)} rounds, {task.n_prompts} prompts", flush=True)
    conn.send(Ready(task.name, os.getpid()))
    try:
        run_task(task, conn.send)
    except BaseException as exc:  # the top of a process: everything is reported, with its traceback
        traceback.print_exc()  # into the worker's log
        conn.send(failure_of(task, exc))
        conn.close()
        sys.exit(ExitCode.FAILED)
    conn.close()
