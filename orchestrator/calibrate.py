"""Calibration: measure this machine once and cache the figures the planner predicts with.

`calibrated(hardware)` attaches a `Calibration` to the probed `Hardware`: read from the cache
(`$FLEXORCH_CACHE/calibration/<machine>.v<N>.json`) when this machine was measured before, else measured
now (~10-15 s) and cached. What is measured: the cold read rate of the disk holding the cache (a
file written, evicted from the page cache with posix_fadvise(DONTNEED), read back in large reads),
and, in a fresh process started as a worker is (workers/calibrate.py), the worker's start-up time and
fixed RSS, decoder-layer FLOP/s per device, dtype and batch, and on GPUs the host-to-device rate and
the CUDA context. Probing the hardware (hardware.py) stays apart, and the planner takes the result as
data. FLEXORCH_CALIBRATE=0 turns it off (the planner then uses its assumed figures; tests do this).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from flexorch.contract.atomic import atomic_write_text
from flexorch.orchestrator.hardware import Calibration, Hardware, Throughput

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
CALIBRATION_VERSION = 6


def calibration_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") not in ("0", "off", "false")


def machine_key(hardware: Hardware) -> str:
    """What the figures belong to: a new GPU, CPU or core count is a new machine."""
    cpu = _cpu_model().replace(" ", "-")
    gpus = "+".join(g.name.replace(" ", "-") for g in hardware.gpus) or "nogpu"
    return f"{socket.gethostname()}_{cpu}_{hardware.cpu_count}c_{gpus}"


def calibrated(hardware: Hardware, cache_dir: Path, force: bool = False, console=None) -> Hardware:
    """`hardware` with its calibration: cached, or measured now and cached (`force`: always measured)."""
    if not calibration_enabled() and not force:
        return hardware
    key = machine_key(hardware)
    path = cache_dir / "calibration" / f"{_safe(key)}.v{CALIBRATION_VERSION}.json"
    if path.exists() and not force:
        return replace(hardware, calibration=Calibration.from_dict(json.loads(path.read_text())))
    if console is not None:
        console.print(f"calibrating this machine once (cached in {path}; `flexorch probe --calibrate` redoes it)...")
    try:
        calibration = measure(hardware, key, cache_dir)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as exc:
        # the figures only sharpen the plan: without them it rests on the assumed ones, and says so
        if console is not None:
            from rich.markup import escape

            console.print(f"[yellow]calibration failed, planning with assumed figures: {escape(_why(exc))}[/]")
        return hardware
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(asdict(calibration), indent=1) + "\n")
    return replace(hardware, calibration=calibration)


def measure(hardware: Hardware, key: str, disk_dir: Path) -> Calibration:
    start = time.perf_counter()
    disk = measure_disk(disk_dir)
    worker = measure_worker(["cpu"] + [f"cuda:{g.index}" for g in hardware.gpus])
    return Calibration(
        machine=key, measured_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        seconds=round(time.perf_counter() - start, 1), disk_path=str(disk_dir), disk_read_bytes_per_s=disk,
        worker_start_seconds=worker["start_seconds"], worker_base_ram=worker["worker_base_ram"],
        throughput=tuple(Throughput(**t) for t in worker["throughput"]),
        host_to_device_bytes_per_s=tuple(tuple(p) for p in worker.get("host_to_device_bytes_per_s", ())),
        cuda_context_bytes=worker.get("cuda_context_bytes"), cuda_worker_base_ram=worker.get("cuda_worker_base_ram"),
        sha256_bytes_per_s=measure_sha256(),
    )


def measure_sha256(size: int = 64 << 20) -> float:
    """Bytes/s of one thread hashing with sha256 in memory, as a worker verifies a layer file not
    marked verified yet (workers/layerfile.py): 1.8 GB/s with SHA-NI, a third of that without."""
    data = os.urandom(size)
    start = time.perf_counter()
    hashlib.sha256(data).digest()
    return size / (time.perf_counter() - start)


def measure_disk(folder: Path, size: int = DISK_PROBE_BYTES) -> float:
    """Bytes/s reading a just-written file whose pages were dropped from the page cache."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".read-probe-{os.getpid()}"
    block = os.urandom(READ_CHUNK_BYTES)  # incompressible, for filesystems that compress
    try:
        with open(path, "wb") as f:
            for _ in range(size // READ_CHUNK_BYTES):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())  # dirty pages cannot be dropped
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # as workers read layer files: the same rate
            start = time.perf_counter()
            while os.read(fd, READ_CHUNK_BYTES):
                pass
            return size / (time.perf_counter() - start)
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)


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
