"""What the planner sees of the machine: GPUs (from NVML), RAM, CPU cores and free disk.

Probing is kept apart from planning (as accelerate keeps `get_max_memory` apart from
`infer_auto_device_map`): `probe()` is the only function here that touches the machine, and the
planner takes its `Hardware` result as plain data, so tests describe machines instead of needing
them. No torch import: `flexorch probe` must stay fast and work with no CUDA at all.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from flexorch.orchestrator.learned import LearnedFigures


@dataclass(frozen=True)
class GpuInfo:
    index: int  # the index torch will use ("cuda:N"): position in CUDA_VISIBLE_DEVICES, not NVML's
    name: str
    total_memory: int  # bytes
    free_memory: int  # bytes, at probe time
    pcie_gen: int | None  # current link generation; None where NVML cannot say
    pcie_width: int | None  # current link width (lanes)


@dataclass(frozen=True)
class Throughput:
    """FLOP/s measured through whole decoder layers on one device in one dtype at one batch size and
    layer width (FLOPs: 2 x params per token, plus attention's 4 x row length x hidden)."""

    device: str  # "cpu" (all its cores) | "cuda:N"
    dtype: str
    batch_tokens: int
    flops_per_s: float
    hidden: int = 1024  # the reference layer's width (narrow layers run far below a wide one's rate)
    forward_flops: float = 0.0  # FLOPs of one measured forward (0: not recorded)
    attention_flops: float = 0.0  # of those, attention's (scores and weighted sum)
    row_tokens: int = 256  # the length of the measured forward's rows


@dataclass(frozen=True)
class Conditions:
    """How quiet the machine was while it was calibrated (orchestrator/calibrate.py judges them)."""

    round_spread: float  # the median over the measured points of their fastest round's rate / slowest's
    load_before: float  # 1-minute load average before measuring (after: it includes the measurement's own)
    load_after: float
    steal: float | None = None  # share of the CPU time the hypervisor gave to other guests; None: not reported
    others_cpu: float | None = None  # share of the machine's CPU time other processes used meanwhile


@dataclass(frozen=True)
class Calibration:
    """Figures measured on this machine (orchestrator/calibrate.py), cached per machine. The
    planner reads them as data; a figure left None (or a device/dtype with no Throughput) falls
    back to the planner's assumed constant, and `flexorch plan` says which is which."""

    machine: str  # what the figures belong to: host, CPU model and cores, GPU names
    measured_at: str  # UTC, ISO 8601
    seconds: float  # how long measuring took
    disk_path: str = ""  # where the read rate was measured
    disk_read_bytes_per_s: float | None = None  # cold: the page cache dropped with posix_fadvise(DONTNEED)
    worker_start_seconds: float | None = None  # process spawn to torch + transformers imported and a first forward
    worker_base_ram: int | None = None  # RSS of a CPU worker then: interpreter, torch, transformers, kernels
    throughput: tuple[Throughput, ...] = ()
    host_to_device_bytes_per_s: tuple[tuple[str, float], ...] = ()  # ("cuda:N", pinned copy rate)
    cuda_context_bytes: int | None = None  # a worker's fixed device memory: the context and cuBLAS's workspaces
    cuda_worker_base_ram: int | None = None  # RSS of a GPU worker once its CUDA context is up
    sha256_bytes_per_s: float | None = None  # one thread hashing in memory: what a verifying read adds
    direct_read_bytes_per_s: float | None = None  # the same file read around the page cache (O_DIRECT); None: refused
    conditions: Conditions | None = None  # None: not recorded
    unreliable: str = ""  # why the figures are not to be trusted (disturbed twice); "" when quiet

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        conditions = Conditions(**data["conditions"]) if data.get("conditions") else None
        return cls(**{**data, "throughput": tuple(Throughput(**t) for t in data.get("throughput", ())),
                      "host_to_device_bytes_per_s": tuple(tuple(p) for p in data.get("host_to_device_bytes_per_s", ())),
                      "conditions": conditions})


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[GpuInfo, ...]
    ram_total: int  # bytes
    ram_available: int  # bytes, at probe time (psutil's "available": free + reclaimable cache)
    cpu_count: int  # cores this process may run on
    disk_path: str  # where activations would go
    disk_free: int  # bytes free there
    disk_read_bytes_per_s: float | None = None  # measured sequential read rate; None: calibration's or a default
    calibration: Calibration | None = None  # measured figures; None: the planner's assumed constants
    learned: LearnedFigures | None = None  # what this machine's jobs measured (orchestrator/learned.py)

    def to_dict(self) -> dict:
        return {**asdict(self), "learned": self.learned.to_dict() if self.learned else None}

    @classmethod
    def from_dict(cls, data: dict) -> "Hardware":
        gpus = tuple(GpuInfo(**gpu) for gpu in data.get("gpus", ()))
        calibration = Calibration.from_dict(data["calibration"]) if data.get("calibration") else None
        learned = LearnedFigures.from_dict(data["learned"]) if data.get("learned") else None
        return cls(**{**data, "gpus": gpus, "calibration": calibration, "learned": learned})


@dataclass(frozen=True)
class Node:
    """One machine of a Ray cluster (orchestrator/raycluster.py probes them)."""

    name: str  # "node0", ...: the head first, then by address; a device on it is "node1:cuda:0"
    address: str  # its IP address
    node_id: str  # Ray's node id (hex): where the executor places the node's workers
    hardware: Hardware  # as probed on the node, GPUs and cores capped to what Ray may schedule there

    def to_dict(self) -> dict:
        return asdict(self)


def probe(disk_path: Path = Path("."), nvml=None, environ: dict | None = None) -> Hardware:
    """Describe this machine. `nvml` (default: the `pynvml` module) and `environ` (default:
    `os.environ`) are parameters so tests can describe GPUs and CUDA_VISIBLE_DEVICES."""
    import psutil

    environ = os.environ if environ is None else environ
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:  # nvidia-ml-py not installed: report CPU only
            nvml = None
    gpus = probe_gpus(nvml, environ.get("CUDA_VISIBLE_DEVICES")) if nvml is not None else ()
    memory = psutil.virtual_memory()
    existing = _nearest_existing(Path(disk_path))
    return Hardware(
        gpus=gpus,
        ram_total=int(memory.total),
        ram_available=int(memory.available),
        cpu_count=_cpu_count(),
        disk_path=str(existing),
        disk_free=int(shutil.disk_usage(existing).free),
    )


def probe_gpus(nvml, visible: str | None) -> tuple[GpuInfo, ...]:
    """GPUs as torch will number them. No driver, no GPU or any NVML error: no GPUs, silently
    (CPU-only machines are a supported case, not a warning)."""
    try:
        nvml.nvmlInit()
    except (nvml.NVMLError, OSError):  # no driver / library: NVMLError_LibraryNotFound, or a broken install
        return ()
    try:
        count = nvml.nvmlDeviceGetCount()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        order = visible_nvml_indices(visible, count, lambda: [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles])
        return tuple(
            info for position, nvml_index in enumerate(order)
            if (info := _gpu_info(nvml, handles[nvml_index], position)) is not None
        )
    except nvml.NVMLError:
        return ()
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def visible_nvml_indices(visible: str | None, count: int, uuids) -> list[int]:
    """NVML indices of the GPUs CUDA will expose, in CUDA's order, given CUDA_VISIBLE_DEVICES.

    `uuids()` returns every GPU's UUID in NVML order (called only when an entry names a UUID).
    Like the CUDA runtime: entries are indices or (prefixes of) "GPU-..." UUIDs, and the list
    stops at the first entry that is invalid, unknown or repeated ("-1" hides every GPU).
    MIG entries are not mapped (a MIG slice's memory is not its parent's): they stop the list.
    Assumes CUDA_DEVICE_ORDER=PCI_BUS_ID order equals NVML's, true on single-model machines.
    """
    if visible is None:
        return list(range(count))
    all_uuids = None
    order: list[int] = []
    for entry in (part.strip() for part in visible.split(",")):
        if entry.lstrip("-").isdigit():
            found = int(entry) if 0 <= int(entry) < count else None
        elif entry.startswith("GPU-"):
            all_uuids = all_uuids if all_uuids is not None else uuids()
            matches = [i for i, uuid in enumerate(all_uuids) if uuid.startswith(entry)]
            found = matches[0] if len(matches) == 1 else None
        else:
            found = None
        if found is None or found in order:
            break
        order.append(found)
    return order


def _gpu_info(nvml, handle, position: int) -> GpuInfo | None:
    try:
        name = _text(nvml.nvmlDeviceGetName(handle))
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    except nvml.NVMLError:  # a GPU NVML cannot describe (fallen off the bus): the planner cannot use it
        return None
    return GpuInfo(
        index=position,
        name=name,
        total_memory=int(memory.total),
        free_memory=int(memory.free),
        pcie_gen=_optional(nvml, nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
        pcie_width=_optional(nvml, nvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
    )


def _optional(nvml, query, handle) -> int | None:
    # PCIe queries are "not supported" on some boards (SXM, vGPU): the planner then assumes a default.
    try:
        return int(query(handle))
    except nvml.NVMLError:
        return None


def _text(value) -> str:
    # Older pynvml releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else str(value)


def _cpu_count() -> int:
    # Respect the affinity mask (taskset, cgroups via schedulers): os.cpu_count() counts cores we
    # may not run on, and over-threading a worker slows it down.
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _nearest_existing(path: Path) -> Path:
    """`path` or its nearest existing parent: the disk folder may not be created yet."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def format_bytes(n: float) -> str:
    """Decimal units, as in job files (`limits: 6GB` is 6 x 10^9 bytes) and GPU datasheets: "5.40 GB"."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def format_flops(rate: float) -> str:
    """Three significant digits in the largest unit the rate reaches ("123 GFLOP/s", "420 MFLOP/s"):
    whole GFLOP/s would print a slow CPU half-precision rate as "0 GFLOP/s"."""
    if rate <= 0:
        return "0 FLOP/s"
    unit, scale = next(((u, s) for u, s in (("TFLOP/s", 1e12), ("GFLOP/s", 1e9), ("MFLOP/s", 1e6)) if rate >= s),
                       ("MFLOP/s", 1e6))
    value = rate / scale
    return f"{value:.{max(0, 2 - math.floor(math.log10(value)))}f} {unit}"
