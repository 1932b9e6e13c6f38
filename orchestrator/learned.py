"""The figures this machine's own jobs measured of it, kept beside its calibration and preferred to it.

A calibration is one measurement, taken once: on a busy machine it can be far off (24 GFLOP/s
measured against a quiet 390, and every later plan predicted ~5x the compute time). Every job
measures its own pace (orchestrator/pace.py) and records it here, per machine, in
`$FLEXORCH_CACHE/learned/<machine>.json`; `figures_of` (figures.py) prefers a learned figure to the
calibrated one and says "learned from N jobs (last <when>)". What is learned:

- compute: the pace of a model's decoder layers (by device, dtype, layer width and tokens per
  forward) as the ratio of the measured compute seconds to what the calibration predicted. A ratio,
  not a FLOP rate: the calibration's curves keep their shape over batch sizes and the job corrects
  their level. By width, because the engine's costs beyond the layers' FLOPs (scoring, the head,
  Python per forward) weigh far more on a narrow model (a 256-wide demo model computed ~50x slower
  than its FLOPs at the calibrated rate say): a pace applies to layers of the width it was measured on.
  Relative to one calibration: a new calibration starts the paces afresh.
- worker start-up: spawn to Finished less the engine's own seconds, the slowest worker of the job.
- direct reads: layer files read around the page cache (a read through it says nothing of the disk
  once the files are cached).
- a worker's fixed memory (RAM; on a GPU, device memory): what the plan used for it plus what the
  measured peak exceeded the predicted one by, never below the calibrated figure. The predicted
  peaks are upper bounds (a demo job peaked at 450 MB against 563 MB predicted), so only a job that
  went over raises it, and later ones that stayed under bring it back.

Robust to one noisy job: each figure is the median of its last WINDOW jobs, and with an even count
the older of the two middle ones. One job 10x off cannot move it (beside one other it is the newer
of the two; from three on the median drops it), while two jobs that agree on a change carry it.
Chosen over an exponentially weighted mean, which a single 10x job moves by 10^weight unless an
outlier rule rejects it, and then a real change needs a second rule to be believed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from flexorch.contract.atomic import atomic_write_text

WINDOW = 5  # jobs per figure: enough for a median to drop two noisy ones, recent enough to follow a change
VERSION = 1
DIR = "learned"


class Kind(str, Enum):
    COMPUTE = "compute"  # measured compute seconds / the calibration's prediction: > 1 is slower
    WORKER_START = "worker_start"  # seconds
    DIRECT_READ = "direct_read"  # bytes/s
    BASE_RAM = "base_ram"  # a worker's fixed RAM, bytes, by device kind ("cpu" | "cuda")
    CUDA_CONTEXT = "cuda_context"  # a GPU worker's fixed device memory, bytes


@dataclass(frozen=True)
class Key:
    kind: Kind
    device: str = ""  # compute: "cpu" | "cuda:N"
    dtype: str = ""
    hidden: int = 0  # the layers' width
    batch: int = 0  # tokens per forward, rounded to a power of two


@dataclass(frozen=True)
class Observation:
    value: float
    at: str  # UTC, as calibrations say it


@dataclass(frozen=True)
class Series:
    """One figure's last WINDOW observations, oldest first."""

    key: Key
    observations: tuple[Observation, ...]

    @property
    def value(self) -> float:
        """The median, and of an even count the older of the middle two (see the module docstring)."""
        ordered = sorted(range(len(self.observations)), key=lambda i: self.observations[i].value)
        middle = ordered[(len(ordered) - 1) // 2: len(ordered) // 2 + 1]
        return self.observations[min(middle)].value

    @property
    def source(self) -> str:
        n = len(self.observations)
        return f"learned from {n} job{'s' if n > 1 else ''} (last {self.observations[-1].at})"


@dataclass(frozen=True)
class LearnedFigures:
    machine: str  # as the calibration names it
    calibration: str  # when the calibration the compute paces are relative to was measured
    series: tuple[Series, ...] = field(default=())

    def get(self, key: Key) -> Series | None:
        return next((s for s in self.series if s.key == key), None)

    def compute(self, device: str, dtype: str, hidden: int | None) -> list[Series]:
        """The compute paces learned for layers `hidden` wide, by batch."""
        return sorted((s for s in self.series if s.key.kind is Kind.COMPUTE and s.key.device == device
                       and s.key.dtype == dtype and s.key.hidden == hidden), key=lambda s: s.key.batch)

    def pace(self, device: str, dtype: str, hidden: int | None, batch: float) -> float:
        """Seconds measured per second the calibration predicts at `batch` tokens per forward: linear
        in log2(batch) between the learned batches (in log space: a ratio), flat beyond; 1.0 where
        nothing was learned for this width."""
        points = [(s.key.batch, math.log(s.value)) for s in self.compute(device, dtype, hidden)]
        if not points:
            return 1.0
        if batch <= points[0][0]:
            return math.exp(points[0][1])
        for (b0, p0), (b1, p1) in zip(points, points[1:]):
            if batch <= b1:
                return math.exp(p0 + (p1 - p0) * math.log2(batch / b0) / math.log2(b1 / b0))
        return math.exp(points[-1][1])

    def observed(self, key: Key, value: float, at: str) -> "LearnedFigures":
        """With one more job's observation of `key` (the oldest beyond WINDOW dropped)."""
        old = self.get(key)
        kept = (old.observations if old else ())[-(WINDOW - 1):] + (Observation(float(value), at),)
        others = tuple(s for s in self.series if s.key != key)
        return replace(self, series=others + (Series(key, kept),))

    def to_dict(self) -> dict:
        return {"version": VERSION, "machine": self.machine, "calibration": self.calibration,
                "series": [{"key": {**vars(s.key), "kind": s.key.kind.value},
                            "observations": [[o.value, o.at] for o in s.observations]} for s in self.series]}

    @classmethod
    def from_dict(cls, data: dict) -> "LearnedFigures":
        series = tuple(Series(Key(**{**s["key"], "kind": Kind(s["key"]["kind"])}),
                              tuple(Observation(float(v), str(at)) for v, at in s["observations"]))
                       for s in data.get("series", ()))
        return cls(str(data["machine"]), str(data["calibration"]), series)


def learned_path(cache_dir: Path, machine: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in machine)[:200]
    return cache_dir / DIR / f"{safe}.json"


def load(cache_dir: Path, machine: str, calibration: str) -> LearnedFigures:
    """This machine's learned figures; the compute paces only if learned against `calibration` (the
    when of the calibration in use). A file that is missing, unreadable or of another version: none."""
    path = learned_path(cache_dir, machine)
    empty = LearnedFigures(machine, calibration)
    try:
        data = json.loads(path.read_text())
        learned = LearnedFigures.from_dict(data) if data.get("version") == VERSION else empty
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not there, or damaged: start afresh
        return empty
    if learned.calibration != calibration:
        kept = tuple(s for s in learned.series if s.key.kind is not Kind.COMPUTE)
        learned = LearnedFigures(machine, calibration, kept)
    return replace(learned, machine=machine)


def record(cache_dir: Path, used: LearnedFigures, observations: list[tuple[Key, float]]) -> LearnedFigures:
    """Add one job's observations to the machine's file (re-read under a lock: jobs finishing at once
    each add theirs); returns what is stored now."""
    path = learned_path(cache_dir, used.machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with _locked(path.with_suffix(".lock")):
        learned = load(cache_dir, used.machine, used.calibration)
        for key, value in observations:
            learned = learned.observed(key, value, at)
        atomic_write_text(path, json.dumps(learned.to_dict(), indent=1) + "\n")
    return learned


@contextlib.contextmanager
def _locked(path: Path):
    if os.name != "posix":  # no fcntl: two jobs finishing in the same instant may lose one's figures
        yield
        return
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
