"""The progress display: positions move batch by batch within a pass, weighted by predicted cost;
ETAs start from the plan and converge on each worker's measured pace (synthetic event streams on a
fake clock, no sleeps); a `starting workers` phase covers the workers' start-up, seen through the
real CLI."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace

import pytest
from rich.console import Console

from flexorch.orchestrator.progress import (PRIOR_SHARE, LiveProgress, LogProgress, WorkerLine, eta_seconds,
                                            pass_fraction)
from flexorch.contract.protocol import EngineSummary, ProgressEvent
from flexorch.contract.messages import Finished, Progress, Ready, RoundDone

from test_controller import write_job


def summary(seconds: float = 1.0) -> EngineSummary:
    return EngineSummary(seconds=seconds, load_seconds=0.1, read_seconds=0.2, compute_seconds=0.9, bytes_read=100,
                         peak_rss=1, peak_device_memory=0)


def _event(stage, stages=4, step=1, steps=1, prompts=3, seconds=None):
    return ProgressEvent(stage=stage, stages=stages, step=step, steps=steps, prompts_done=0, prompts=prompts,
                         tokens_done=100, bytes_read=0, seconds=stage * 0.5 if seconds is None else seconds)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _round_events(name: str, prompts: int, start: float, seconds: float, stages: int = 4, batches: int = 5):
    """(time, message) of one worker's single round over `prompts` at a steady pace: Ready at 0, the
    engine from `start` for `seconds`, every batch of every (equally costly) shard reported."""
    out = [(0.5, Ready(name, 1))]
    for stage in range(stages):
        for batch in range(1, batches + 1):
            at = (stage + batch / batches) / stages * seconds
            event = (_event(stage + 1, stages, prompts=prompts, seconds=at) if batch == batches else
                     replace(_event(stage, stages, prompts=prompts, seconds=at), batch=batch, batches=batches))
            out.append((start + at, Progress(name, 0, event)))
    out.append((start + seconds + 0.1, RoundDone(name, 0, tuple(range(prompts)), "p", summary(seconds))))
    return out


def _replay(display, clock, streams):
    """Feed the merged streams in time order; per message: (worker, done fraction, its ETA, true time left)."""
    ends = {msgs[-1][1].worker: msgs[-1][0] for msgs in streams}
    seen = []
    for at, message in sorted((item for stream in streams for item in stream), key=lambda item: item[0]):
        clock.now = at
        display.handle(message)
        state = display.workers[message.worker]
        seen.append((message.worker, state.done_fraction(), state.eta_seconds(at), ends[message.worker] - at))
    return seen


def test_eta_converges_on_each_workers_measured_pace():
    # the plan gives both CPU workers 270 s; they take 188 s and 150 s (the trial's 37-51% too high)
    clock = _Clock()
    lines = [WorkerLine(f"w{i}", "cpu", 48, 0, 1, predicted_seconds=270.0, pass_shares=(0.25,) * 4,
                        predicted_start_seconds=10.0) for i in range(2)]
    display = LogProgress(Console(file=io.StringIO()), lines, clock=clock)
    display.starting()
    assert display.eta_seconds() == pytest.approx(280.0)  # start-up and compute, as planned
    seen = _replay(display, clock, [_round_events("w0", 48, 12.0, 188.0), _round_events("w1", 48, 11.0, 150.0)])
    for worker, done, eta, left in seen:
        if 0.25 <= done < 1:
            assert eta == pytest.approx(left, rel=0.10), (worker, done)
        if 0.5 <= done < 1:
            assert eta == pytest.approx(left, rel=0.05), (worker, done)
            assert abs(eta - left) < abs((1 - done) * 270.0 - left) / 5  # the plan-only ETA: 5x further off
    assert display.eta_seconds() == 0.0


def test_short_jobs_show_the_time_left_not_zero():
    # predicted 2 s of compute, it takes 30 s: the ETA follows the pace, so it is never "0s" mid-job
    clock = _Clock()
    display = LogProgress(Console(file=io.StringIO()), [WorkerLine("w0", "cpu", 8, 0, 1, 2.0, (0.25,) * 4, 1.0)],
                          clock=clock)
    display.starting()
    seen = _replay(display, clock, [_round_events("w0", 8, 5.0, 30.0)])
    for _worker, done, eta, left in seen:
        if 0.2 <= done < 0.9:
            assert eta > 0.5 * left and eta >= 3.0, (done, eta, left)
    fresh = LogProgress(Console(file=io.StringIO()), [WorkerLine("w0", "cpu", 8, 0, 1, 2.0, (0.25,) * 4, 1.0)],
                        clock=clock)
    clock.now = 20.0
    fresh.handle(Progress("w0", 0, _event(2, prompts=8, seconds=15.0)))  # half the work in 15 s
    left = eta_seconds(0.5, 15.0, 20.0, 2.0, 1.0)
    assert left > 14 and f"ETA {round(left)}s" in fresh.workers["w0"].detail(clock.now)  # ~15 s, not 2 s


def test_eta_as_a_pure_function():
    # starting: the start-up left, then the whole compute; overdue start-up: the compute alone
    assert eta_seconds(0.0, None, 3.0, 100.0, 10.0) == 107.0
    assert eta_seconds(0.0, None, 30.0, 100.0, 10.0) == 100.0
    assert eta_seconds(0.0, None, 3.0, 0.0) is None  # no plan, nothing measured
    assert eta_seconds(0.0, 40.0, 50.0, 100.0) == 60.0  # computing, nothing measurable done yet
    assert eta_seconds(0.0, 140.0, 150.0, 100.0) is None  # past the plan with nothing done: unknown
    # half done in 50 s against a plan of 200 s: 200 weighs PRIOR_SHARE / (0.5 + PRIOR_SHARE)
    weight = 0.5 / (0.5 + PRIOR_SHARE)
    assert eta_seconds(0.5, 50.0, 60.0, 200.0) == pytest.approx(0.5 * ((1 - weight) * 200 + weight * 100))
    assert eta_seconds(0.5, 50.0, 60.0, 0.0) == pytest.approx(50.0)  # no plan: the pace alone
    assert eta_seconds(1.0, 50.0, 60.0, 200.0) == 0.0


def test_a_round_resumed_from_a_checkpoint_is_paced_on_what_this_run_computed():
    # half the slice spared by a checkpoint, a tenth more computed in 10 s: 0.4 left at 100 s per slice
    assert eta_seconds(0.6, 10.0, 20.0, 0.0, spared=0.5) == pytest.approx(40.0)
    assert eta_seconds(0.5, 10.0, 20.0, 100.0, spared=0.5) == pytest.approx(40.0)  # none yet: the plan's rest
    clock = _Clock()
    display = LogProgress(Console(file=io.StringIO()), [WorkerLine("w0", "cpu", 8, 0, 1, 0.0, (0.25,) * 4)], clock=clock)
    clock.now = 20.0
    # step 2 of 2 half done, after resuming at its first shard: 2 of 8 shards computed, 100 tokens each, in 4 s
    resumed = replace(_event(2, step=2, steps=2, prompts=8, seconds=4.0), shards_resumed=4)
    display.handle(Progress("w0", 0, resumed))
    state = display.workers["w0"]
    assert state.tokens_per_second() == pytest.approx(100 * 2 / 4 / 4.0)
    assert state.spared_fraction() == pytest.approx(0.5) and state.done_fraction() == pytest.approx(0.75)


def test_log_progress_writes_start_first_computing_rounds_and_periodic_lines():
    out = io.StringIO()
    clock = _Clock()
    display = LogProgress(Console(file=out, width=60), [WorkerLine("w0", "cpu", 6, 3, 2, 20.0, (), 5.0)],
                          clock=clock)
    display.starting()
    display.handle(Ready("w0", 123))
    assert "starting (loading torch and the model)" in display.workers["w0"].detail(1.0)
    clock.now = 1.0
    display.handle(Progress("w0", 1, _event(1)))  # the first: start-up is over, said at once
    clock.now = 2.0
    display.handle(Progress("w0", 1, _event(2)))  # within LOG_INTERVAL_S: silent
    assert display.workers["w0"].position() == pytest.approx(3 + 3 * 2 / 4)
    clock.now = 20.0
    display.handle(Progress("w0", 1, _event(3)))
    display.handle(RoundDone("w0", 1, (3, 4, 5), "p.npz", summary()))
    display.handle(Finished("w0", 21.0))
    assert display.eta_seconds() is None  # every worker done: no "ETA <1s" left on the screen
    lines = out.getvalue().splitlines()
    assert lines[0] == "starting workers: 1 process(es) importing torch and loading the model (predicted 5s)"
    assert lines[1] == "w0 (cpu): started (pid 123): 6 prompts, 3 reused, 2 rounds"
    assert lines[2].startswith("w0 (cpu): computing: shard 1/4 step 1/1  prompts 3.8/6 (3 committed)")
    assert lines[3].startswith("w0 (cpu): shard 3/4 step 1/1  prompts 5.2/6 (3 committed)") and "ETA" in lines[3]
    assert lines[4].startswith("w0 (cpu): round 2/2 committed (6/6 prompts); job 100%")
    assert lines[5] == "w0 (cpu): finished in 21.0 s"
    assert all(len(line) > 60 for line in lines[2:5])  # never wrapped at the console width


def test_live_progress_tracks_workers_and_the_job_with_a_starting_phase():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    clock = _Clock()
    with LiveProgress(console, [WorkerLine("w0", "cpu", 3, 0, 1, 10.0), WorkerLine("w1", "cuda:0", 3, 0, 1, 10.0)],
                      clock=clock) as live:
        live.starting()
        assert "starting workers" in live.progress.tasks[0].fields["detail"]
        live.handle(Ready("w0", 1))
        live.handle(Progress("w0", 0, _event(2, steps=2, step=2)))  # 6 of 8 shard passes
        assert "starting workers" not in live.progress.tasks[0].fields["detail"]
        assert live.workers["w0"].position() == pytest.approx(3 * 6 / 8)
        live.handle(RoundDone("w1", 0, (3, 4, 5), "p.npz", summary()))
        assert live.position() == pytest.approx(3 * 6 / 8 + 3)
        assert live.progress.tasks[0].completed == pytest.approx(live.position())
    assert "w1 (cuda:0)" in out.getvalue()


def test_progress_weighs_shards_by_predicted_cost_and_the_job_eta_is_the_slowest_workers():
    clock = _Clock()
    # 4 shards: the embedding costs nothing, two decoder shards half each, the head nothing
    shares = (0.0, 0.5, 0.5, 0.0)
    lines = [WorkerLine("w0", "cpu", 4, 0, 1, predicted_seconds=100.0, pass_shares=shares),
             WorkerLine("w1", "cpu", 4, 0, 1, predicted_seconds=40.0, pass_shares=shares)]
    display = LogProgress(Console(file=io.StringIO()), lines, clock=clock)
    display.starting()
    assert display.eta_seconds() == 100.0  # before anything runs: the planner's prediction, slowest worker
    clock.now = 1.0
    display.handle(Progress("w0", 0, _event(1, prompts=4, seconds=0.0)))  # the embedding: no work done yet
    assert display.workers["w0"].position() == 0.0
    clock.now = 11.0
    display.handle(Progress("w0", 0, _event(2, prompts=4, seconds=10.0)))  # half the pass in 10 s
    display.handle(Progress("w1", 0, _event(3, prompts=4, seconds=10.0)))  # all the pass's work: done
    assert display.workers["w0"].eta_seconds(clock.now) == pytest.approx(eta_seconds(0.5, 10.0, 11.0, 100.0))
    assert display.workers["w0"].eta_seconds(clock.now) < 15.0  # the pace (10 s left), not the plan (50 s)
    assert display.workers["w1"].eta_seconds(clock.now) == 0.0
    assert display.eta_seconds() == display.workers["w0"].eta_seconds(clock.now)


def test_progress_moves_within_a_shard_batch_by_batch():
    # One decoder shard carries the pass: without batch events the bar would sit still for all of it.
    shares = (0.0, 1.0, 0.0)
    display = LogProgress(Console(file=io.StringIO()), [WorkerLine("w0", "cpu", 8, 0, 1, 80.0, shares)],
                          clock=_Clock())
    display.handle(Ready("w0", 1))
    positions = []
    for batch in (1, 2, 3):
        event = replace(_event(1, stages=3, prompts=8), batch=batch, batches=4)  # the decoder shard, 3 of 4 batches
        display.handle(Progress("w0", 0, event))
        positions.append(display.workers["w0"].position())
    assert positions == pytest.approx([2.0, 4.0, 6.0])
    assert pass_fraction(event, shares) == pytest.approx(0.75)
    assert "batch 3/4" in display.workers["w0"].detail() and "prompts 6.0/8 (0 committed)" in \
        display.workers["w0"].detail()
    display.handle(Progress("w0", 0, _event(2, stages=3, prompts=8)))  # the shard done: no batch part
    assert display.workers["w0"].position() == pytest.approx(8.0)


def test_the_starting_phase_is_shown_before_the_workers_compute(tmp_path, layerwise):
    job = write_job(tmp_path, layerwise("llama"), devices=["cpu", "cpu"])
    result = subprocess.run([sys.executable, "-m", "flexorch.orchestrator.cli", "submit", str(job)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    at = {key: next(i for i, line in enumerate(lines) if key in line)
          for key in ("starting workers: 2 process(es)", "started (pid", "computing: ", "done: ")}
    assert at["starting workers: 2 process(es)"] < at["started (pid"] < at["computing: "] < at["done: "], lines
    assert sum("computing: " in line for line in lines) == 2  # each worker's start-up end, once
