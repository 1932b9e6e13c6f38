"""What this process holds of a GPU beside torch's allocator: its CUDA context.

The engine reports a worker's peak GPU memory as that fixed part plus torch's peak allocation, the
quantity the planner predicts and a `limits.gpu_memory` caps. The fixed part is read from NVML's
per-process accounting where it names this process; otherwise (no NVML, or a PID namespace that
hides the process) it is the device's memory in use beside torch's reservation, which also counts
whatever other processes hold on that GPU.
"""

from __future__ import annotations

import os

import torch

from flexorch.contract.choices import on_cpu


def fixed_bytes(device: torch.device) -> int:
    """This process's memory on `device` outside torch's allocator; 0 on a CPU."""
    if on_cpu(device):
        return 0
    free, total = torch.cuda.mem_get_info(device)  # creates the context if none exists yet
    reserved = torch.cuda.memory_reserved(device)
    own = own_bytes(device)
    return max(0, own - reserved) if own is not None else total - free - reserved


def own_bytes(device: torch.device) -> int | None:
    """This process's memory on `device` as NVML accounts it (context and allocations), or None
    where NVML cannot tell. NVML lists a process once it has a context on the device."""
    try:
        import pynvml as nvml
    except ImportError:
        return None
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    try:
        nvml.nvmlInit()
    except (nvml.NVMLError, OSError):
        return None
    try:
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == os.getpid():
                return process.usedGpuMemory  # None where the driver does not account per process
        return None
    except nvml.NVMLError:
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
