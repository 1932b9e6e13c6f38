"""The model store: a layerwise dir as it is, a Hugging Face dir prepared once into the cache."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from flexorch.orchestrator import modelstore
from flexorch.orchestrator.modelstore import is_hf_checkpoint, resolve_model
from flexorch.contract.errors import UserError
from flexorch.contract.manifest import is_layerwise_dir, read_manifest


@pytest.fixture
def hf_dir(checkpoint, tmp_path) -> Path:
    """A private copy of a tiny checkpoint, free to change."""
    return Path(shutil.copytree(checkpoint("llama", "safetensors-sharded"), tmp_path / "llama"))


def counting_prepare(monkeypatch) -> list:
    calls, prepare = [], modelstore.prepare_checkpoint

    def counted(*args, **kwargs):
        calls.append(args)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(modelstore, "prepare_checkpoint", counted)
    return calls


def test_layerwise_dir_is_returned_as_is(layerwise, tmp_path):
    assert resolve_model(layerwise("llama"), cache_dir=tmp_path) == layerwise("llama")
    assert not (tmp_path / "models").exists()


def test_hf_dir_is_prepared_once_and_reused(hf_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = counting_prepare(monkeypatch)
    first = resolve_model(hf_dir, cache_dir=cache)
    assert first.parent == cache / "models" and is_layerwise_dir(first)
    assert read_manifest(first).source == str(hf_dir)

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(modelstore, "prepare_checkpoint", no_second_conversion)
    assert resolve_model(hf_dir, cache_dir=cache) == first
    assert len(calls) == 1


def test_cache_dir_defaults_to_flexorch_cache(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXORCH_CACHE", str(tmp_path / "env-cache"))
    assert resolve_model(hf_dir).parent == tmp_path / "env-cache" / "models"


def test_changed_checkpoint_gets_a_new_key(hf_dir, tmp_path):
    cache = tmp_path / "cache"
    keys = {resolve_model(hf_dir, cache_dir=cache).name}

    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    keys.add(resolve_model(hf_dir, cache_dir=cache).name)

    shard = hf_dir / "model-00002-of-00004.safetensors"  # re-saved with other metadata: another header
    save_file(load_file(shard), shard, metadata={"format": "pt", "note": "re-saved"})
    keys.add(resolve_model(hf_dir, cache_dir=cache).name)

    assert len(keys) == 3
    assert all(key.startswith("llama-") for key in keys)


def test_concurrent_resolvers_convert_once(hf_dir, tmp_path, monkeypatch):
    calls = counting_prepare(monkeypatch)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model(hf_dir, cache_dir=tmp_path))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_is_hf_checkpoint(hf_dir, layerwise, tmp_path):
    assert is_hf_checkpoint(hf_dir)
    assert not is_hf_checkpoint(layerwise("llama"))  # has a config.json but no HF weight files
    assert not is_hf_checkpoint(tmp_path / "nowhere")


def config_only(root: Path) -> Path:
    (root / "config.json").write_text("{}")
    return root


@pytest.mark.parametrize("make", [lambda root: root / "nowhere", lambda root: root, config_only],
                         ids=["missing", "empty", "config-only"])
def test_anything_else_is_a_user_error(make, tmp_path):
    path = make(tmp_path)
    with pytest.raises(UserError) as caught:
        resolve_model(path, cache_dir=tmp_path / "cache")
    assert str(caught.value) == (
        f"{path}: neither a layerwise dir (flexorch prepare) nor a Hugging Face checkpoint dir"
    )


def test_weights_resaved_in_place_with_the_same_shapes_get_a_new_key(hf_dir, tmp_path):
    """A fine-tune written over the old checkpoint: same names, shapes, dtypes, header bytes."""
    cache = tmp_path / "cache"
    first = resolve_model(hf_dir, cache_dir=cache)
    shard = hf_dir / "model-00002-of-00004.safetensors"
    header = shard.read_bytes()[:1024]
    save_file({name: tensor + 1 for name, tensor in load_file(shard).items()}, shard, metadata={"format": "pt"})
    assert shard.read_bytes()[:1024] == header  # only the weights differ
    second = resolve_model(hf_dir, cache_dir=cache)
    assert second != first
    assert read_manifest(second).layers != read_manifest(first).layers  # converted anew: new checksums


def test_a_touched_checkpoint_is_hashed_again_and_keeps_its_key(hf_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = resolve_model(hf_dir, cache_dir=cache)
    hashes = json.loads((cache / "hashes.json").read_text())
    assert len(hashes) == len(list(hf_dir.glob("*.safetensors")))
    for shard in hf_dir.glob("*.safetensors"):
        os.utime(shard)  # new mtime, same bytes
    calls = counting_prepare(monkeypatch)
    assert resolve_model(hf_dir, cache_dir=cache) == first and calls == []
    again = json.loads((cache / "hashes.json").read_text())
    assert all(again[k]["stamp"] != hashes[k]["stamp"] and again[k]["sha256"] == hashes[k]["sha256"] for k in hashes)
