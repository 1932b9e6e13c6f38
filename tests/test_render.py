"""What `flexorch plan` and `flexorch probe` print (orchestrator/render.py): a plan's table and its text
tell the same times, start-up shown; the calibration table lists each measured point once, at its
measured rate."""

from __future__ import annotations

import re

from rich.console import Console

from flexorch.orchestrator.hardware import Calibration, Throughput
from flexorch.orchestrator.planner import make_plan
from flexorch.orchestrator.durations import describe_time
from flexorch.orchestrator.render import render_calibration, render_plan

from test_planner import SMALL_GPU, WORKSTATION_LIMITS, job_spec, llama2_70b, machine, small_fp32

GB = 10**9


def printed(render, *args, width: int = 200) -> str:
    console = Console(record=True, width=width)
    render(*args, console)
    return console.export_text()


def test_render_plan_prints_the_workers_and_the_reasons():
    text = printed(render_plan, make_plan(machine(SMALL_GPU), llama2_70b(), job_spec(limits=WORKSTATION_LIMITS),
                                          [300] * 400))
    assert "cuda:0" in text and "storage cpu (auto)" in text and "layers_per_shard 1 (auto)" in text


def test_a_time_is_shown_with_the_parts_it_adds_up_from():
    # 10 s start-up, 60 s computing with 20 s of reading beside it, 5 s not hidden by the overlap
    assert describe_time(10.0, 5.0, 20.0, 60.0) == (
        "75.0 s = 10.0 s start-up + 60.0 s computing (20.0 s reading weights beside it) + 5.0 s not overlapped")
    assert describe_time(10.0, 5.0, 60.0, 20.0).startswith("75.0 s = 10.0 s start-up + 60.0 s reading weights (20.0 s")


def test_the_table_and_the_text_give_each_worker_and_mode_the_same_time():
    # two CPU workers, data mode: each worker's row, its text line and the mode's line (its slowest) agree
    plan = make_plan(machine(cpus=8), small_fp32(), job_spec(devices=("cpu", "cpu")), [150] * 32)
    text = printed(render_plan, plan)
    rows = {w.name: re.search(rf"^{w.name} .* (\S+ (?:s|min|h))$", text, re.MULTILINE).group(1) for w in plan.workers}
    for w in plan.workers:
        assert re.search(rf"^- {w.name}: predicted {re.escape(rows[w.name])} = \S+ s start-up \+ ", text, re.MULTILINE)
    slowest = max(plan.workers, key=lambda w: w.predicted_seconds)
    assert f"- predicted data (2 workers): {rows[slowest.name]} = " in text
    assert plan.predictions[0].seconds == slowest.predicted_seconds


CALIBRATION = Calibration(
    machine="box", measured_at="2026-11-25 23:00 UTC", seconds=12.0, disk_path="/cache",
    throughput=(Throughput("cpu", "float32", 1024, 123.4e9, hidden=256, row_tokens=256),
                Throughput("cpu", "float32", 1024, 120.9e9, hidden=256, row_tokens=1024),
                Throughput("cpu", "bfloat16", 32, 0.42e9, hidden=256, row_tokens=32),
                Throughput("cuda:0", "float16", 16384, 612e12, hidden=4096, row_tokens=256)),
)


def test_the_calibration_table_lists_each_point_once_at_its_rate():
    # the same width and batch measured on rows of 256 and on one row of 1024 tokens: two rows, told apart
    text = printed(render_calibration, CALIBRATION)
    assert "cpu float32 256 wide @ 1024 tokens in rows of 256" in text
    assert "cpu float32 256 wide @ 1024 tokens in one row of 1024" in text
    labels = [line.split("│")[1].strip() for line in text.splitlines() if "wide @" in line]
    assert len(labels) == len(set(labels)) == 4
    # a slow rate keeps its digits (not "0 GFLOP/s"), a GPU's reads in TFLOP/s
    assert "123 GFLOP/s" in text and "121 GFLOP/s" in text and "420 MFLOP/s" in text and "612 TFLOP/s" in text
    assert " 0 GFLOP/s" not in text
