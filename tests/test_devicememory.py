"""A worker's fixed GPU memory: NVML's account of this process where it names it, else the device's
memory in use beside torch's reservation. CUDA and NVML are described by fakes here (the code that
reads them runs unchanged); tests/test_gpu.py measures a real GPU."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from flexorch.workers import devicememory

MB = 10**6
CUDA = torch.device("cuda:0")


class FakeNvml(types.SimpleNamespace):
    class NVMLError(Exception):
        pass

    def __init__(self, processes=(), fail_init=False):
        super().__init__(processes=list(processes), fail_init=fail_init, asked=[])

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("driver not loaded")

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.asked.append(uuid)
        return uuid

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes]


@pytest.fixture
def gpu(monkeypatch):
    """A GPU of 80 GB with 10 GB in use, 2 GB of it reserved by this process's torch."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70_000 * MB, 80_000 * MB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2_000 * MB)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(uuid="0b61ac95-7269-eb12-cb0a-bcca692a9ce2"))

    def install(nvml):
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
        return nvml

    return install


def test_a_cpu_has_no_fixed_device_memory():
    assert devicememory.fixed_bytes(torch.device("cpu")) == 0


def test_nvml_s_account_of_this_process_less_torch_s_reservation_is_its_context(gpu):
    nvml = gpu(FakeNvml([(os.getpid() + 1, 7_000 * MB), (os.getpid(), 2_550 * MB)]))
    assert devicememory.fixed_bytes(CUDA) == 550 * MB  # not the other process's 7 GB
    assert nvml.asked == ["GPU-0b61ac95-7269-eb12-cb0a-bcca692a9ce2"]


@pytest.mark.parametrize("nvml", [FakeNvml([(1, 7_000 * MB)]), FakeNvml([(os.getpid(), None)]),
                                  FakeNvml(fail_init=True), None],
                         ids=["not listed", "not accounted", "no driver", "no nvidia-ml-py"])
def test_without_nvml_s_account_the_device_s_memory_in_use_beside_torch_counts(gpu, nvml):
    gpu(nvml)  # None in sys.modules: `import pynvml` raises ImportError
    assert devicememory.own_bytes(CUDA) is None
    assert devicememory.fixed_bytes(CUDA) == 8_000 * MB  # 10 GB in use less this process's 2 GB reserved
