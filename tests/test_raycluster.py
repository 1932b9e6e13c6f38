"""orchestrator/raycluster.py without a cluster: what a node's check of the model dir finds, and what
the planner may schedule on a node. (Probing and connecting run in tests/test_rayexecutor.py.)"""

from __future__ import annotations

import hashlib
import shutil

import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")

from flexorch.contract.manifest import MANIFEST_NAME, read_manifest  # noqa: E402
from flexorch.orchestrator.hardware import GpuInfo, Hardware  # noqa: E402
from flexorch.orchestrator.raycluster import model_problem, schedulable  # noqa: E402


def _digest(model_dir) -> str:
    return hashlib.sha256((model_dir / MANIFEST_NAME).read_bytes()).hexdigest()


@pytest.fixture
def model(tmp_path, layerwise):
    copy = tmp_path / "model.layers"
    shutil.copytree(layerwise("llama"), copy)
    return copy


def test_the_same_model_at_the_same_path_passes(model):
    assert model_problem(str(model), _digest(model)) is None


def test_a_missing_model_dir_names_the_manifest(model, tmp_path):
    assert model_problem(str(tmp_path / "elsewhere"), _digest(model)) == (
        f"cannot read {tmp_path / 'elsewhere' / MANIFEST_NAME} (No such file or directory)")


def test_another_manifest_is_refused(model):
    assert "differs from the controller's" in model_problem(str(model), "0" * 64)


def test_a_truncated_layer_file_is_named_with_both_sizes(model):
    entry = next(e for e in read_manifest(model).layers if e.file)
    path = model / entry.file
    path.write_bytes(path.read_bytes()[:100])
    problem = model_problem(str(model), _digest(model))
    assert f"file {entry.file} is 100 bytes, the manifest says {entry.bytes}" in problem


def test_a_node_offers_what_ray_may_schedule_there():
    gpus = tuple(GpuInfo(i, "NVIDIA A100", 80 * 10**9, 80 * 10**9, 4, 16) for i in range(4))
    hardware = Hardware(gpus=gpus, ram_total=10**12, ram_available=10**12, cpu_count=64, disk_path="/", disk_free=10**12)
    # `ray start --num-gpus=2 --num-cpus=8` on a 4-GPU, 64-core machine:
    offered = schedulable(hardware, {"GPU": 2.0, "CPU": 8.0, "memory": 1e11})
    assert [g.index for g in offered.gpus] == [0, 1] and offered.cpu_count == 8
    assert schedulable(hardware, {"CPU": 8.0}).gpus == ()
