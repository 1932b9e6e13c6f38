"""Learning from the machine's own jobs: each job's measured pace corrects the figures the next plan
predicts with (orchestrator/pace.py measures, orchestrator/learned.py keeps, figures.py prefers)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from flexorch.orchestrator import calibrate, learned, pace
from flexorch.orchestrator.controller import WorkerRecord
from flexorch.orchestrator.figures import figures_of
from flexorch.orchestrator.hardware import Calibration, Throughput, probe
from flexorch.orchestrator.learned import Key, Kind, LearnedFigures
from flexorch.orchestrator.planner import make_plan

from test_calibrate import MEASURED
from test_planner import Spec, machine, small_fp32

COMPUTE = Key(Kind.COMPUTE, "cpu", "float32", 1024, 512)


def _series(*values: float, key: Key = COMPUTE) -> LearnedFigures:
    figures = LearnedFigures("box", MEASURED.measured_at)
    for i, value in enumerate(values):
        figures = figures.observed(key, value, f"2026-12-06 08:0{i} UTC")
    return figures


# -- the robust estimate ------------------------------------------------------------------------------
@pytest.mark.parametrize("values, expected", [
    ((2.0,), 2.0),  # the first job replaces the calibration at once
    ((2.0, 20.0), 2.0),  # a noisy second job: the older of the two stands
    ((20.0, 2.0, 2.1), 2.1),  # a noisy first job is outvoted by the next two
    ((2.0, 2.1, 1.9, 20.0), 2.0),  # one noisy job among four: the median drops it
    ((2.0, 2.0, 2.0, 0.2), 2.0),  # ... either way
    ((2.0, 6.0, 6.1), 6.0),  # two jobs that agree on a change carry it
])
def test_a_figure_is_the_median_of_its_recent_jobs_and_one_noisy_job_does_not_move_it(values, expected):
    assert _series(*values).get(COMPUTE).value == expected


def test_only_the_last_window_of_jobs_counts():
    figures = _series(*([9.0] * learned.WINDOW + [1.0] * (learned.WINDOW // 2 + 1)))
    series = figures.get(COMPUTE)
    assert len(series.observations) == learned.WINDOW and series.value == 1.0
    assert series.source == f"learned from {learned.WINDOW} jobs (last {series.observations[-1].at})"


def test_a_pace_is_interpolated_in_log2_batch_and_kept_to_its_width():
    figures = _series(2.0).observed(replace(COMPUTE, batch=2048), 8.0, "2026-12-06 09:00 UTC")
    assert figures.pace("cpu", "float32", 1024, 512) == pytest.approx(2.0)
    assert figures.pace("cpu", "float32", 1024, 1024) == pytest.approx(4.0)  # halfway in log2: the ratios' mean
    assert figures.pace("cpu", "float32", 1024, 64) == pytest.approx(2.0)  # flat beyond
    assert figures.pace("cpu", "float32", 1024, 1 << 20) == pytest.approx(8.0)
    # another width, dtype or device: nothing learned there
    assert figures.pace("cpu", "float32", 256, 512) == figures.pace("cpu", "bfloat16", 1024, 512) == 1.0
    assert figures.pace("cuda:0", "float32", 1024, 512) == 1.0


# -- figures_of prefers what was learned ----------------------------------------------------------------
def test_figures_prefer_the_learned_ones_and_say_how_many_jobs_taught_them():
    taught = (_series(3.0)
              .observed(Key(Kind.WORKER_START), 7.5, "2026-12-06 08:30 UTC")
              .observed(Key(Kind.DIRECT_READ), 0.4e9, "2026-12-06 08:30 UTC"))
    plain = replace(machine(cpus=8), calibration=replace(MEASURED, direct_read_bytes_per_s=1.5e9))
    figures, before = figures_of(replace(plain, learned=taught)), figures_of(plain)
    assert (figures.worker_start.value, figures.worker_start.source) == (7.5, "learned from 1 job (last 2026-12-06 08:30 UTC)")
    assert figures.direct_read.value == 0.4e9 and figures.direct_read.source.startswith("learned from 1 job")
    assert figures.disk_read == before.disk_read  # nothing learned of reads through the page cache
    # layers of the width the pace was learned on run 3x slower than calibrated; other widths as calibrated
    assert figures.flops("cpu", "float32", 8, 512, hidden=1024) == pytest.approx(
        before.flops("cpu", "float32", 8, 512, hidden=1024) / 3)
    assert figures.flops("cpu", "float32", 8, 512, hidden=4096) == before.flops("cpu", "float32", 8, 512, hidden=4096)
    lines = figures.describe(("cpu",), "float32")
    assert any(line.startswith("worker start-up 7.5 s (learned from 1 job") for line in lines)
    assert any(line.startswith("cpu float32 compute on 1024-wide layers took 3x the time the rate above predicts "
                               "at 512 tokens per forward (learned from 1 job") for line in lines)


def test_the_plan_predicts_with_the_learned_pace():
    hardware = replace(machine(cpus=8), calibration=MEASURED)
    before = make_plan(hardware, small_fp32(), Spec(storage="cpu"), [150] * 32).workers[0]
    batch = before.settings.batch_tokens
    taught = LearnedFigures("box", MEASURED.measured_at).observed(
        Key(Kind.COMPUTE, "cpu", "float32", 1024, batch), 3.0, "2026-12-06 08:00 UTC")
    after = make_plan(replace(hardware, learned=taught), small_fp32(), Spec(storage="cpu"), [150] * 32).workers[0]
    assert after.predicted_compute_seconds == pytest.approx(3 * before.predicted_compute_seconds, rel=0.05)


# -- the store ---------------------------------------------------------------------------------------------
def test_learned_figures_are_stored_per_machine_and_the_paces_belong_to_one_calibration(tmp_path):
    used = learned.load(tmp_path, "box", "2026-12-06 08:00 UTC")
    assert used.series == ()
    stored = learned.record(tmp_path, used, [(COMPUTE, 2.0), (Key(Kind.WORKER_START), 9.0)])
    again = learned.load(tmp_path, "box", "2026-12-06 08:00 UTC")
    assert again == stored and again.get(COMPUTE).value == 2.0
    # a new calibration: the paces measured against the old one go, the start-up stays
    fresh = learned.load(tmp_path, "box", "2026-12-07 10:00 UTC")
    assert fresh.get(COMPUTE) is None and fresh.get(Key(Kind.WORKER_START)).value == 9.0
    assert learned.load(tmp_path, "another box", "2026-12-06 08:00 UTC").series == ()
    learned.learned_path(tmp_path, "box").write_text("{not json")  # damaged: learned afresh, not an error
    assert learned.load(tmp_path, "box", "2026-12-06 08:00 UTC").series == ()


def test_hardware_with_learned_figures_round_trips_through_json():
    from flexorch.orchestrator.hardware import Hardware

    hardware = _taught(_series(2.0, 3.0).observed(Key(Kind.WORKER_START), 7.0, "2026-12-06 08:30 UTC"))
    assert Hardware.from_dict(json.loads(json.dumps(hardware.to_dict()))) == hardware


def test_calibrated_hardware_carries_the_learned_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXORCH_CALIBRATE", "1")
    monkeypatch.setattr(calibrate, "measure", lambda hardware, key, disk_dir: replace(MEASURED, machine=key))
    first = calibrate.calibrated(machine(), tmp_path)
    assert first.learned.series == () and first.learned.machine == first.calibration.machine
    learned.record(tmp_path, first.learned, [(Key(Kind.WORKER_START), 5.0)])
    assert figures_of(calibrate.calibrated(machine(), tmp_path)).worker_start.value == 5.0


# -- a job's pace ---------------------------------------------------------------------------------------
def _pace(**changes) -> pace.WorkerPace:
    base = pace.WorkerPace(name="worker0", device="cpu", tokens_per_forward=600.0, direct_reads=False,
                           predicted_seconds=20.0, seconds=22.0, predicted_compute=10.0, compute=5.0, start=12.0,
                           bytes_read=10 << 20, read_seconds=0.1, predicted_peak_ram=500_000_000,
                           peak_ram=450_000_000, predicted_peak_device=0, peak_device=0)
    return replace(base, **changes)


def _taught(learned_figures: LearnedFigures | None = None):
    return replace(machine(cpus=8), calibration=MEASURED,
                   learned=learned_figures or LearnedFigures("box", MEASURED.measured_at))


def test_a_compute_pace_is_learned_against_the_calibration_not_against_the_pace_used():
    # the plan already predicted with a pace of 2 (10 s); 5 s were measured: the calibration's 5 s were right
    used = _series(2.0, key=Key(Kind.COMPUTE, "cpu", "float32", 1024, 512))
    observed = dict(pace.observations([_pace()], _taught(used), "float32", 1024))
    assert observed == {Key(Kind.COMPUTE, "cpu", "float32", 1024, 512): pytest.approx(1.0),
                        Key(Kind.WORKER_START): 12.0, Key(Kind.BASE_RAM, "cpu"): MEASURED.worker_base_ram}


def test_reads_are_learned_only_around_the_page_cache_and_from_enough_bytes():
    direct = _pace(direct_reads=True, bytes_read=1 << 30, read_seconds=2.0)
    assert dict(pace.observations([direct], _taught(), "float32", 1024))[Key(Kind.DIRECT_READ)] == (1 << 30) / 2.0
    for unlearned in (replace(direct, direct_reads=False), replace(direct, bytes_read=1 << 20),
                      replace(direct, device="cuda:0")):
        assert Key(Kind.DIRECT_READ) not in dict(pace.observations([unlearned], _taught(), "float32", 1024))


def test_two_workers_give_one_observation_each_figure():
    observed = pace.observations([_pace(compute=4.0, start=10.0), _pace(name="worker1", compute=6.0, start=14.0),
                                  _pace(name="worker2", compute=5.0, start=11.0)], _taught(), "float32", 1024)
    assert dict(observed) == {Key(Kind.COMPUTE, "cpu", "float32", 1024, 512): 0.5, Key(Kind.WORKER_START): 14.0,
                              Key(Kind.BASE_RAM, "cpu"): MEASURED.worker_base_ram}


def test_a_peak_over_its_prediction_raises_the_fixed_memory_and_one_under_it_never_below_the_calibration():
    base = MEASURED.worker_base_ram  # 300 MB
    over = dict(pace.observations([_pace(peak_ram=700_000_000)], _taught(), "float32", 1024))
    assert over[Key(Kind.BASE_RAM, "cpu")] == base + 200_000_000  # 700 MB measured, 500 MB predicted
    raised = _taught(LearnedFigures("box", MEASURED.measured_at).observed(Key(Kind.BASE_RAM, "cpu"), base + 200_000_000,
                                                                         "2026-12-06 08:00 UTC"))
    assert figures_of(raised).base_ram["cpu"].value == base + 200_000_000
    plain = make_plan(_taught(), small_fp32(), Spec(storage="cpu"), [150] * 32).workers[0]
    assert make_plan(raised, small_fp32(), Spec(storage="cpu"), [150] * 32).workers[0].predicted_peak_ram == \
        plain.predicted_peak_ram + 200_000_000
    # a later job 150 MB under its prediction (made with the raised figure) brings it back 150 MB, and one far
    # under it no lower than the calibration
    under = dict(pace.observations([_pace(peak_ram=350_000_000)], raised, "float32", 1024))
    assert under[Key(Kind.BASE_RAM, "cpu")] == base + 50_000_000
    far = dict(pace.observations([_pace(peak_ram=100_000_000)], raised, "float32", 1024))
    assert far[Key(Kind.BASE_RAM, "cpu")] == base
    # a GPU worker: its device memory's fixed part likewise
    gpu = _pace(device="cuda:0", predicted_peak_device=4_000_000_000, peak_device=4_500_000_000)
    context = figures_of(_taught()).cuda_context.value
    assert dict(pace.observations([gpu], _taught(), "float32", 1024))[Key(Kind.CUDA_CONTEXT)] == context + 500_000_000


def test_a_prediction_missed_by_more_than_one_and_a_half_times_is_reported():
    missed = pace.missed_predictions([_pace(seconds=31.0), _pace(name="worker1", seconds=12.0, peak_ram=800_000_000),
                                      _pace(name="worker2", device="cuda:0", predicted_peak_device=4e9,
                                            peak_device=7e9)])
    assert [(m.worker, m.what.value, m.ratio) for m in missed] == [
        ("worker0", "time", 1.55), ("worker1", "time", 0.6), ("worker1", "peak RAM", 1.6),
        ("worker2", "peak GPU memory", 1.75)]
    assert missed[0].to_dict() == {"worker": "worker0", "what": "time", "predicted": 20.0, "measured": 31.0,
                                   "ratio": 1.55}
    assert missed[0].describe() == "prediction missed: worker0's time was 31.0 s against 20.0 s predicted (1.55x)"
    assert pace.missed_predictions([_pace(seconds=29.0)]) == []  # 1.45x: within


def test_only_workers_that_ran_their_whole_slice_in_one_go_are_measured():
    plan = make_plan(replace(machine(cpus=8), calibration=MEASURED), small_fp32(), Spec(storage="cpu"), [150] * 32)
    (wp,) = plan.workers

    def record(**changes) -> WorkerRecord:
        r = WorkerRecord(wp.name, wp.device, 32, 0, rounds=len(wp.rounds), seconds=19.0, wall_seconds=21.0,
                         engine_seconds=15.0, compute_seconds=14.0, status="finished", peak_rss=400_000_000)
        for name, value in changes.items():
            setattr(r, name, value)
        return r

    (measured,) = pace.worker_paces(plan, [record()], [150] * 32)
    assert (measured.seconds, measured.compute, measured.start) == (21.0, 14.0, 6.0)
    # 6,000 tokens a round in batches of at most batch_tokens
    rounds = [sum(150 for _ in r) for r in wp.rounds]
    assert measured.tokens_per_forward == pytest.approx(
        sum(t / -(-t // wp.settings.batch_tokens) for t in rounds) / len(rounds))
    for partial in (dict(prompts_reused=4), dict(status="failed"), dict(step_downs=[{"round": 0}]),
                    dict(shards_resumed=7)):
        assert pace.worker_paces(plan, [record(**partial)], [150] * 32) == []


# -- end to end: a calibration 10x too slow, corrected by one job ------------------------------------------------
def _slow_calibration(key: str) -> Calibration:
    """This machine's calibration, made 10x too slow: its layer rates measured now (256 wide: the demo
    model's width; short rounds) and divided by ten, and a start-up of a minute."""
    from flexorch.workers import calibrate as measuring

    points = measuring._flops([(256, "float32")], "cpu", (32, 256, 1024))
    throughput = tuple(Throughput(**{**{k: v for k, v in p.items() if k != "round_rates"},
                                     "flops_per_s": p["flops_per_s"] / 10}) for p in points)
    return Calibration(machine=key, measured_at="2026-12-06 08:00 UTC", seconds=1.0, worker_start_seconds=60.0,
                       worker_base_ram=400_000_000, throughput=throughput)


def test_one_job_corrects_a_calibration_ten_times_too_slow(tmp_path, monkeypatch, capsys):
    import flexorch
    from flexorch.orchestrator.demo import build_demo_model
    from flexorch.orchestrator.prepare import prepare_checkpoint
    from flexorch.workers import calibrate as measuring

    monkeypatch.setenv("FLEXORCH_CALIBRATE", "1")
    monkeypatch.setenv("FLEXORCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(measuring, "ROUND_SECONDS", 0.02)
    hardware = probe()
    key = calibrate.machine_key(hardware)
    cached = (tmp_path / "cache" / "calibration" / f"{calibrate._safe(key)}.v{calibrate.CALIBRATION_VERSION}.json")
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps(asdict(_slow_calibration(key))))
    model = tmp_path / "model.layers"
    prepare_checkpoint(build_demo_model(tmp_path / "model"), model)
    prompts = [{"prefix": f"Question {i}: what is the capital of France? The answer is", "suffixes": [" Paris", " Mars"]}
               for i in range(96)]  # compute outweighs the start-up, the noisier part on a shared machine

    def job(n: int):
        planned = flexorch.plan(model, prompts, score="suffix_logprob", devices="cpu")
        done = flexorch.score(model, prompts, score="suffix_logprob", devices="cpu", job_dir=tmp_path / f"job{n}")
        return planned, done.report

    first_plan, first = job(1)
    assert first_plan.workers[0].predicted_start_seconds == 60.0
    # the slow calibration's prediction missed, and the report and the last lines say so
    assert any(m["what"] == "time" and m["ratio"] < 1 / 1.5 for m in first["prediction_missed"])
    said = " ".join(capsys.readouterr().err.split())  # as one line, whatever the console's width
    assert "prediction missed: worker0's time was" in said and "the next plan uses what this job measured" in said
    second_plan, second = job(2)
    assert any(line.startswith("worker start-up") and "(learned from 1 job" in line for line in second_plan.figures)
    assert any("compute on 256-wide layers" in line for line in second_plan.figures)
    measured = second["workers"][0]["wall_seconds"]
    for name, planned, report in (("first", first_plan, first), ("second", second_plan, second)):
        w, r = planned.workers[0], report["workers"][0]
        print(f"{name}: predicted {w.predicted_seconds:.1f} s (start-up {w.predicted_start_seconds:.1f}, compute "
              f"{w.predicted_compute_seconds:.1f}), measured {r['wall_seconds']:.1f} s (outside the engine "
              f"{r['wall_seconds'] - r['engine_seconds']:.1f}, compute {r['compute_seconds']:.1f})")
    assert second_plan.workers[0].predicted_seconds == pytest.approx(measured, rel=0.25)


def test_a_plan_from_a_calibration_16x_too_slow_and_the_pace_one_job_learned_is_the_plan_of_the_true_rates():
    """Friction 11: a calibration taken under load (24 GFLOP/s against a quiet ~390) made every plan
    predict the compute ~16x too long, and choose by it. Corrected by the pace learned, the plan is the one
    the true rates make: the same settings, the same predicted compute."""
    slow = replace(MEASURED, throughput=tuple(replace(t, flops_per_s=t.flops_per_s / 16) for t in MEASURED.throughput))
    spec = Spec(generate_tokens=4)
    true_plan = make_plan(_taught(), small_fp32(), spec, [150] * 32).workers[0]
    slow_plan = make_plan(replace(_taught(), calibration=slow), small_fp32(), spec, [150] * 32).workers[0]
    assert slow_plan.predicted_compute_seconds > 10 * true_plan.predicted_compute_seconds
    assert slow_plan.settings != true_plan.settings  # it chose by the wrong figures (here: 1 layer per shard, not 2)
    # what one job measured at the true rate, against the slow plan
    ran = _pace(tokens_per_forward=1000.0, predicted_compute=slow_plan.predicted_compute_seconds,
                compute=true_plan.predicted_compute_seconds)
    taught = LearnedFigures("box", MEASURED.measured_at)
    hardware = replace(_taught(taught), calibration=slow)
    for key, value in pace.observations([ran], hardware, "float32", 1024):
        taught = taught.observed(key, value, "2026-12-06 08:00 UTC")
    corrected = make_plan(replace(hardware, learned=taught), small_fp32(), spec, [150] * 32).workers[0]
    assert corrected.settings == true_plan.settings
    # within the share of the compute that is not FLOPs (the disk store's copies: the pace scales the FLOPs' rate)
    assert corrected.predicted_compute_seconds == pytest.approx(true_plan.predicted_compute_seconds, rel=0.05)
