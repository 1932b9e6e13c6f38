"""The hardware probe on described machines: a fake NVML stands in for the driver."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from flexorch.orchestrator.hardware import GpuInfo, Hardware, probe, probe_gpus, visible_nvml_indices
from flexorch.orchestrator.render import render_hardware

GB = 10**9


class FakeNvml:
    """The few pynvml functions the probe calls, over a list of described GPUs."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus, fail_init: bool = False, fail_count: bool = False):
        self.gpus = gpus  # dicts: name, uuid, total, free, and optionally pcie (gen, width) or None
        self.fail_init, self.fail_count = fail_init, fail_count
        self.initialised = self.shut_down = False

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")
        self.initialised = True

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        if self.fail_count:
            raise self.NVMLError("Unknown Error")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, handle):
        return self.gpus[handle]["name"].encode()  # older pynvml returns bytes

    def nvmlDeviceGetUUID(self, handle):
        return self.gpus[handle]["uuid"]

    def nvmlDeviceGetMemoryInfo(self, handle):
        gpu = self.gpus[handle]
        return SimpleNamespace(total=gpu["total"], free=gpu["free"], used=gpu["total"] - gpu["free"])

    def _pcie(self, handle, field):
        link = self.gpus[handle].get("pcie", (4, 16))
        if link is None:
            raise self.NVMLError("Not Supported")
        return link[field]

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle):
        return self._pcie(handle, 0)

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle):
        return self._pcie(handle, 1)


def two_gpus(**kwargs) -> FakeNvml:
    return FakeNvml([
        {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-aaaa1111", "total": 80 * GB, "free": 79 * GB},
        {"name": "NVIDIA GeForce RTX 3090", "uuid": "GPU-bbbb2222", "total": 24 * GB, "free": 23 * GB,
         "pcie": None},
    ], **kwargs)


def test_all_gpus_in_nvml_order_without_cuda_visible_devices(tmp_path):
    hw = probe(tmp_path, nvml=two_gpus(), environ={})
    assert hw.gpus == (
        GpuInfo(0, "NVIDIA A100-SXM4-80GB", 80 * GB, 79 * GB, 4, 16),
        GpuInfo(1, "NVIDIA GeForce RTX 3090", 24 * GB, 23 * GB, None, None),  # PCIe query not supported
    )


def test_cuda_visible_devices_renumbers_as_torch_does(tmp_path):
    nvml = two_gpus()
    hw = probe(tmp_path, nvml=nvml, environ={"CUDA_VISIBLE_DEVICES": "1"})
    (only,) = hw.gpus
    assert (only.index, only.name, only.total_memory) == (0, "NVIDIA GeForce RTX 3090", 24 * GB)
    assert nvml.shut_down


@pytest.mark.parametrize("visible, expected", [
    ("1,0", [1, 0]),
    ("GPU-bbbb", [1]),  # a unique UUID prefix
    ("GPU-", []),  # ambiguous prefix: CUDA stops there
    ("0,7,1", [0]),  # an index that does not exist ends the list
    ("0,0", [0]),  # a repeat ends it too
    ("", []),
    ("-1", []),
    ("MIG-1234", []),
    (" 1 ", [1]),
])
def test_visible_nvml_indices(visible, expected):
    assert visible_nvml_indices(visible, 2, lambda: ["GPU-aaaa1111", "GPU-bbbb2222"]) == expected


def test_no_driver_means_cpu_only_silently(tmp_path, recwarn, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    nvml = two_gpus(fail_init=True)
    hw = probe(tmp_path, nvml=nvml, environ={})
    assert hw.gpus == ()
    assert not nvml.shut_down  # never initialised
    assert len(recwarn) == 0 and caplog.records == []
    assert capsys.readouterr() == ("", "")


def test_nvml_failing_after_init_means_no_gpus_and_still_shuts_down():
    nvml = two_gpus(fail_count=True)
    assert probe_gpus(nvml, None) == ()
    assert nvml.shut_down


def test_probe_with_the_real_nvml_on_this_machine_does_not_raise_or_warn(tmp_path, recwarn):
    hw = probe(tmp_path)
    assert hw.ram_total > 0 and hw.cpu_count >= 1 and hw.disk_free > 0
    assert len(recwarn) == 0


def test_disk_free_of_a_folder_not_created_yet_comes_from_its_parent(tmp_path):
    hw = probe(tmp_path / "job" / "activations", nvml=FakeNvml([]), environ={})
    assert hw.disk_path == str(tmp_path)
    assert hw.gpus == ()


def test_hardware_to_dict_is_json_and_round_trips(tmp_path):
    hw = probe(tmp_path, nvml=two_gpus(), environ={})
    data = json.loads(json.dumps(hw.to_dict()))
    assert data["gpus"][1]["name"] == "NVIDIA GeForce RTX 3090"
    assert Hardware.from_dict(data) == hw


def test_render_hardware_names_each_gpu_and_says_cpu_only_without_one(tmp_path):
    from rich.console import Console

    console = Console(record=True, width=160)
    render_hardware(probe(tmp_path, nvml=two_gpus(), environ={}), console)
    render_hardware(probe(tmp_path, nvml=FakeNvml([]), environ={}), console)
    text = console.export_text()
    assert "cuda:1" in text and "NVIDIA GeForce RTX 3090" in text and "80.00 GB" in text
    assert "CPU only" in text
