"""What the planner decides: a `Plan` of one `WorkerPlan` per worker, frozen, printable
(orchestrator/render.py) and serialisable (`to_dict`/`from_dict`: the job dir's plan.json, report.json).

Each worker's settings come with the predictions they were chosen by (peak device memory and RAM,
seconds reading, computing, starting and filling) and the reasons, so a run can be held against
its plan. A parallel: auto plan keeps both modes' predictions (`ModePrediction`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flexorch.contract.choices import Parallel
from flexorch.contract.protocol import EngineSettings
from flexorch.orchestrator.durations import describe_time

# Activation batches a pipeline channel holds before its sender blocks: one being received while the
# next is computed keeps the receiver busy; more would only add memory (a pipeline plan's
# `channel_batches`, the capacity the controller makes the channels with).
PIPELINE_CHANNEL_BATCHES = 2


@dataclass(frozen=True)
class WorkerPlan:
    name: str  # "worker0", ...
    device: str  # "cpu" | "cuda:N"
    settings: EngineSettings
    prompt_indices: tuple[int, ...]  # this worker's contiguous slice of the job's prompts
    rounds: tuple[tuple[int, ...], ...]  # consecutive groups of prompt_indices: one engine call each
    predicted_peak_device_memory: int  # bytes; 0 on CPU
    predicted_peak_ram: int  # bytes
    predicted_read_seconds: float
    predicted_compute_seconds: float
    reasons: tuple[str, ...]
    node: str = ""  # executor ray: its node ("node1"; `device` is then "node1:cuda:0"); "": this machine
    predicted_fill_seconds: float = 0.0  # reading no compute hides: each round's first shards
    predicted_start_seconds: float = 0.0  # process start to the first forward
    predicted_pass_shares: tuple[float, ...] = ()  # each shard's share of a pass's time (progress); () equal
    predicted_checkpoint_seconds: float = 0.0  # writing the rounds' checkpoints (planner/checkpoints.py)

    @property
    def predicted_seconds(self) -> float:
        """Reading and computing overlap (double buffer): the slower one sets the pace, after the
        start-up and the reads that nothing hides."""
        return (self.predicted_start_seconds + self.predicted_fill_seconds + self.predicted_checkpoint_seconds
                + max(self.predicted_read_seconds, self.predicted_compute_seconds))


@dataclass(frozen=True)
class ModePrediction:
    """One parallel mode's predicted time: its slowest worker's, in the parts `WorkerPlan` has."""

    parallel: Parallel  # data or pipeline
    workers: int
    read_seconds: float
    compute_seconds: float
    start_seconds: float = 0.0
    fill_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        """The slowest worker's `predicted_seconds`: the time the plan's table shows for it."""
        return self.start_seconds + self.fill_seconds + max(self.read_seconds, self.compute_seconds)

    def describe(self) -> str:
        what = ("stage" if self.parallel is Parallel.PIPELINE else "worker") + ("s" if self.workers > 1 else "")
        return (f"{self.parallel} ({self.workers} {what}): "
                + describe_time(self.start_seconds, self.fill_seconds, self.read_seconds, self.compute_seconds)
                + (" for the slowest" if self.workers > 1 else ""))


@dataclass(frozen=True)
class Plan:
    parallel: Parallel  # data or pipeline (every worker is a stage, in ring order)
    dtype: str  # compute dtype of every worker
    workers: tuple[WorkerPlan, ...]
    reasons: tuple[str, ...]
    predictions: tuple[ModePrediction, ...] = ()  # the modes considered (both under parallel: auto)
    figures: tuple[str, ...] = ()  # the rates and fixed costs predicted with, each measured or assumed
    channel_batches: int = 0  # pipeline: activation batches each stage's outbound channel holds; data: 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        workers = tuple(
            WorkerPlan(**{
                **w,
                "settings": EngineSettings(**w["settings"]),
                "prompt_indices": tuple(w["prompt_indices"]),
                "rounds": tuple(tuple(r) for r in w["rounds"]),
                "reasons": tuple(w["reasons"]),
                "predicted_pass_shares": tuple(w.get("predicted_pass_shares", ())),
            })
            for w in data["workers"]
        )
        predictions = tuple(ModePrediction(**{**p, "parallel": Parallel(p["parallel"])})
                            for p in data.get("predictions", ()))
        # a plan written before the field: its pipeline ran with the constant
        parallel = Parallel(data["parallel"])
        channels = data.get("channel_batches", PIPELINE_CHANNEL_BATCHES if parallel is Parallel.PIPELINE else 0)
        return cls(parallel=parallel, dtype=data["dtype"], workers=workers, reasons=tuple(data["reasons"]),
                   predictions=predictions, figures=tuple(data.get("figures", ())), channel_batches=channels)
