"""The job's choices as types: where activations wait, how devices share the work, which kind of
device runs a worker. StrEnums, so job files, plan.json and report.json keep their strings (a member
is its string) while the code asks the type instead of comparing names."""

from __future__ import annotations

import math
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


# Values per (minimum, step) pair of a compressed KV cache, as FlexGen's: a head dim's width or a part of it.
KV_GROUP = 64


class KVCompression(StrEnum):
    """How the KV cache's keys and values are kept in their tier between generation steps: as computed,
    or quantised to 8 or 4 bits per value, asymmetric, with a minimum and a step per group of
    KV_GROUP values (or fewer: `group`) along the head dim (FlexGen's cache compression; flexorch/weights/compression.py).
    Defined here, torch-free, because the planner sizes what the workers store."""

    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int:
        return {KVCompression.INT8: 8, KVCompression.INT4: 4}.get(self, 0)

    @staticmethod
    def group(key_dim: int, value_dim: int) -> int:
        """Values per group: the largest divisor of KV_GROUP dividing both widths, so no group mixes a
        key's values with a value's (their ranges differ)."""
        return math.gcd(KV_GROUP, key_dim, value_dim)

    def token_parts(self, heads: int, key_dim: int, value_dim: int, dtype_bytes: int) -> tuple[float, ...]:
        """Bytes of one token's keys and values in one layer's cache, per tensor a block is kept as:
        as computed; or the codes, and each group's minimum and step (in the cache's dtype)."""
        width = heads * (key_dim + value_dim)
        if self is KVCompression.NONE:
            return (width * dtype_bytes,)
        return width * self.bits / 8, width / self.group(key_dim, value_dim) * 2 * dtype_bytes

    def token_bytes(self, heads: int, key_dim: int, value_dim: int, dtype_bytes: int) -> float:
        """Bytes one token's keys and values take in one layer's cache (`token_parts` together)."""
        return sum(self.token_parts(heads, key_dim, value_dim, dtype_bytes))
