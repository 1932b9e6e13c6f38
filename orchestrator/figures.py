"""The machine's rates and fixed costs the planner predicts with, each measured or assumed.

`figures_of(hardware)` reads `Hardware.learned` (what this machine's jobs measured: learned.py),
then `Hardware.calibration` (orchestrator/calibrate.py measures it once per machine), and falls back,
figure by figure, to the constants below. Every figure keeps its source ("learned from N jobs (last
<when>)", "measured <when>" or "assumed: <why>") so `flexorch plan` can say which predictions rest on
what.
Pure: no I/O, no torch; the planner stays a function of (hardware, manifest, spec).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from flexorch.contract.choices import DeviceKind, on_cpu
from flexorch.orchestrator.hardware import Calibration, Hardware, Throughput, format_bytes, format_flops
from flexorch.orchestrator.learned import Key, Kind, LearnedFigures

MiB, GiB = 1 << 20, 1 << 30

# -- assumed constants, used where calibration has not measured the figure -----------------------
# A typical NVMe SSD's sequential read (SATA SSDs do ~0.5 GB/s, fast PCIe 4 NVMe 5-7 GB/s).
DEFAULT_DISK_READ_BYTES_PER_S = 2e9
# sha256 on one core: ~1.8 GB/s with SHA-NI (the EPYC VM of the benchmarks), ~0.6 GB/s without
DEFAULT_SHA256_BYTES_PER_S = 1e9
# Usable bytes/s per PCIe lane by generation, after protocol overhead (~80% of the raw rate).
PCIE_LANE_BYTES_PER_S = {1: 0.2e9, 2: 0.4e9, 3: 0.79e9, 4: 1.58e9, 5: 3.15e9}
DEFAULT_PCIE = (3, 16)  # links NVML cannot describe: a common gen3 x16 slot
# fp32 GEMM per core, sustained through whole decoder layers: measured 93 GFLOP/s per core on a
# 2.8 GHz AVX-512 Xeon (16 x 1024 Llama, batch 1024); AVX2-only cores reach about half. 80 errs
# slightly slow on the first and leaves the second within ~2x.
CPU_FLOPS_PER_CORE = 80e9
# Most CPUs have no native half-precision matmul (no AMX/AVX512-FP16) and upcast: about 2x slower.
CPU_HALF_SLOWDOWN = 2.0
# Sustained fp16/bf16 dense matmul FLOP/s, about 60% of the datasheet tensor peak. First match of a
# substring of the NVML name wins, so longer names come before their prefixes ("A100" before "A10").
GPU_HALF_FLOPS = (
    ("H200", 600e12), ("H100", 500e12), ("A100", 180e12), ("L40S", 200e12), ("L40", 110e12),
    ("A10", 75e12), ("L4", 70e12), ("4090", 100e12), ("3090", 45e12), ("V100", 70e12), ("T4", 35e12),
)
# An unknown card: assume a modest consumer GPU so predictions err on the slow side.
DEFAULT_GPU_HALF_FLOPS = 20e12
# fp32 runs on CUDA cores, not tensor cores (torch leaves TF32 matmul off): 2x-15x slower across
# cards; 8x is the middle.
GPU_FP32_SLOWDOWN = 8.0
# Throughput at a batch of b tokens relative to a large batch: b / (b + half). CPU: half = 100 tokens;
# on the 2-core Xeon 512 tokens ran 9% slower than 1024 (36.6 vs 33.5 s), this curve gives 8%.
# CUDA: half = 512 tokens, an assumption (tensor cores reach most of their rate from a few hundred
# rows of a wide matrix); calibration replaces both. Without a curve every batch would predict the
# same time and the memory tie-break would pick the smallest.
BATCH_HALF_SATURATION = {"cpu": 100, "cuda": 512}
# RSS of a worker before any weight: Python + torch + transformers measured at ~350 MB on CPU
# (torch 2.x); the CUDA runtime and cuBLAS/cuDNN images add several hundred MB on a GPU worker.
WORKER_BASE_RAM = {"cpu": 512 * MiB, "cuda": 1 * GiB}
# A GPU worker's fixed device memory: the CUDA context (driver state, module images), outside torch's
# allocator, 300-600 MB depending on driver and GPU, and cuBLAS's workspaces (tens of MB, inside it);
# take the high end (measured on an H100, driver 580, torch 2.11: 552 MB + 34 MB). Calibration
# measures both.
CUDA_CONTEXT_BYTES = 640 * MiB
# Spawn to first forward: interpreter, torch, transformers (9-14 s measured on the 2-core demo box
# with other jobs running; ~3 s on a quiet workstation). The slow end: a prediction should not flatter.
WORKER_START_SECONDS = 10.0
# Allocator caching/fragmentation and whatever the estimate misses: keep this share of each budget
# free. With the worker's fixed memory measured the estimate's error is the variable part's alone
# (within 5% on the benchmark shapes), so half the margin suffices; a 600 MB cap on a job needing
# ~550 MB is then met rather than refused.
SAFETY_FRACTION = {"assumed": 0.10, "measured": 0.05}


# The engine's cost per layer forward on a GPU beyond the calibrated layer's own (which a synchronised
# forward of one reference layer measures): the slope of the engine's time against its number of
# forwards in bench_gpu's batch grid, a 13B-shaped fp16 model on an H100 under a 6 GB cap (4096 ->
# 16384 tokens per forward: 0.8 ms per layer forward; at 2048 it ran slower still). Without it
# every batch from 1024 up predicted the same time and the memory tie-break chose 2048 tokens, which
# ran 1.63x the best batch's time. Not measured per machine yet (benchmarks/results/gpu-*.json), and
# measured before the engine stopped copying layout ids to the device per layer (a pipeline drain
# where a pass's layouts outgrow LAYOUT_CACHE_BYTES): the next GPU run re-fits it.
GPU_FORWARD_SECONDS = 0.8e-3


@dataclass(frozen=True)
class Figure:
    value: float
    source: str  # "learned from N jobs (last <UTC time>)" | "measured <UTC time>" | "assumed: <why>"

    @property
    def measured(self) -> bool:
        return self.source.startswith(("measured", "learned"))


@dataclass(frozen=True)
class Figures:
    """What the planner predicts with. Rates are per second; memory in bytes."""

    hardware: Hardware
    disk_read: Figure
    direct_read: Figure | None  # layer files read around the page cache (O_DIRECT); None: the filesystem refuses
    sha256: Figure  # hashing a layer file not verified yet, on the hash thread (workers/layerfile.py)
    worker_start: Figure
    base_ram: dict[str, Figure]  # "cpu" | "cuda"
    cuda_context: Figure
    learned: LearnedFigures | None = None  # compute paces by width and batch (`flops` applies them)

    @property
    def calibration(self) -> Calibration | None:
        return self.hardware.calibration

    @property
    def safety(self) -> float:
        return SAFETY_FRACTION["measured" if self.base_ram["cpu"].measured else "assumed"]

    def flops(self, device: str, dtype: str, threads: int, batch: int, hidden: int | None = None,
              token_flops: float | None = None, token_attention: float = 0.0) -> float:
        """FLOP/s through decoder layers of `token_flops` FLOPs per token, `token_attention` of them
        attention's (or else `hidden` wide; None: the widest measured) at `batch` tokens per forward:
        measured, then interpolated in log2(batch); else assumed. See `_layer_curve` and `_width_curve`."""
        # what this machine's jobs measured on layers this wide: seconds per second predicted
        pace = self.learned.pace(device, dtype, hidden, batch) if self.learned else 1.0
        kind = DeviceKind.of(device)
        by_width = self._measured_points(device, dtype)
        if by_width:
            curve = ((token_flops and _layer_curve(by_width, token_flops, token_attention))
                     or _width_curve(_short_rows(by_width), hidden, batch))
            rate = _interpolate(curve, batch, below=_proportional)
            return (rate * threads / self.hardware.cpu_count if kind.is_cpu else rate) / pace
        return self._assumed_peak(device, dtype, threads) * _saturation(batch, kind) / pace

    def flops_source(self, device: str, dtype: str) -> str:
        by_width = self._measured_points(device, dtype)
        if by_width:
            batches = sorted({t.batch_tokens for points in by_width.values() for t in points})
            return (f"measured at batches {', '.join(map(str, batches))} and widths "
                    f"{', '.join(map(str, sorted(by_width)))} ({_when(self.calibration)[len('measured '):]})")
        return "assumed: a table by device and dtype, not measured here"

    def learned_paces(self, device: str, dtype: str) -> list[str]:
        """One line per width this machine's jobs measured: how their compute ran against the rate above."""
        widths = sorted({s.key.hidden for s in self.learned.series if s.key.kind is Kind.COMPUTE
                         and s.key.device == device and s.key.dtype == dtype}) if self.learned else []
        lines = []
        for hidden in widths:
            paces = self.learned.compute(device, dtype, hidden)
            times, batches = (", ".join(f"{s.value:.2g}x" for s in paces), ", ".join(str(s.key.batch) for s in paces))
            jobs = max(len(s.observations) for s in paces)
            last = max(s.observations[-1].at for s in paces)
            lines.append(f"{device} {dtype} compute on {hidden}-wide layers took {times} the time the rate above "
                         f"predicts at {batches} tokens per forward (learned from {jobs} job{'s' if jobs > 1 else ''}, "
                         f"last {last})")
        return lines

    def host_to_device(self, device: str) -> Figure:
        measured = dict(self.calibration.host_to_device_bytes_per_s) if self.calibration else {}
        if device in measured:
            return Figure(measured[device], _when(self.calibration))
        gpu = next(g for g in self.hardware.gpus if f"cuda:{g.index}" == device)
        known = gpu.pcie_gen and gpu.pcie_width
        gen, width = (gpu.pcie_gen, gpu.pcie_width) if known else DEFAULT_PCIE
        lane = PCIE_LANE_BYTES_PER_S.get(gen, PCIE_LANE_BYTES_PER_S[max(PCIE_LANE_BYTES_PER_S)])
        return Figure(lane * width, f"assumed: PCIe gen{gen} x{width}{'' if known else ' (link not reported)'}")

    def describe(self, devices: tuple[str, ...], dtype: str) -> list[str]:
        """One line per figure the plan used: its value and whether it was measured."""
        lines = [f"disk read {format_bytes(self.disk_read.value)}/s cold ({self.disk_read.source})",
                 f"direct disk read {format_bytes(self.direct_read.value)}/s, around the page cache "
                 f"({self.direct_read.source})" if self.direct_read else "direct disk reads: refused by the filesystem",
                 f"sha256 {format_bytes(self.sha256.value)}/s, for layer files not verified yet ({self.sha256.source})",
                 f"worker start-up {self.worker_start.value:.1f} s ({self.worker_start.source})"]
        for kind in sorted({DeviceKind.of(d) for d in devices}):
            base = self.base_ram[kind]
            lines.append(f"{kind} worker fixed RAM {format_bytes(base.value)} ({base.source})")
        for device in dict.fromkeys(devices):
            rate = self.flops(device, dtype, self._all_threads(device), 1024)
            lines.append(f"{device} {dtype} throughput {format_flops(rate)} at 1024 tokens "
                         f"({self.flops_source(device, dtype)})")
            lines += self.learned_paces(device, dtype)
            if not on_cpu(device):
                link = self.host_to_device(device)
                lines.append(f"{device} host-to-device {format_bytes(link.value)}/s ({link.source})")
        if not all(on_cpu(d) for d in devices):
            lines.append(f"CUDA context {format_bytes(self.cuda_context.value)} ({self.cuda_context.source})")
        lines.append(f"safety margin {self.safety:.0%} of each memory budget "
                     f"({'the fixed memory is measured' if self.base_ram['cpu'].measured else 'nothing measured'})")
        return lines

    def _all_threads(self, device: str) -> int:
        return self.hardware.cpu_count if on_cpu(device) else 0

    def _measured_points(self, device: str, dtype: str) -> dict[int, list[Throughput]]:
        """Layer width → its measured points, sorted by batch."""
        by_width: dict[int, list[Throughput]] = {}
        for t in self.calibration.throughput if self.calibration else ():
            if t.device == device and t.dtype == dtype:
                by_width.setdefault(t.hidden, []).append(t)
        return {w: sorted(points, key=lambda t: t.batch_tokens) for w, points in by_width.items()}

    def _assumed_peak(self, device: str, dtype: str, threads: int) -> float:
        if on_cpu(device):
            return threads * CPU_FLOPS_PER_CORE / (1.0 if dtype == "float32" else CPU_HALF_SLOWDOWN)
        name = next(g.name for g in self.hardware.gpus if f"cuda:{g.index}" == device)
        half = next((flops for key, flops in GPU_HALF_FLOPS if key in name), DEFAULT_GPU_HALF_FLOPS)
        return half / GPU_FP32_SLOWDOWN if dtype == "float32" else half


# The batch cap per device kind (planner.BATCH_TOKENS_CAP): the assumed peak is reached there.
_SATURATION_CAP = {"cpu": 1024, "cuda": 16384}


def _saturation(batch: int, kind: str) -> float:
    """Throughput at `batch` relative to the device's batch cap (1.0 there)."""
    half, cap = BATCH_HALF_SATURATION[kind], _SATURATION_CAP[kind]
    return (batch / (batch + half)) / (cap / (cap + half))


def _proportional(x0: int, rate: float, x: int) -> float:
    """Below the smallest batch measured a forward is bound by reading its weights, not by its
    arithmetic: it takes as long as one of that batch, so the rate falls with the batch."""
    return rate * x / x0


def _short_rows(by_width: dict[int, list[Throughput]]) -> dict[int, list[Throughput]]:
    """Per width, one point per batch: the one on the shortest rows (the series every batch has)."""
    out = {}
    for width, points in by_width.items():
        shortest: dict[int, Throughput] = {}
        for t in points:
            if t.batch_tokens not in shortest or t.row_tokens < shortest[t.batch_tokens].row_tokens:
                shortest[t.batch_tokens] = t
        out[width] = [shortest[b] for b in sorted(shortest)]
    return out


def _seconds(t: Throughput) -> float:
    return t.forward_flops / t.flops_per_s


def _attention_cost(by_width: dict[int, list[Throughput]]) -> float | None:
    """Seconds per attention FLOP: a width measured at one batch on short rows and on one long row has
    the same weights' FLOPs in both, so the extra time is the extra attention's. The median over the
    widths that have both; None where none has (or the longer rows were not slower)."""
    import statistics

    costs = []
    for points in by_width.values():
        for long in points:
            short = [t for t in points if t.batch_tokens == long.batch_tokens and t.row_tokens < long.row_tokens]
            if short and long.attention_flops > short[0].attention_flops:
                costs.append((_seconds(long) - _seconds(short[0])) / (long.attention_flops - short[0].attention_flops))
    cost = statistics.median(costs) if costs else 0.0
    return cost if cost > 0 else None


def _layer_curve(by_width: dict[int, list[Throughput]], token_flops: float,
                 token_attention: float = 0.0) -> list[tuple[int, float]] | None:
    """(batch, FLOP/s) of a layer of `token_flops` FLOPs per token (`token_attention` of them
    attention's), at each batch measured at every width: a forward's seconds there are a fixed cost, a
    cost per weight FLOP fitted (least squares) to the reference layers of that batch, and a cost per
    attention FLOP (`_attention_cost`; where unmeasured, attention FLOPs cost as weight FLOPs do). So
    a layer narrower or wider than the references, or on longer rows, is priced by its own FLOPs (a
    narrow layer's fixed share is what slows it). None where that cannot be fitted: fewer than two
    widths, no recorded FLOPs per forward, or a wider layer measured no slower than a narrower one."""
    widths = sorted(by_width)
    if len(widths) < 2 or any(t.forward_flops <= 0 for points in by_width.values() for t in points):
        return None
    attention = _attention_cost(by_width)
    split = attention is not None  # the weights' FLOPs and attention's apart, else all alike
    short = _short_rows(by_width)
    at = {w: {t.batch_tokens: t for t in short[w]} for w in widths}
    curve = []
    for batch in sorted(set.intersection(*(set(points) for points in at.values()))):
        points = [at[w][batch] for w in widths]
        xs = [t.forward_flops - t.attention_flops if split else t.forward_flops for t in points]
        ys = [_seconds(t) - attention * t.attention_flops if split else _seconds(t) for t in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        spread = sum((x - mx) ** 2 for x in xs)
        per_flop = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / spread if spread else 0.0
        if per_flop <= 0:
            return None
        fixed = max(0.0, my - per_flop * mx)
        weights, scores = (token_flops - token_attention) * batch, token_attention * batch
        seconds = fixed + per_flop * weights + (attention if split else per_flop) * scores
        curve.append((batch, token_flops * batch / seconds))
    return curve or None


def _width_curve(by_width: dict[int, list[Throughput]], hidden: int | None, batch: int) -> list[tuple[int, float]]:
    """Without a layer's FLOPs: the rate at `batch` per width measured, interpolated in log2(width) at
    `hidden` (flat beyond the widths measured), as a one-point curve."""
    widths = sorted(by_width)
    rates = [(w, _interpolate([(t.batch_tokens, t.flops_per_s) for t in by_width[w]], batch, below=_proportional))
             for w in widths]
    return [(batch, _interpolate(rates, hidden or widths[-1]))]


def _interpolate(points: list[tuple[int, float]], x: int,
                 below: Callable[[int, float, int], float] = lambda x0, rate, x: rate) -> float:
    """The rate at `x` (a batch or a width): linear in log2(x) between measured points, flat above
    them, `below` (flat unless given) under them."""
    if x <= points[0][0]:
        return below(points[0][0], points[0][1], x)
    for (b0, r0), (b1, r1) in zip(points, points[1:]):
        if x <= b1:
            t = (math.log2(x) - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
            return r0 + t * (r1 - r0)
    return points[-1][1]


def _when(calibration: Calibration) -> str:
    """A calibrated figure's source: when, and whether the measurement was disturbed."""
    unreliable = f", unreliable: {calibration.unreliable}" if calibration.unreliable else ""
    return f"measured {calibration.measured_at}{unreliable}"


def figures_of(hardware: Hardware) -> Figures:
    calibration, learned = hardware.calibration, hardware.learned
    when = _when(calibration) if calibration else ""

    def pick(measured, assumed, why: str, key: Key | None = None) -> Figure:
        series = learned.get(key) if learned and key else None
        if series is not None:
            return Figure(series.value, series.source)
        return Figure(float(measured), when) if measured is not None else Figure(float(assumed), f"assumed: {why}")

    disk = hardware.disk_read_bytes_per_s
    disk_read = (Figure(disk, "given with the hardware") if disk else
                 pick(calibration and calibration.disk_read_bytes_per_s, DEFAULT_DISK_READ_BYTES_PER_S,
                      "a typical NVMe SSD"))
    if calibration and not disk:
        # None: refused by the filesystem, so no job reads around the cache either
        direct = calibration.direct_read_bytes_per_s
        direct_read = None if direct is None else pick(direct, None, "", Key(Kind.DIRECT_READ))
    else:
        direct_read = Figure(disk_read.value, "assumed: the disk read rate")
    return Figures(
        hardware=hardware, disk_read=disk_read, direct_read=direct_read,
        sha256=pick(calibration and calibration.sha256_bytes_per_s, DEFAULT_SHA256_BYTES_PER_S,
                    "one core hashing, between SHA-NI's rate and a core without it"),
        worker_start=pick(calibration and calibration.worker_start_seconds, WORKER_START_SECONDS,
                          "import of torch and transformers on a slow machine", Key(Kind.WORKER_START)),
        base_ram={"cpu": pick(calibration and calibration.worker_base_ram, WORKER_BASE_RAM["cpu"],
                              "Python, torch and transformers", Key(Kind.BASE_RAM, "cpu")),
                  "cuda": pick(calibration and calibration.cuda_worker_base_ram, WORKER_BASE_RAM["cuda"],
                               "Python, torch, transformers and the CUDA runtime", Key(Kind.BASE_RAM, "cuda"))},
        cuda_context=pick(calibration and calibration.cuda_context_bytes, CUDA_CONTEXT_BYTES,
                          "the high end of 300-600 MB across drivers and GPUs, with cuBLAS's workspaces",
                          Key(Kind.CUDA_CONTEXT)),
        learned=learned,
    )
