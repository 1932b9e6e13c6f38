"""LocalProcessExecutor with stand-in worker entry points (module-level, so spawn can import them):
messages arrive in order, a death is noticed from the sentinel (with the signal named), a silent
worker is reported hung after worker_timeout, the death pipe stops a worker, and stop() leaves no
process behind. Then the worker's own loop (workers.worker.run_task) in this process: a part per
round, and a full disk reported clearly with earlier parts intact."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

import pytest

from flexorch.contract.errors import ExitCode
from flexorch.orchestrator import executor as executor_module
from flexorch.orchestrator.executor import Died, Hung, LocalProcessExecutor
from flexorch.contract.protocol import EngineSettings, EngineSummary, ProgressEvent, ScoreSpec
from flexorch.contract.errors import UserError
from flexorch.contract.messages import (FAIL_DISK_FULL, FAIL_ERROR, FAIL_USER, Failed, Finished, Progress, Ready,
                                        Round, RoundDone, WorkerHooks, WorkerTask)
from flexorch.contract.parts import DiskFullError, read_part_indices
from flexorch.workers.worker import _exit_when_closed, failure_of, run_task

SUMMARY = EngineSummary(seconds=0.1, load_seconds=0.0, read_seconds=0.0, compute_seconds=0.1, bytes_read=10,
                        peak_rss=1, peak_device_memory=0)
EVENT = ProgressEvent(stage=1, stages=2, step=1, steps=1, prompts_done=0, prompts=1, tokens_done=5,
                      bytes_read=10, seconds=0.1)


def _task(name: str) -> WorkerTask:
    settings = EngineSettings(device="cpu", dtype="float32", layers_per_shard=1, storage="cpu", batch_tokens=64)
    return WorkerTask(name=name, model_dir="unused", settings=settings, score=ScoreSpec(), rounds=(),
                      parts_dir="unused")


# -- stand-in workers ---------------------------------------------------------------------------------
def finishes(task, conn, death_conn):
    conn.send(Ready(task.name, os.getpid()))
    conn.send(Progress(task.name, 0, EVENT))
    conn.send(RoundDone(task.name, 0, (0,), "part.npz", SUMMARY))
    conn.send(Finished(task.name, 0.1))


def sigkills_itself(task, conn, death_conn):
    conn.send(Ready(task.name, os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def fails(task, conn, death_conn):
    conn.send(Ready(task.name, os.getpid()))
    conn.send(Failed(task.name, "ValueError: boom", "Traceback ..."))
    sys.exit(1)


def exits_silently(task, conn, death_conn):
    conn.send(Ready(task.name, os.getpid()))


def waits_for_death_pipe(task, conn, death_conn):
    _exit_when_closed(death_conn)
    conn.send(Ready(task.name, os.getpid()))
    time.sleep(60)  # stands in for a long computation; the death pipe ends it


def hangs_after_progress(task, conn, death_conn):
    _exit_when_closed(death_conn)
    conn.send(Ready(task.name, os.getpid()))
    conn.send(Progress(task.name, 0, EVENT))
    time.sleep(60)


def ignores_everything(task, conn, death_conn):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn.send(Ready(task.name, os.getpid()))
    time.sleep(60)


def by_name(task, conn, death_conn):
    """w-ok finishes; w-slow stays alive until stopped."""
    if task.name == "w-ok":
        finishes(task, conn, death_conn)
    else:
        waits_for_death_pipe(task, conn, death_conn)


# -- tests -----------------------------------------------------------------------------------------------
def _run(target, names, worker_timeout=None, stop_after_failure=True, start_seconds=0.0):
    ex = LocalProcessExecutor(worker_timeout=worker_timeout, target=target, start_seconds=start_seconds)
    messages = []
    with ex:
        ex.start([_task(n) for n in names])
        pids = {n: ex.pid(n) for n in names}
        for message in ex.messages():
            messages.append(message)
            if stop_after_failure and isinstance(message, (Failed, Died, Hung)):
                break
    return messages, pids, ex


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); a reaped child does not, and the executor joins its children
    return True


def test_messages_arrive_in_order_and_stream_ends_when_all_finish():
    messages, pids, _ = _run(finishes, ["w0", "w1"])
    for name in ("w0", "w1"):
        kinds = [type(m).__name__ for m in messages if m.worker == name]
        assert kinds == ["Ready", "Progress", "RoundDone", "Finished"]
        assert messages[[m.worker for m in messages].index(name)].pid == pids[name]


def test_sigkilled_worker_is_reported_dead_with_the_signal_named():
    start = time.monotonic()
    messages, pids, _ = _run(sigkills_itself, ["w0"])
    assert time.monotonic() - start < 10
    died = messages[-1]
    assert isinstance(died, Died) and died.worker == "w0" and died.exitcode == -signal.SIGKILL
    assert "SIGKILL" in died.describe() and "out-of-memory" in died.describe()
    assert not _alive(pids["w0"])


def test_failed_message_beats_the_sentinel():
    messages, _, _ = _run(fails, ["w0"], stop_after_failure=False)
    assert [type(m).__name__ for m in messages] == ["Ready", "Failed"]
    assert messages[-1].error == "ValueError: boom"


def test_exit_without_finishing_is_a_death():
    messages, _, _ = _run(exits_silently, ["w0"])
    assert isinstance(messages[-1], Died) and messages[-1].exitcode == 0
    assert "status 0" in messages[-1].describe()


def test_leaving_the_executor_stops_workers_still_running():
    ex = LocalProcessExecutor(target=by_name)
    with ex:
        ex.start([_task("w-ok"), _task("w-slow")])
        for message in ex.messages():
            if isinstance(message, Finished):
                break
        slow = ex.pid("w-slow")
        assert _alive(slow)
    assert not _alive(slow)  # stop() on leaving the block: death pipe closed, process joined


def test_silent_worker_is_hung_after_worker_timeout():
    start = time.monotonic()
    messages, pids, _ = _run(hangs_after_progress, ["w0"], worker_timeout=1.0, start_seconds=3.0)
    elapsed = time.monotonic() - start
    assert isinstance(messages[-1], Hung) and messages[-1].worker == "w0"
    assert 1.0 <= elapsed < 10
    assert "no progress for 1 s (worker_timeout)" in messages[-1].describe()
    assert not _alive(pids["w0"])


def test_start_up_gets_at_least_its_predicted_time_times_the_factor(monkeypatch):
    monkeypatch.setattr(executor_module, "STARTUP_FACTOR", 2.0)
    start = time.monotonic()
    messages, _, _ = _run(waits_for_death_pipe, ["w0"], worker_timeout=0.5, start_seconds=1.0)
    assert isinstance(messages[-1], Hung) and messages[-1].seconds == 2.0 and messages[-1].starting
    assert time.monotonic() - start >= 2.0


def test_a_worker_hung_before_its_first_progress_is_caught_within_worker_timeout():
    """Start-up predicted well inside worker_timeout: silence past worker_timeout is a hang, starting
    or not (a fixed 300 s start-up grace let it run on for minutes)."""
    start = time.monotonic()
    messages, pids, _ = _run(waits_for_death_pipe, ["w0"], worker_timeout=1.5, start_seconds=0.25)
    assert isinstance(messages[-1], Hung) and messages[-1].starting and messages[-1].seconds == 1.5
    assert 1.5 <= time.monotonic() - start < 10
    assert "did not start computing within 1.5 s" in messages[-1].describe()
    assert not _alive(pids["w0"])


def test_closing_the_death_pipe_ends_the_worker():
    ex = LocalProcessExecutor(target=waits_for_death_pipe)
    ex.start([_task("w0")])
    try:
        next(ex.messages())  # Ready
        handle = ex._handles["w0"]
        handle.death.close()
        handle.process.join(10)
        assert handle.process.exitcode == ExitCode.ORPHANED
    finally:
        ex.stop()


def test_stop_escalates_to_kill_and_is_idempotent(monkeypatch):
    monkeypatch.setattr(executor_module, "STOP_GRACE_S", 0.3)
    monkeypatch.setattr(executor_module, "TERMINATE_GRACE_S", 0.3)
    ex = LocalProcessExecutor(target=ignores_everything)
    ex.start([_task("w0")])
    next(ex.messages())
    pid = ex.pid("w0")
    ex.stop()
    ex.stop()
    assert ex._handles["w0"].process.exitcode == -signal.SIGKILL
    assert not _alive(pid)


def test_stop_before_start_does_nothing():
    LocalProcessExecutor().stop()


# -- the worker's own loop, in this process (no spawn): rounds, parts, failures ----------------------
def _real_task(tmp_path, model_dir, hooks=WorkerHooks()):
    from flexorch.orchestrator.prompts import Prompt, load_tokenizer, tokenize_prompts

    prompts = [Prompt("The quick brown fox", (" jumps", " over")), Prompt("0 1 2", (" 3",)),
               Prompt("Question: What is the capital of France? Answer:", (" Paris", " Mars"))]
    tokenized = tokenize_prompts(prompts, load_tokenizer(model_dir), None, "prompts.jsonl")
    settings = EngineSettings(device="cpu", dtype="float32", layers_per_shard=2, storage="cpu", batch_tokens=256)
    return WorkerTask(name="w0", model_dir=str(model_dir), settings=settings, score=ScoreSpec(),
                      rounds=(Round(0, tuple(tokenized[:2])), Round(1, tuple(tokenized[2:]))),
                      parts_dir=str(tmp_path / "parts"), planned_rounds=2, hooks=hooks)


def test_run_task_commits_each_round_as_a_part(tmp_path, layerwise):
    task = _real_task(tmp_path, layerwise("llama"))
    sent = []
    run_task(task, sent.append)
    kinds = [type(m).__name__ for m in sent]
    assert kinds[-1] == "Finished" and kinds.count("RoundDone") == 2 and "Progress" in kinds
    last_progress = len(kinds) - 1 - kinds[::-1].index("Progress")
    assert kinds.index("RoundDone") < last_progress  # round 2 reports progress after round 1 is committed
    done = [m for m in sent if isinstance(m, RoundDone)]
    assert [m.indices for m in done] == [(0, 1), (2,)]
    assert [read_part_indices(m.part) for m in done] == [(0, 1), (2,)]
    assert all(m.summary.bytes_read > 0 for m in done)
    final = [m for m in sent if isinstance(m, Progress)][-1].event
    assert (final.stage, final.step) == (final.stages, final.steps)  # the last event of a pass is never dropped


def test_disk_full_while_committing_is_a_clear_failure_and_keeps_earlier_parts(tmp_path, layerwise):
    task = _real_task(tmp_path, layerwise("llama"), WorkerHooks(disk_full_after_rounds=1))
    sent = []
    with pytest.raises(DiskFullError) as info:
        run_task(task, sent.append)
    failed = failure_of(task, info.value)
    assert failed.kind == FAIL_DISK_FULL and failed.worker == "w0"
    assert failed.error.startswith(f"disk full while writing results to {tmp_path / 'parts'}")
    (committed,) = [m for m in sent if isinstance(m, RoundDone)]
    assert read_part_indices(committed.part) == (0, 1)


def test_failures_are_classified_for_the_controller():
    task = _task("w0")
    try:
        raise UserError("layers/002_layer.1.safetensors: checksum mismatch")
    except UserError as exc:
        user = failure_of(task, exc)
    assert user.kind == FAIL_USER and user.error == "layers/002_layer.1.safetensors: checksum mismatch"
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError as exc:
        internal = failure_of(task, exc)
    assert internal.kind == FAIL_ERROR and internal.error == "ZeroDivisionError: division by zero"
    assert "Traceback" in internal.traceback and "ZeroDivisionError" in internal.traceback
    full = failure_of(task, OSError(errno.ENOSPC, "No space left on device", "/x/act.bin"))
    assert full.kind == FAIL_DISK_FULL and "/x/act.bin" in full.error


# -- a worker killed while it is being spawned -------------------------------------------------------
@pytest.mark.timeout(120)
def test_worker_killed_at_spawn_with_a_large_task_fails_the_job_within_seconds(tmp_path, layerwise, monkeypatch,
                                                                              capsys):
    """The spawned interpreter dies before reading its arguments (as under the kernel's OOM killer
    at start-up). spawn used to write the task into a pipe whose read end the parent still held, so
    a task past the pipe buffer (64 KiB) blocked the controller for ever; now the task is a file."""
    import json as _json
    import multiprocessing.resource_tracker
    import multiprocessing.spawn
    import pickle

    from rich.console import Console

    from flexorch.orchestrator import controller
    from test_controller import PROMPTS, write_job

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(_json.dumps(PROMPTS[i % len(PROMPTS)]) + "\n" for i in range(3000)))
    job = write_job(tmp_path, layerwise("llama"))
    multiprocessing.resource_tracker.ensure_running()  # started by the real interpreter, not the stand-in
    dies_at_once = tmp_path / "killed-python"
    dies_at_once.write_text("#!/bin/sh\nkill -9 $$\n")
    dies_at_once.chmod(0o755)
    sizes = []
    real_dumps = pickle.dumps
    monkeypatch.setattr(executor_module.pickle, "dumps", lambda obj, **kw: sizes.append(len(real_dumps(obj, **kw)))
                        or real_dumps(obj, **kw))
    monkeypatch.setattr(multiprocessing.spawn, "_python_exe", os.fsencode(dies_at_once))
    start = time.monotonic()
    status = controller.submit(job, Console(stderr=True))
    assert status == 1 and time.monotonic() - start < 60
    assert sizes and sizes[0] > 64 * 1024  # the task that would have blocked
    err = capsys.readouterr().err
    assert "worker worker0 (cpu" in err and "killed by SIGKILL" in err


def test_a_job_whose_worker_hangs_before_its_first_progress_fails_within_worker_timeout(tmp_path, layerwise,
                                                                                         monkeypatch, capsys):
    """The issue's case: worker_timeout 20 s, the worker hangs once started, before its first round;
    start-up is predicted at 10 s (the assumed figure), so it gets max(20, 2 x 10) = 20 s, not 300."""
    import json

    from test_controller import submit, write_job

    job = write_job(tmp_path, layerwise("llama"), worker_timeout=20)
    monkeypatch.setenv("FLEXORCH_TEST_FAULTS", json.dumps({"worker0": {"hang_after_rounds": 0}}))
    start = time.monotonic()
    assert submit(job) == 1
    assert time.monotonic() - start < 90  # 20 s of silence, plus the plan and stopping the worker
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: worker worker0 (cpu") and "did not start computing within 20 s" in err
