"""Calibration: measure this machine once and cache the figures the planner predicts with.

`calibrated(hardware)` attaches a `Calibration` to the probed `Hardware`: read from the cache
(`$FLEXORCH_CACHE/calibration/<machine>.v<N>.json`) when this machine was measured before, else measured
now (~10-15 s) and cached. What is measured: the cold read rate of the disk holding the cache (a
file written, evicted from the page cache with posix_fadvise(DONTNEED), read back in large reads once
the memory its pages freed has settled: `ColdReadProbe`), and, in a fresh process started as a worker is (workers/calibrate.py), the worker's start-up time and
fixed RSS, decoder-layer FLOP/s per device, dtype and batch, and on GPUs the host-to-device rate and
the CUDA context. Each measurement also records how quiet the machine was (`Conditions`: the spread
between the interleaved rounds of each point, the load average, CPU steal and other processes' CPU
time); a disturbed one is measured once more and, disturbed again, kept but marked unreliable, which
`flexorch probe` and the plan's figure sources say. Probing the hardware (hardware.py) stays apart, and the planner takes the result as
data. FLEXORCH_CALIBRATE=0 turns it off (the planner then uses its assumed figures; tests do this).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from flexorch.contract.directio import read_into
from flexorch.contract.atomic import atomic_write_text
from flexorch.orchestrator import learned
from flexorch.orchestrator.hardware import Calibration, Conditions, Hardware, Throughput

ENV_SWITCH = "FLEXORCH_CALIBRATE"
# Large enough that the drive's read-ahead and the first request's latency are a small share, small
# enough to write and read in ~1 s on a SATA SSD.
DISK_PROBE_BYTES = 256 << 20
READ_CHUNK_BYTES = 16 << 20
CHILD_TIMEOUT_S = 120
# Raised when what is measured changes (2: throughput per layer width, attention FLOPs counted; 3: the
# median over distinct batches, not the best run; 4: a long-row point per width, attention priced
# apart; 5: a GPU's fixed memory counts cuBLAS's workspaces), so a cache from before is measured again
# rather than read with the wrong meaning.
# 7: the cold read waits for freed memory to settle (ColdReadProbe). 8: the conditions are recorded (a
# cache from before was never checked for disturbance: one taken under load measured 24 GFLOP/s
# against a quiet 390 and every later plan predicted ~5x the compute time).
CALIBRATION_VERSION = 8
# A VM whose memory balloon has free page reporting (virtio balloon, feature bit 5) hands the pages the
# guest frees back to the host about 2 s later (the kernel's PAGE_REPORTING_DELAY); used again after
# that, each one faults in on the host. A file read right after its pages were dropped lands in the
# pages just freed, still backed, and reads far faster than a cold job does: on a 2-core VM a 2 GB file
# read at 1.3-2.5 GB/s at once and 0.5-0.6 GB/s 5 s (or a child process's run) later; 3 s was not
# quite enough (0.9-1.0). The probe reads no sooner than this after its eviction there.
FREED_MEMORY_SETTLE_S = 5.0
VIRTIO_DEVICES = Path("/sys/bus/virtio/devices")
PROC_STAT = Path("/proc/stat")
# A measurement is disturbed when any of these is exceeded. Spread: the interleaved rounds of one point
# see the same code and data, so beyond timer noise (a few % at ROUND_SECONDS) they differ only when
# something else took the cores during one of them. Load before: more runnable processes than half the
# cores means the measuring threads will share them. Steal: the hypervisor ran other guests on our
# cores. Others' CPU: what the machine's CPUs spent on processes other than ours while measuring.
MAX_ROUND_SPREAD = 1.25
MAX_LOAD_PER_CORE = 0.5
MAX_STEAL = 0.05
MAX_OTHERS_CPU = 0.25
_VIRTIO_BALLOON, _BALLOON_F_REPORTING = 5, 5  # device id; feature bit


def calibration_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") not in ("0", "off", "false")


def machine_key(hardware: Hardware) -> str:
    """What the figures belong to: a new GPU, CPU or core count is a new machine."""
    cpu = _cpu_model().replace(" ", "-")
    gpus = "+".join(g.name.replace(" ", "-") for g in hardware.gpus) or "nogpu"
    return f"{socket.gethostname()}_{cpu}_{hardware.cpu_count}c_{gpus}"


def cache_path(hardware: Hardware, cache_dir: Path) -> Path:
    return cache_dir / "calibration" / f"{_safe(machine_key(hardware))}.v{CALIBRATION_VERSION}.json"


def cached(hardware: Hardware, cache_dir: Path) -> tuple[Hardware, str]:
    """`hardware` with this machine's cached calibration, never measuring (`flexorch probe`), and a line
    saying where the figures come from: the cache (when it was taken is the calibration's own), or why
    plans use assumed ones."""
    if not calibration_enabled():
        return hardware, f"calibration is off ({ENV_SWITCH}=0): plans use assumed figures"
    path = cache_path(hardware, cache_dir)
    if not path.exists():
        return hardware, ("no calibration cached for this machine: plans use assumed figures until the next "
                          "`flexorch plan` or `submit` measures it (or `flexorch probe --calibrate` now)")
    return (_with_learned(hardware, Calibration.from_dict(json.loads(path.read_text())), cache_dir),
            f"cached in {path}; `flexorch probe --calibrate` measures again")


def calibrated(hardware: Hardware, cache_dir: Path, force: bool = False, console=None) -> Hardware:
    """`hardware` with its calibration: cached, or measured now and cached (`force`: always measured)."""
    if not calibration_enabled() and not force:
        return hardware
    key = machine_key(hardware)
    path = cache_path(hardware, cache_dir)
    if path.exists() and not force:
        return cached(hardware, cache_dir)[0]
    if console is not None:
        console.print(f"calibrating this machine once (cached in {path}; `flexorch probe --calibrate` redoes it)...")
    try:
        calibration = measure_quietly(hardware, key, cache_dir, console)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as exc:
        # the figures only sharpen the plan: without them it rests on the assumed ones, and says so
        if console is not None:
            from rich.markup import escape

            console.print(f"[yellow]calibration failed, planning with assumed figures: {escape(_why(exc))}[/]")
        return hardware
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(asdict(calibration), indent=1) + "\n")
    return _with_learned(hardware, calibration, cache_dir)


def _with_learned(hardware: Hardware, calibration: Calibration, cache_dir: Path) -> Hardware:
    """`hardware` with its calibration and what this machine's jobs have measured since (learned.py)."""
    return replace(hardware, calibration=calibration,
                   learned=learned.load(cache_dir, calibration.machine, calibration.measured_at))


def measure_quietly(hardware: Hardware, key: str, disk_dir: Path, console=None) -> Calibration:
    """A measurement; a disturbed one is taken once more, and if that is disturbed too it is kept
    (the figures still beat the assumed ones more often than not) but marked unreliable."""
    cores = os.cpu_count() or hardware.cpu_count  # the load average and /proc/stat count all of them
    calibration = measure(hardware, key, disk_dir)
    why = disturbance(calibration.conditions, cores)
    if not why:
        return calibration
    if console is not None:
        console.print(f"[yellow]the calibration was disturbed ({why}): measuring once more[/]")
    calibration = measure(hardware, key, disk_dir)
    why = disturbance(calibration.conditions, cores)
    if why and console is not None:
        console.print(f"[yellow]disturbed again ({why}): its figures are kept but marked unreliable; "
                      "`flexorch probe --calibrate` on a quieter machine replaces them[/]")
    return replace(calibration, unreliable=why)


def measure(hardware: Hardware, key: str, disk_dir: Path) -> Calibration:
    start = time.perf_counter()
    before = MachineLoad.now()
    with ColdReadProbe(disk_dir) as probe:  # its freed memory settles while the worker is measured
        worker = measure_worker(["cpu"] + [f"cuda:{g.index}" for g in hardware.gpus])
        disk = probe.read_rate()
        direct = probe.direct_read_rate()
    conditions = conditions_between(before, MachineLoad.now(), worker.get("round_rates", ()))
    return Calibration(
        machine=key, measured_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        seconds=round(time.perf_counter() - start, 1), disk_path=str(disk_dir), disk_read_bytes_per_s=disk,
        worker_start_seconds=worker["start_seconds"], worker_base_ram=worker["worker_base_ram"],
        throughput=tuple(Throughput(**t) for t in worker["throughput"]),
        host_to_device_bytes_per_s=tuple(tuple(p) for p in worker.get("host_to_device_bytes_per_s", ())),
        cuda_context_bytes=worker.get("cuda_context_bytes"), cuda_worker_base_ram=worker.get("cuda_worker_base_ram"),
        sha256_bytes_per_s=measure_sha256(), direct_read_bytes_per_s=direct, conditions=conditions,
    )


@dataclass(frozen=True)
class MachineLoad:
    """A snapshot of how busy the machine is: the 1-minute load average, and the CPU seconds of the
    whole machine (/proc/stat: busy, stolen, all) and of this process and its waited-for children."""

    load: float
    busy: float | None  # None where /proc/stat is not readable (not Linux)
    steal: float | None
    total: float | None
    ours: float

    @classmethod
    def now(cls, stat: Path = PROC_STAT) -> "MachineLoad":
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        ours = sum(u.ru_utime + u.ru_stime for u in usage)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        try:
            fields = [int(x) for x in stat.read_text().splitlines()[0].split()[1:9]]
        except (OSError, IndexError, ValueError):
            return cls(load, None, None, None, ours)
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = (x / tick for x in fields + [0] * (8 - len(fields)))
        return cls(load, user + nice + system + irq + softirq, steal, sum(fields) / tick, ours)


def round_spread(round_rates) -> float:
    """The median over the points of their fastest round's rate over their slowest's: a slow spell
    during one round touches every point measured in it (the rounds interleave them), while one
    point's noise does not move the median. 1.0 with fewer than two rounds."""
    spreads = [max(rates) / min(rates) for rates in round_rates if len(rates) > 1 and min(rates) > 0]
    return statistics.median(spreads) if spreads else 1.0


def conditions_between(before: MachineLoad, after: MachineLoad, round_rates) -> Conditions:
    steal = others = None
    if before.total is not None and after.total is not None and after.total > before.total:
        elapsed = after.total - before.total
        steal = (after.steal - before.steal) / elapsed
        others = max(0.0, (after.busy - before.busy) - (after.ours - before.ours)) / elapsed
    return Conditions(round_spread=round_spread(round_rates), load_before=before.load, load_after=after.load,
                      steal=steal, others_cpu=others)


def disturbance(conditions: Conditions | None, cpu_count: int) -> str:
    """Why a measurement taken in these conditions is not to be trusted; "" when it was quiet (or
    the conditions were not recorded). `cpu_count`: the machine's cores, not only those this process
    may use, as the load average and /proc/stat count them (a container pinned to a few cores of a
    busy host is judged by the host's load: the round spread is the direct sign)."""
    if conditions is None:
        return ""
    c, why = conditions, []
    if c.round_spread > MAX_ROUND_SPREAD:
        why.append(f"its rounds differed by up to {c.round_spread:.2f}x")
    if c.load_before > MAX_LOAD_PER_CORE * cpu_count:
        why.append(f"load average {c.load_before:.1f} on {cpu_count} cores before it")
    if c.steal is not None and c.steal > MAX_STEAL:
        why.append(f"{c.steal:.0%} of the CPU time stolen by the hypervisor")
    if c.others_cpu is not None and c.others_cpu > MAX_OTHERS_CPU:
        why.append(f"other processes used {c.others_cpu:.0%} of the CPU time meanwhile")
    return "; ".join(why)


def measure_sha256(size: int = 64 << 20) -> float:
    """Bytes/s of one thread hashing with sha256 in memory, as a worker verifies a layer file not
    marked verified yet (workers/layerfile.py): 1.8 GB/s with SHA-NI, a third of that without."""
    data = os.urandom(size)
    start = time.perf_counter()
    hashlib.sha256(data).digest()
    return size / (time.perf_counter() - start)


class ColdReadProbe:
    """A file of `size` random bytes written under `folder` and dropped from the page cache at once;
    `read_rate()` reads it back later, as a worker reads layer files, no sooner than the memory its
    pages freed has settled where the VM takes freed memory back (FREED_MEMORY_SETTLE_S). Removed on
    exit."""

    def __init__(self, folder: Path, size: int = DISK_PROBE_BYTES, settle_s: float | None = None):
        self.size = size
        self.settle_s = (FREED_MEMORY_SETTLE_S if returns_freed_memory() else 0.0) if settle_s is None else settle_s
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f".read-probe-{os.getpid()}"
        block = os.urandom(READ_CHUNK_BYTES)  # incompressible, for filesystems that compress
        try:
            with open(self.path, "wb") as f:
                for _ in range(size // READ_CHUNK_BYTES):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())  # dirty pages cannot be dropped
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except BaseException:
            self.close()
            raise
        self.evicted_at = time.monotonic()

    def __enter__(self) -> "ColdReadProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.path.unlink(missing_ok=True)

    def read_rate(self) -> float:
        wait = self.evicted_at + self.settle_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # one wait for the host to take the freed pages back, not a poll
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # as workers read layer files: the same rate
            start = time.perf_counter()
            while os.read(fd, READ_CHUNK_BYTES):
                pass
            return self.size / (time.perf_counter() - start)
        finally:
            os.close(fd)

    def direct_read_rate(self) -> float | None:
        """The file read around the page cache (O_DIRECT, as workers/fileread.py reads layer files) into
        one reused page-aligned buffer, the way a worker reads into its slots; None where refused. No
        wait: a direct read never lands in the page cache."""
        if not hasattr(os, "O_DIRECT"):  # Linux only
            return None
        with mmap.mmap(-1, READ_CHUNK_BYTES) as buffer:  # anonymous: page-aligned, as direct reads need
            start = time.perf_counter()
            if not read_into(self.path, self.size, memoryview(buffer), direct=True, chunk=READ_CHUNK_BYTES):
                return None  # this filesystem takes none
            return self.size / (time.perf_counter() - start)


def returns_freed_memory(devices: Path = VIRTIO_DEVICES) -> bool:
    """Whether this is a VM whose memory balloon reports free pages to the host (see
    FREED_MEMORY_SETTLE_S): a virtio balloon whose negotiated features (one '0'/'1' per bit) have bit 5."""
    try:
        for device in devices.iterdir():
            if int((device / "device").read_text(), 16) == _VIRTIO_BALLOON:
                features = (device / "features").read_text().strip()
                if len(features) > _BALLOON_F_REPORTING and features[_BALLOON_F_REPORTING] == "1":
                    return True
    except (OSError, ValueError):
        pass  # not Linux, or no virtio bus: nothing reported
    return False


def measure_worker(devices: list[str]) -> dict:
    """Run workers/calibrate.py as a worker process would start; its start-up is timed from here."""
    done = subprocess.run([sys.executable, "-m", "flexorch.workers.calibrate", "--devices", ",".join(devices)],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Start-up: the interpreter's start, then the imports up to a first forward (the child times those).
    result["start_seconds"] = _interpreter_seconds() + result.pop("import_seconds")
    return result


def _why(exc: Exception) -> str:
    """One line: what failed, and the last line the measuring process wrote to stderr."""
    if isinstance(exc, subprocess.CalledProcessError):
        tail = (exc.stderr or "").strip().splitlines()[-1:] or [f"exit status {exc.returncode}"]
        return f"the measuring process failed ({tail[0][:200]})"
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"the measuring process ran past {exc.timeout:.0f} s"
    return f"{type(exc).__name__}: {exc}"


def _interpreter_seconds() -> float:
    """A bare interpreter's start: the part of a worker's start-up before its imports."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in key)[:200]
