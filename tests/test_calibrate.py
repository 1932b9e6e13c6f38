"""Calibration: measured once per machine, cached, and read by the planner as data."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import math

import pytest

from flexorch.orchestrator import calibrate
from flexorch.orchestrator.figures import figures_of
from flexorch.orchestrator.hardware import Calibration, Conditions, Hardware, Throughput
from flexorch.orchestrator.planner import make_plan

from test_planner import Limits, Spec, machine, small_fp32

MEASURED = Calibration(
    machine="box", measured_at="2026-11-25 23:00 UTC", seconds=12.0, disk_path="/cache", disk_read_bytes_per_s=1e9,
    worker_start_seconds=4.0, worker_base_ram=300_000_000, sha256_bytes_per_s=1.8e9,
    throughput=(Throughput("cpu", "float32", 256, 100e9), Throughput("cpu", "float32", 1024, 200e9)),
)


def test_measured_figures_replace_the_assumed_ones_and_say_so():
    hardware = replace(machine(cpus=8), calibration=MEASURED)
    figures = figures_of(hardware)
    assert figures.disk_read.value == 1e9 and figures.disk_read.measured
    assert figures.base_ram["cpu"].value == 300_000_000 and figures.safety == 0.05
    # measured at all 8 cores: 4 threads get half; between measured batches, linear in log2(batch)
    assert figures.flops("cpu", "float32", 8, 1024) == 200e9
    assert figures.flops("cpu", "float32", 4, 512) == pytest.approx(0.5 * 150e9)
    assert figures.flops("cpu", "float32", 8, 4096) == 200e9  # flat above the measured batches
    # below them a forward takes as long as the smallest measured one: the rate falls with the batch
    assert figures.flops("cpu", "float32", 8, 64) == pytest.approx(100e9 / 4)
    lines = figures.describe(("cpu",), "float32")
    assert any(line.startswith("disk read 1.00 GB/s cold (measured 2026-11-25 23:00 UTC)") for line in lines)
    assert figures.sha256.value == 1.8e9 and any(line.startswith("sha256 1.80 GB/s") and "(measured" in line
                                                 for line in lines)
    assert figures_of(machine()).sha256.source.startswith("assumed")
    # bfloat16 was not measured: assumed, and said so
    assert figures_of(hardware).flops_source("cpu", "bfloat16").startswith("assumed")
    assert not figures_of(machine()).disk_read.measured


def test_a_plan_made_with_calibration_prints_its_figures_and_uses_them():
    hardware = replace(machine(cpus=8), calibration=MEASURED)
    plan = make_plan(hardware, small_fp32(), Spec(), [150] * 32)
    (worker,) = plan.workers
    assert worker.predicted_start_seconds == 4.0
    assert any("worker fixed RAM 300.00 MB (measured" in f for f in plan.figures)
    # 32 x 150 tokens (6,000 padded) in 6 batches of 1,000: 2 x 12.85M params x 16 layers x 4800 tokens and
    # attention 4 x 150 x 1024 per token and layer at the rate measured between 256 and 1024 tokens; the head on
    # 4 suffixes' last tokens per prompt, 21 rows a batch, below the measured batches: at 21/256 of 256's rate.
    layers = 2 * 16 * 12_847_104 * 4800 + 4 * 150 * 1024 * 16 * 4800
    head = 2 * 32_768_000 * 128
    layer_rate = 100e9 + 100e9 * math.log2(1000 / 256) / 2
    assert worker.predicted_compute_seconds == pytest.approx(layers / layer_rate + head / (100e9 * 21 / 256))


def test_a_measured_base_lets_a_tight_cap_be_met():
    # 600 MB RAM: with the assumed 512 MiB base and 10% margin nothing fits (a 680 MB cap is the least that
    # does, now that the 131 MB head no longer sizes the slots); measured (300 MB, 5%) it does.
    spec = Spec(limits=Limits(ram=600_000_000))
    with pytest.raises(Exception, match="does not fit"):
        make_plan(machine(cpus=8), small_fp32(), spec, [150] * 32)
    plan = make_plan(replace(machine(cpus=8), calibration=MEASURED), small_fp32(), spec, [150] * 32)
    assert plan.workers[0].predicted_peak_ram <= 0.95 * 600_000_000


def test_calibration_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXORCH_CALIBRATE", "1")
    calls = []

    def fake_measure(hardware, key, disk_dir):
        calls.append(key)
        return replace(MEASURED, machine=key)

    monkeypatch.setattr(calibrate, "measure", fake_measure)
    first = calibrate.calibrated(machine(), tmp_path)
    again = calibrate.calibrated(machine(), tmp_path)
    assert len(calls) == 1 and first.calibration == again.calibration
    (cached,) = (tmp_path / "calibration").glob("*.json")
    assert Calibration.from_dict(json.loads(cached.read_text())) == first.calibration
    calibrate.calibrated(machine(), tmp_path, force=True)
    assert len(calls) == 2
    monkeypatch.setenv("FLEXORCH_CALIBRATE", "0")
    assert calibrate.calibrated(machine(), tmp_path).calibration is None


def test_hardware_with_calibration_round_trips_through_json():
    hardware = replace(machine(), calibration=MEASURED)
    assert Hardware.from_dict(json.loads(json.dumps(hardware.to_dict()))) == hardware


def test_the_hash_rate_is_measured_in_memory():
    assert calibrate.measure_sha256(4 << 20) > 1e7  # bytes/s: even a slow core hashes 10 MB/s


def test_the_cold_read_probe_reads_the_whole_file(tmp_path):
    with calibrate.ColdReadProbe(tmp_path, size=32 << 20, settle_s=0) as probe:
        assert probe.path.stat().st_size == 32 << 20
        rate = probe.read_rate()
        direct = probe.direct_read_rate()  # None where the filesystem refuses O_DIRECT
    assert rate > 1e6 and (direct is None or direct > 1e6) and not any(tmp_path.iterdir())


@pytest.mark.parametrize("reports", [True, False])
def test_the_cold_read_waits_for_freed_memory_to_settle_where_the_vm_takes_it_back(tmp_path, monkeypatch, reports):
    """Read at once, the file would land in the pages its eviction just freed (still backed by the host)
    and read ~2x faster than a cold job's files."""
    monkeypatch.setattr(calibrate, "returns_freed_memory", lambda: reports)
    monkeypatch.setattr(calibrate, "FREED_MEMORY_SETTLE_S", 30.0)
    slept = []
    monkeypatch.setattr(calibrate.time, "sleep", slept.append)
    with calibrate.ColdReadProbe(tmp_path, size=16 << 20) as probe:
        probe.read_rate()
    assert (len(slept) == 1 and 29 < slept[0] <= 30) if reports else not slept


def test_the_worker_is_measured_between_the_eviction_and_the_read(tmp_path, monkeypatch):
    """The worker's seconds let the freed memory settle: no wait is added to the calibration."""
    order = []
    monkeypatch.setattr(calibrate, "measure_worker", lambda devices: order.append("worker") or {
        "start_seconds": 3.0, "worker_base_ram": 1, "throughput": []})
    monkeypatch.setattr(calibrate.ColdReadProbe, "__init__", lambda self, folder: order.append("evict") or None)
    monkeypatch.setattr(calibrate.ColdReadProbe, "read_rate", lambda self: order.append("read") or 1e9)
    monkeypatch.setattr(calibrate.ColdReadProbe, "direct_read_rate", lambda self: order.append("direct") or 2e9)
    monkeypatch.setattr(calibrate.ColdReadProbe, "close", lambda self: order.append("removed"))
    measured = calibrate.measure(machine(), "box", tmp_path)
    assert (measured.disk_read_bytes_per_s, measured.direct_read_bytes_per_s) == (1e9, 2e9)
    assert order == ["evict", "worker", "read", "direct", "removed"]


def _virtio(root, name: str, device_id: str, features: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "device").write_text(device_id + "\n")
    (root / name / "features").write_text(features.ljust(64, "0") + "\n")


def test_a_balloon_that_reports_free_pages_is_recognised(tmp_path):
    assert not calibrate.returns_freed_memory(tmp_path / "absent")  # not a VM (or not Linux)
    _virtio(tmp_path, "virtio1", "0x0002", "0010011")  # a block device: its bit 5 means something else
    _virtio(tmp_path, "virtio0", "0x0005", "0110")  # a balloon without free page reporting
    assert not calibrate.returns_freed_memory(tmp_path)
    (tmp_path / "virtio0" / "features").write_text("011001010".ljust(64, "0") + "\n")  # bit 5: reporting
    assert calibrate.returns_freed_memory(tmp_path)


def test_probe_calibrate_measures_caches_and_prints_the_figures(tmp_path, monkeypatch, capsys):
    from flexorch.orchestrator import cli

    monkeypatch.setenv("FLEXORCH_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "measure", lambda hardware, key, disk_dir: replace(MEASURED, machine=key))
    assert cli.main(["probe", "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "Calibration (measured 2026-11-25 23:00 UTC" in out and "worker fixed RAM" in out
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 1


def test_layer_rates_are_the_median_of_interleaved_rounds(monkeypatch):
    """Each point is measured in every round, the points in turn (a slow spell touches all alike), and its
    rate is its FLOPs over the median of its runs: one slow run does not move it, nor does the warm-up."""
    from flexorch.workers import calibrate as measuring

    order, scripted = [], iter([9.0, 9.0, 1.0, 1.0, 1.0, 1.0, 5.0, 1.0])  # two warm-ups, then rounds

    def run(point):
        order.append((point.hidden, point.rows * point.length))
        return next(scripted)

    monkeypatch.setattr(measuring._Point, "_run", run)
    monkeypatch.setattr(measuring, "ROUNDS", 3)
    monkeypatch.setattr(measuring, "ROUND_SECONDS", 0.5)  # one run a round: each scripted second exceeds it
    rates = measuring._flops([(64, "float32")], "cpu", (8, 32))
    assert order == [(64, 8), (64, 32)] * 4
    flops8 = measuring.layer_flops(4 * 64 * 64 + 3 * 64 * 176 + 2 * 64, 64, 8, 8)
    assert rates[0]["round_rates"] == pytest.approx([flops8, flops8, flops8 / 5])  # each round's own rate
    params = 4 * 64 * 64 + 3 * 64 * 176 + 2 * 64  # reference_shape(64): intermediate 2.75 x, no biases
    assert [(r["hidden"], r["batch_tokens"], r["dtype"]) for r in rates] == [(64, 8, "float32"), (64, 32, "float32")]
    assert rates[0]["flops_per_s"] == pytest.approx(measuring.layer_flops(params, 64, 8, 8) / 1.0)  # runs 1, 1, 5
    assert rates[1]["flops_per_s"] == pytest.approx(measuring.layer_flops(params, 64, 32, 32) / 1.0)


def test_a_measurement_gives_every_figure_the_planner_reads(monkeypatch):
    from flexorch.orchestrator.hardware import Throughput
    from flexorch.workers import calibrate as measuring

    monkeypatch.setattr(measuring, "WIDTHS", {"cpu": (64, 128)})
    monkeypatch.setattr(measuring, "BATCHES", {"cpu": (8, 64)})
    monkeypatch.setattr(measuring, "ROW_TOKENS", 32)
    monkeypatch.setattr(measuring, "LONG_ROW", {"cpu": 64})
    monkeypatch.setattr(measuring, "ROUND_SECONDS", 0.0)
    result = measuring.measure(["cpu"])
    assert result["worker_base_ram"] > 50 << 20 and result["import_seconds"] > 0
    points = [Throughput(**t) for t in result["throughput"]]
    # each batch on rows of at most 32 tokens, and 64 tokens also as one row
    assert {(t.hidden, t.dtype, t.batch_tokens, t.row_tokens) for t in points} == {
        (w, d, b, r) for w in (64, 128) for d in measuring.DTYPES["cpu"] for b, r in ((8, 8), (64, 32), (64, 64))}
    assert all(t.device == "cpu" and t.flops_per_s > 1e6 for t in points)
    for t in points:  # attention: 4 x row x hidden per token
        assert t.attention_flops == 4 * t.row_tokens * t.hidden * t.batch_tokens < t.forward_flops


# Reference layers 256 and 1024 wide at batches 32 and 1024: each forward's FLOPs and seconds. At 1024 tokens a
# forward costs 2 ms + 6 ps per FLOP; at 32 tokens 0.5 ms + 10 ps per FLOP.
BY_FLOPS = Calibration(
    machine="box", measured_at="2026-11-26 05:00 UTC", seconds=9.0, worker_base_ram=300_000_000,
    throughput=tuple(Throughput("cpu", "float32", batch, flops / (fixed + per_flop * flops), hidden, flops)
                     for batch, fixed, per_flop, widths in ((32, 0.5e-3, 10e-12, ((256, 6.4e7), (1024, 8.4e8))),
                                                            (1024, 2e-3, 6e-12, ((256, 2e9), (1024, 27e9))))
                     for hidden, flops in widths))


def test_a_layer_is_priced_by_its_own_flops_a_fixed_cost_per_forward_plus_a_cost_per_flop():
    figures = figures_of(replace(machine(cpus=8), calibration=BY_FLOPS))

    def rate(batch, token_flops, fixed, per_flop):
        return token_flops * batch / (fixed + per_flop * token_flops * batch)

    narrow, wide = 0.7e6, 400e6  # FLOPs per token: a layer narrower than 256, one far wider than 1024
    assert figures.flops("cpu", "float32", 8, 1024, token_flops=narrow) == pytest.approx(rate(1024, narrow, 2e-3, 6e-12))
    assert figures.flops("cpu", "float32", 8, 32, token_flops=wide) == pytest.approx(rate(32, wide, 0.5e-3, 10e-12))
    # the narrow layer's fixed share slows it below the narrowest reference; the wide one nears 1 / cost per FLOP
    assert figures.flops("cpu", "float32", 8, 1024, token_flops=narrow) < 2e9 / (2e-3 + 6e-12 * 2e9)
    assert figures.flops("cpu", "float32", 8, 1024, token_flops=wide) == pytest.approx(1 / 6e-12, rel=0.01)
    # between the batches measured, linear in log2(batch); 4 of 8 threads get half
    between = (rate(32, narrow, 0.5e-3, 10e-12) + rate(1024, narrow, 2e-3, 6e-12)) / 2
    assert figures.flops("cpu", "float32", 4, 181, token_flops=narrow) == pytest.approx(between / 2, rel=1e-3)


def test_the_planner_prices_its_model_by_the_flops_per_token_of_its_layers():
    plan = make_plan(replace(machine(cpus=8), calibration=BY_FLOPS), small_fp32(), Spec(storage="cpu"), [150] * 32)
    (worker,) = plan.workers
    # small_fp32: a layer's 12,847,104 params and attention over 150-token rows, 1024 wide, per token
    token_flops = 2 * 12_847_104 + 4 * 150 * 1024

    def rate(batch):  # at `batch` tokens per forward: log2-interpolated between the fitted 32 and 1024
        low, high = (b * token_flops / (fixed + per_flop * b * token_flops)
                     for b, fixed, per_flop in ((32, 0.5e-3, 10e-12), (1024, 2e-3, 6e-12)))
        return low * batch / 32 if batch < 32 else low + (high - low) * math.log2(batch / 32) / 5

    # 6,000 padded tokens in 6 batches of 1,000; the head's 128 scored rows, 21 a batch
    layers, head = 16 * 4800 * token_flops, 2 * 32_768_000 * 128
    assert worker.settings.batch_tokens == 1024
    assert worker.predicted_compute_seconds == pytest.approx(layers / rate(1000) + head / rate(21))


def test_attention_flops_are_priced_apart_where_a_long_row_was_measured():
    # At 1024 tokens a forward costs 2 ms + 6 ps per weight FLOP + 15 ps per attention FLOP. Measured: both
    # widths on rows of 256, and the narrow one on one row of 1024 (the same weights, 4x the attention).
    def point(hidden, weights, row):
        attention = 4.0 * row * hidden * 1024
        seconds = 2e-3 + 6e-12 * weights + 15e-12 * attention
        return Throughput("cpu", "float32", 1024, (weights + attention) / seconds, hidden, weights + attention,
                          attention, row)

    calibration = replace(BY_FLOPS, throughput=(point(256, 1.62e9, 256), point(1024, 2.58e10, 256),
                                                point(256, 1.62e9, 1024)))
    figures = figures_of(replace(machine(cpus=8), calibration=calibration))
    token_flops, token_attention = 2.6e6, 1.0e6  # a narrow layer on 500-token rows: attention is 38%
    expected = token_flops * 1024 / (2e-3 + 6e-12 * (token_flops - token_attention) * 1024
                                     + 15e-12 * token_attention * 1024)
    assert figures.flops("cpu", "float32", 8, 1024, token_flops=token_flops,
                         token_attention=token_attention) == pytest.approx(expected)
    # without the long row, attention FLOPs would be priced as weight FLOPs: faster than measured
    short_only = replace(calibration, throughput=calibration.throughput[:2])
    assert figures_of(replace(machine(cpus=8), calibration=short_only)).flops(
        "cpu", "float32", 8, 1024, token_flops=token_flops, token_attention=token_attention) > 1.2 * expected


def test_a_failed_calibration_plans_with_the_assumed_figures_and_says_why(tmp_path, monkeypatch):
    import io
    import subprocess

    from rich.console import Console

    monkeypatch.setenv("FLEXORCH_CALIBRATE", "1")

    def crash(hardware, key, disk_dir):
        raise subprocess.CalledProcessError(1, ["python"], stderr="Traceback ...\nRuntimeError: no kernel for this GPU\n")

    monkeypatch.setattr(calibrate, "measure", crash)
    out = io.StringIO()
    hardware = calibrate.calibrated(machine(), tmp_path, console=Console(file=out, width=200))
    assert hardware.calibration is None and not (tmp_path / "calibration").exists()
    assert "calibration failed, planning with assumed figures" in out.getvalue()
    assert "RuntimeError: no kernel for this GPU" in out.getvalue()
    plan = make_plan(hardware, small_fp32(), Spec(), [150] * 32)
    assert any("assumed" in line for line in plan.figures)


def test_a_point_the_device_has_no_memory_for_is_left_out(monkeypatch):
    import torch

    from flexorch.workers import calibrate as measuring

    real = measuring._Point.__init__

    def short_of_memory(self, layer, rotary, params, hidden, batch, row, device, dtype):
        if batch == 64 and row == 64:
            raise torch.OutOfMemoryError("CUDA out of memory")
        real(self, layer, rotary, params, hidden, batch, row, device, dtype)

    monkeypatch.setattr(measuring._Point, "__init__", short_of_memory)
    monkeypatch.setattr(measuring, "ROW_TOKENS", 32)
    monkeypatch.setattr(measuring, "ROUND_SECONDS", 0.0)
    rates = measuring._flops([(64, "float32")], "cpu", (8, 64), long_row=64)
    assert [(r["batch_tokens"], r["row_tokens"]) for r in rates] == [(8, 8), (64, 32)]


# -- disturbance ------------------------------------------------------------------------------------
QUIET = calibrate.MachineLoad(load=0.2, busy=100.0, steal=0.0, total=400.0, ours=10.0)


def _later(seconds: float, ours: float, others: float = 0.0, steal: float = 0.0, load: float = 0.2,
           cores: int = 2) -> calibrate.MachineLoad:
    """QUIET after `seconds` on `cores` cores: this process used `ours` CPU seconds, others `others`."""
    return calibrate.MachineLoad(load, QUIET.busy + ours + others, QUIET.steal + steal, QUIET.total + seconds * cores,
                                 QUIET.ours + ours)


def test_the_spread_between_rounds_is_the_median_over_the_points():
    assert calibrate.round_spread([[100, 100, 100], [50, 52, 51]]) == pytest.approx(1.02)
    # one noisy point does not make the machine disturbed; a slow round touching every point does
    assert calibrate.round_spread([[100, 101, 100], [50, 51, 50], [10, 30, 10]]) == pytest.approx(1.02)
    assert calibrate.round_spread([[100, 100, 60], [50, 50, 30], [10, 10, 6]]) == pytest.approx(100 / 60)
    assert calibrate.round_spread([[100], []]) == 1.0  # fewer than two rounds: nothing to compare


def test_a_quiet_measurement_is_not_disturbed():
    conditions = calibrate.conditions_between(QUIET, _later(10, ours=19.5, others=0.3, load=2.1),
                                              [[100, 102, 101]] * 4)
    assert conditions.steal == 0.0 and conditions.others_cpu == pytest.approx(0.3 / 20)
    assert calibrate.disturbance(conditions, cpu_count=2) == ""
    assert calibrate.disturbance(None, cpu_count=2) == ""  # a calibration from before: nothing recorded


@pytest.mark.parametrize("later, rounds, load, expected", [
    (dict(ours=10, others=9), [[100, 100]], 0.2, "other processes used 45% of the CPU time meanwhile"),
    (dict(ours=15, steal=4), [[100, 100]], 0.2, "20% of the CPU time stolen by the hypervisor"),
    (dict(ours=19), [[100, 70]] * 3, 0.2, "its rounds differed by up to 1.43x"),
    (dict(ours=19), [[100, 100]], 3.5, "load average 3.5 on 2 cores before it"),
])
def test_each_sign_of_a_busy_machine_marks_the_measurement_disturbed(later, rounds, load, expected):
    conditions = calibrate.conditions_between(replace(QUIET, load=load), _later(10, **later), rounds)
    assert calibrate.disturbance(conditions, cpu_count=2) == expected


def test_the_machine_load_is_read_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    tick = os.sysconf("SC_CLK_TCK")
    stat.write_text(f"cpu  {3 * tick} 0 {tick} {10 * tick} 0 0 0 {2 * tick} 0 0\ncpu0 1 2 3\n")
    load = calibrate.MachineLoad.now(stat)
    assert (load.busy, load.steal, load.total) == (4.0, 2.0, 16.0) and load.ours > 0
    assert calibrate.MachineLoad.now(tmp_path / "absent").total is None  # not Linux: no CPU figures


def _disturbed(spread: float) -> Calibration:
    return replace(MEASURED, conditions=Conditions(round_spread=spread, load_before=0.1, load_after=2.0))


@pytest.mark.parametrize("spreads, unreliable", [((2.0, 1.01), ""), ((2.0, 1.6), "its rounds differed by up to 1.60x")])
def test_a_disturbed_calibration_is_retried_once_then_marked_unreliable(tmp_path, monkeypatch, spreads, unreliable):
    monkeypatch.setenv("FLEXORCH_CALIBRATE", "1")
    takes = iter(spreads)
    monkeypatch.setattr(calibrate, "measure", lambda hardware, key, disk_dir: _disturbed(next(takes)))
    hardware = calibrate.calibrated(machine(), tmp_path)
    assert next(takes, None) is None  # measured twice, no more
    assert hardware.calibration.unreliable == unreliable
    # cached with its mark, and every figure taken from it says so
    assert calibrate.calibrated(machine(), tmp_path).calibration == hardware.calibration
    figures = figures_of(hardware)
    assert figures.disk_read.source.endswith(f", unreliable: {unreliable}") == bool(unreliable)
    assert ("unreliable" in figures.flops_source("cpu", "float32")) == bool(unreliable)


def test_probe_shows_an_unreliable_calibration(tmp_path, monkeypatch, capsys):
    from flexorch.orchestrator import cli

    monkeypatch.setenv("FLEXORCH_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "measure", lambda hardware, key, disk_dir: _disturbed(3.0))
    monkeypatch.setenv("COLUMNS", "200")  # the reason on one line
    assert cli.main(["probe", "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "unreliable" in out and "its rounds differed by up to 3.00x" in out
