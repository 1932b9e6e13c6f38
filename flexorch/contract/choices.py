"""The job's choices as types: where activations wait, how devices share the work, which kind of
device runs a worker. StrEnums, so job files, plan.json and report.json keep their strings (a member
is its string) while the code asks the type instead of comparing names."""

from __future__ import annotations

from enum import StrEnum


class Storage(StrEnum):
    """Where a worker's activations (and keys/values) wait between shards; best first."""

    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"

    @property
    def on_device(self) -> bool:
        """Activations stay in the device's memory (the planner counts them there, not in RAM)."""
        return self is Storage.GPU

    @property
    def on_disk(self) -> bool:
        """Activations go to files (the planner counts them on disk, a batch in flight in RAM)."""
        return self is Storage.DISK

    @property
    def in_ram(self) -> bool:
        return self is Storage.CPU


class Parallel(StrEnum):
    """How a job's devices share the work: each scores its own prompts, or each runs its own shards."""

    DATA = "data"
    PIPELINE = "pipeline"
    AUTO = "auto"  # the job's choice only: the planner resolves it to data or pipeline


class DeviceKind(StrEnum):
    """The kind of a device string ("cpu", "cuda:1", "node1:cuda:0" on a Ray cluster)."""

    CPU = "cpu"
    CUDA = "cuda"

    @classmethod
    def of(cls, device: object) -> DeviceKind:
        """The kind of a device name or torch.device; a Ray node prefix and a GPU index are skipped."""
        parts = str(device).split(":")
        return cls(next(p for p in reversed(parts) if not p.isdigit()) if len(parts) > 1 else parts[0])

    @property
    def is_cpu(self) -> bool:
        return self is DeviceKind.CPU


def on_cpu(device: object) -> bool:
    """Whether a device name or torch.device is the CPU (the question most callers ask)."""
    return DeviceKind.of(device).is_cpu
