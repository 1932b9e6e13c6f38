"""What `flexorch plan` prints (orchestrator/render.py): a plan's table and its text tell the same
times, start-up shown."""

from __future__ import annotations

import re

from rich.console import Console

from flexorch.orchestrator.planner import make_plan
from flexorch.orchestrator.render import describe_time, render_plan

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
