"""The example job files in configs/: each loads through the job spec and plans on the machine it
describes, with a Llama-2-70B-shaped manifest (the model and prompts they name need not exist:
the test copies each file into a temporary folder beside stub files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from flexorch.orchestrator.planner import make_plan
from flexorch.orchestrator.spec import load_job
from test_planner import GB, gpu, llama2_70b, machine

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SIX_GB = gpu(0, "NVIDIA GeForce RTX 2060", 6 * GB)
TWENTY_FOUR_GB = (gpu(0, "NVIDIA GeForce RTX 3090", 24 * GB), gpu(1, "NVIDIA GeForce RTX 3090", 24 * GB))
PROMPT_TOKENS = [300] * 400  # 400 prompts of 300 packed tokens


def load_copy(name: str, tmp_path: Path):
    """The job file `name`, copied into tmp_path/configs beside stubs of the model dir and prompts."""
    job = tmp_path / "configs" / name
    job.parent.mkdir()
    shutil.copy(CONFIGS / name, job)
    raw = yaml.safe_load(job.read_text())
    (job.parent / raw["model"]).mkdir(parents=True)
    prompts = job.parent / raw["prompts"]
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text('{"prefix": "Q", "suffixes": [" A"]}\n')
    return load_job(job)


def test_workstation_70b_on_6gb_streams_layer_by_layer(tmp_path):
    spec = load_copy("workstation-70b-6gb.yaml", tmp_path)
    assert (spec.limits.gpu_memory, spec.limits.ram, spec.devices) == (6 * GB, 8 * GB, ("cuda:0",))
    plan = make_plan(machine(SIX_GB, ram=16 * GB), llama2_70b(), spec, PROMPT_TOKENS)
    (worker,) = plan.workers
    assert (worker.settings.layers_per_shard, worker.settings.storage, worker.settings.batch_tokens) == (1, "cpu", 4096)
    assert worker.predicted_peak_device_memory <= 0.9 * 6 * GB
    assert worker.predicted_peak_ram <= 0.9 * 8 * GB


def test_two_gpus_split_the_prompts(tmp_path):
    spec = load_copy("two-gpus.yaml", tmp_path)
    plan = make_plan(machine(*TWENTY_FOUR_GB), llama2_70b(), spec, PROMPT_TOKENS)
    assert [w.device for w in plan.workers] == ["cuda:0", "cuda:1"]
    assert [w.prompt_indices for w in plan.workers] == [tuple(range(200)), tuple(range(200, 400))]
    assert all(w.predicted_peak_ram <= 0.9 * 16 * GB for w in plan.workers)  # 32 GB shared by two


def test_two_gpus_needs_two_gpus(tmp_path):
    from flexorch.contract.errors import UserError

    spec = load_copy("two-gpus.yaml", tmp_path)
    with pytest.raises(UserError, match="devices: cuda:1 not present"):
        make_plan(machine(SIX_GB), llama2_70b(), spec, PROMPT_TOKENS)


def test_disk_storage_writes_activations_to_its_disk_folder(tmp_path):
    spec = load_copy("disk-storage.yaml", tmp_path)
    plan = make_plan(machine(SIX_GB, disk_free=200 * GB), llama2_70b(), spec, PROMPT_TOKENS)
    (worker,) = plan.workers
    assert worker.settings.storage == "disk"
    assert Path(worker.settings.disk_folder).resolve() == (tmp_path / "scratch" / "activations" / "worker0").resolve()


@pytest.mark.parametrize("name", ["workstation-70b-6gb.yaml", "two-gpus.yaml", "disk-storage.yaml"])
def test_each_config_is_documented(name):
    text = (CONFIGS / name).read_text()
    assert text.startswith("#") and "flexorch plan configs/" + name in text
