"""Models by name (orchestrator/hub.py): a hub id read from a Hugging Face cache laid out here by hand,
offline; the one-line refusal when it is absent; what a download would fetch and the disk check
before it. No test opens a socket beyond loopback (the fixture below refuses any other)."""

from __future__ import annotations

import shutil
import socket
from collections import namedtuple
from pathlib import Path

import pytest

from flexorch.contract.errors import UserError
from flexorch.contract.manifest import read_manifest
from flexorch.orchestrator.cli import main
from flexorch.orchestrator.hub import (NEEDED_PATTERNS, SPARE_BYTES, DownloadPlan, cached_snapshot, check_space,
                                      download_plan, is_hub_id)
from flexorch.orchestrator.spec import load_job

from test_controller import write_job

REVISION = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny-org/Tiny-Llama"


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and self.family != socket.AF_UNIX:
            raise AssertionError(f"a test opened a socket to {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, checkpoint) -> Path:
    """HF_HUB_CACHE with REPO's main revision as huggingface_hub lays it out (files by their name in
    snapshots/<revision>/, refs/main naming it), offline."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    shutil.copytree(checkpoint("llama"), repo / "snapshots" / REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_ids_are_told_from_paths():
    assert is_hub_id("deepseek-ai/DeepSeek-V3") and is_hub_id("openai/gpt-oss-120b")
    assert not is_hub_id("./models/llama") and not is_hub_id("/data/llama") and not is_hub_id("llama")
    assert not is_hub_id("a/b/c")


def test_prepare_reads_a_hub_id_from_the_cache(hub_cache, checkpoint, tmp_path):
    assert main(["prepare", REPO, str(tmp_path / "by-name")]) == 0
    by_name = read_manifest(tmp_path / "by-name")
    assert by_name.source == str(hub_cache / f"models--tiny-org--Tiny-Llama/snapshots/{REVISION}")
    by_path = read_manifest(main(["prepare", str(checkpoint("llama")), str(tmp_path / "by-path")]) == 0
                            and tmp_path / "by-path")
    assert [e.sha256 for e in by_name.layers] == [e.sha256 for e in by_path.layers]


def test_a_job_naming_a_hub_id_runs_the_cached_snapshot(hub_cache, tmp_path):
    spec = load_job(write_job(tmp_path, REPO))
    assert spec.model == hub_cache / f"models--tiny-org--Tiny-Llama/snapshots/{REVISION}"


def test_an_absent_model_offline_is_one_line_saying_so_and_how_to_get_it(hub_cache, tmp_path, capsys):
    assert main(["prepare", "tiny-org/Absent", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"model 'tiny-org/Absent' is not in the local Hugging Face cache ({hub_cache}) and HF_HUB_OFFLINE is " \
           "set: download it with `hf download tiny-org/Absent" in err
    assert main(["plan", str(write_job(tmp_path, "tiny-org/Absent"))]) == 2
    assert "model 'tiny-org/Absent' is not in the local Hugging Face cache" in capsys.readouterr().err


def test_a_job_never_downloads_it_says_which_command_does(hub_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["plan", str(write_job(tmp_path, "tiny-org/Absent"))]) == 2
    assert "`flexorch prepare tiny-org/Absent DST` downloads what it needs" in capsys.readouterr().err


def test_a_revision_without_its_snapshot_is_absent(hub_cache):
    shutil.rmtree(hub_cache / f"models--tiny-org--Tiny-Llama/snapshots/{REVISION}")
    assert cached_snapshot(REPO) is None


Sibling = namedtuple("Sibling", "rfilename size")


class FakeApi:
    """HfApi's model_info answer for a repo as the hub lists DeepSeek-V3's (sizes in bytes)."""

    def model_info(self, repo_id, files_metadata):
        assert files_metadata
        siblings = [Sibling("config.json", 1_700), Sibling("tokenizer.json", 7_800_000),
                    Sibling("tokenizer_config.json", 3_000), Sibling("model.safetensors.index.json", 8_900_000),
                    Sibling("README.md", 20_000), Sibling("inference/model.py", 30_000),
                    Sibling("original/consolidated.00.pth", 10**12), Sibling("model.gguf", 10**11)]
        siblings += [Sibling(f"model-{i:05d}-of-00163.safetensors", 4_300_000_000) for i in range(1, 164)]
        return namedtuple("Info", "siblings")(siblings)


def test_a_download_fetches_only_what_prepare_reads():
    plan = download_plan("deepseek-ai/DeepSeek-V3", FakeApi())
    names = [name for name, _ in plan.files]
    assert names[:4] == ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"]
    assert len(names) == 4 + 163 and not any(n.endswith((".pth", ".gguf", ".md", ".py")) for n in names)
    assert plan.weight_bytes == 163 * 4_300_000_000
    assert plan.download_bytes == plan.weight_bytes + 1_700 + 7_800_000 + 3_000 + 8_900_000
    assert set(NEEDED_PATTERNS) >= {"config.json", "*.safetensors"}


def test_the_disk_must_hold_the_download_and_the_layerwise_copy(tmp_path):
    plan = DownloadPlan("org/big", (("config.json", 1_000), ("model.safetensors", 100 * 10**9)))
    usage = namedtuple("Usage", "free")
    # the cache and the copy on one disk: both count
    check_space(plan, tmp_path / "hub", tmp_path / "layers", lambda path: usage(200 * 10**9 + 1_000 + SPARE_BYTES))
    with pytest.raises(UserError, match=r"model 'org/big': downloading it and its layerwise copy needs 200.0 GB on "
                                        r"the disk of .* which has 150.0 GB free \(download 100.0 GB, copy 100.0 GB\)"):
        check_space(plan, tmp_path / "hub", tmp_path / "layers", lambda path: usage(150 * 10**9))


def test_a_cached_hub_model_is_prepared_once_under_its_repo_name(hub_cache, tmp_path):
    from flexorch.orchestrator.modelstore import resolve_model

    spec = load_job(write_job(tmp_path, REPO))
    target = resolve_model(spec.model, cache_dir=tmp_path / "flexorch")
    assert target.parent == tmp_path / "flexorch" / "models" and target.name.startswith("tiny-org--Tiny-Llama-")
    assert read_manifest(target).source == str(spec.model)


def test_an_unreachable_hub_is_said_as_offline_is(hub_cache, monkeypatch):
    from flexorch.orchestrator.hub import _unreachable

    class Unreachable:
        def model_info(self, repo_id, files_metadata):
            raise _unreachable()[0]("connection refused")

    with pytest.raises(UserError, match=r"model 'org/absent' is not in the local Hugging Face cache .* and the hub "
                                        r"is unreachable \(connection refused\): download it with `hf download"):
        download_plan("org/absent", Unreachable())
