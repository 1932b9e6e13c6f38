"""A finished job's measured pace against its plan: what missed the prediction, and what the machine
learns from it (orchestrator/learned.py).

Per worker that ran its whole slice in this run, in one go (none reused, no step-down): its time
from spawn to Finished against the plan's predicted seconds, its peaks against the predicted
peaks, and its engine's compute seconds, read rate and start-up (the time outside the engine). A
prediction missed by more than MISS_RATIO either way is reported (report.json's
`prediction_missed`, and the CLI's last lines); the next plan is corrected by the learned figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum
from typing import Iterable, Sequence

from flexorch.contract.choices import DeviceKind, Parallel, on_cpu
from flexorch.orchestrator.figures import figures_of
from flexorch.orchestrator.hardware import Hardware, format_bytes
from flexorch.orchestrator.learned import Key, Kind

MISS_RATIO = 1.5
# Fewer bytes than this read around the page cache time the request latency more than the disk.
MIN_LEARNED_READ_BYTES = 64 << 20


@dataclass(frozen=True)
class WorkerPace:
    """One worker's measured figures beside its plan's predictions."""

    name: str
    device: str
    tokens_per_forward: float  # the mean over its rounds: a round's tokens over its batches
    direct_reads: bool
    predicted_seconds: float
    seconds: float  # spawn to Finished, as the controller saw it
    predicted_compute: float
    compute: float  # the engine's seconds not spent waiting for weights
    start: float  # seconds outside the engine: start-up, and each round's set-up and commit
    bytes_read: int
    read_seconds: float
    predicted_peak_ram: int
    peak_ram: int
    predicted_peak_device: int
    peak_device: int


class Predicted(str, Enum):
    TIME = "time"  # seconds
    PEAK_RAM = "peak RAM"  # bytes
    PEAK_DEVICE = "peak GPU memory"  # bytes


@dataclass(frozen=True)
class Missed:
    worker: str
    what: Predicted
    predicted: float
    measured: float

    @property
    def ratio(self) -> float:
        return self.measured / self.predicted

    def to_dict(self) -> dict:
        return {"worker": self.worker, "what": self.what.value, "predicted": self.predicted,
                "measured": self.measured, "ratio": round(self.ratio, 3)}

    def describe(self) -> str:
        show = (lambda x: f"{x:.1f} s") if self.what is Predicted.TIME else format_bytes
        return (f"prediction missed: {self.worker}'s {self.what.value} was {show(self.measured)} against "
                f"{show(self.predicted)} predicted ({self.ratio:.2f}x)")


def worker_paces(plan, records: Iterable, round_tokens: Sequence[int]) -> list[WorkerPace]:
    """`plan`'s data workers that ran their whole slice in this run, each with what it measured (a
    round resumed from a checkpoint computed only its rest: not a measure of the plan's figures).
    `records`: the controller's WorkerRecords; `round_tokens[i]`: prompt i's tokens."""
    if plan.parallel is not Parallel.DATA:  # a pipeline stage computes a share of each pass: not its plan's figures
        return []
    by_name = {r.name: r for r in records}
    paces = []
    for wp in plan.workers:
        r = by_name.get(wp.name)
        if (r is None or r.status != "finished" or r.prompts_reused or r.shards_resumed or r.step_downs
                or not r.wall_seconds):
            continue
        paces.append(WorkerPace(
            wp.name, wp.device, _tokens_per_forward(wp.rounds, round_tokens, wp.settings.batch_tokens),
            bool(wp.settings.direct_reads), wp.predicted_seconds, r.wall_seconds, wp.predicted_compute_seconds,
            r.compute_seconds, max(0.0, r.wall_seconds - r.engine_seconds), r.bytes_read, r.read_seconds,
            wp.predicted_peak_ram, r.peak_rss, wp.predicted_peak_device_memory, r.peak_device_memory))
    return paces


def _tokens_per_forward(rounds, round_tokens: Sequence[int], batch_tokens: int) -> float:
    per_round = [sum(round_tokens[i] for i in indices) for indices in rounds]
    forwards = [t / math.ceil(t / batch_tokens) for t in per_round if t > 0]
    return sum(forwards) / len(forwards) if forwards else float(batch_tokens)


def missed_predictions(paces: Sequence[WorkerPace]) -> list[Missed]:
    checks = []
    for p in paces:
        checks += [Missed(p.name, Predicted.TIME, p.predicted_seconds, p.seconds),
                   Missed(p.name, Predicted.PEAK_RAM, p.predicted_peak_ram, p.peak_ram)]
        if not on_cpu(p.device):
            checks.append(Missed(p.name, Predicted.PEAK_DEVICE, p.predicted_peak_device, p.peak_device))
    return [m for m in checks if m.predicted > 0 and m.measured > 0
            and not 1 / MISS_RATIO <= m.ratio <= MISS_RATIO]


def observations(paces: Sequence[WorkerPace], hardware: Hardware, dtype: str, hidden: int) -> list[tuple[Key, float]]:
    """What the machine learns from these workers, planned for `hardware` (its learned figures the
    ones the plan used). A compute pace is relative to the calibration: the plan predicted with the
    pace learned so far, so the calibration alone predicted predicted_compute x that."""
    used = hardware.learned
    figures, calibrated = figures_of(hardware), figures_of(replace(hardware, learned=None))
    learned: dict[Key, list[float]] = {}
    for p in paces:
        kind = DeviceKind.of(p.device)
        learned.setdefault(Key(Kind.BASE_RAM, kind), []).append(max(
            calibrated.base_ram[kind].value, figures.base_ram[kind].value + p.peak_ram - p.predicted_peak_ram))
        if not kind.is_cpu and p.peak_device:
            learned.setdefault(Key(Kind.CUDA_CONTEXT), []).append(max(
                calibrated.cuda_context.value, figures.cuda_context.value + p.peak_device - p.predicted_peak_device))
        if p.predicted_compute > 0 and p.compute > 0:
            batch = 2 ** round(math.log2(max(1.0, p.tokens_per_forward)))
            pace = used.pace(p.device, dtype, hidden, p.tokens_per_forward) * p.compute / p.predicted_compute
            learned.setdefault(Key(Kind.COMPUTE, p.device, dtype, hidden, batch), []).append(pace)
        if kind.is_cpu and p.direct_reads and p.bytes_read >= MIN_LEARNED_READ_BYTES and p.read_seconds > 0:
            # on a GPU the loader's seconds include the copy to the device: not the disk's alone
            learned.setdefault(Key(Kind.DIRECT_READ), []).append(p.bytes_read / p.read_seconds)
    if paces:  # the job waited for its slowest worker's start
        learned[Key(Kind.WORKER_START)] = [max(p.start for p in paces)]
    # one observation per figure and job: of several workers' (two CPU workers, say), the middle one;
    # of their fixed memory, the largest (the figure sizes every worker)
    memory = (Kind.BASE_RAM, Kind.CUDA_CONTEXT)
    return [(key, max(values) if key.kind in memory else sorted(values)[len(values) // 2])
            for key, values in learned.items()]
