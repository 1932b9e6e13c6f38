"""The layerwise reader: layers by name, sizes without reading, checksums on demand."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexorch.workers import fileread, layerfile
from flexorch.workers.layerfile import LayerIntegrityError, LayerwiseModel, aligned


@pytest.fixture
def llama_copy(layerwise, tmp_path) -> Path:
    """A private copy of the tiny llama's layerwise dir, free to damage."""
    return Path(shutil.copytree(layerwise("llama"), tmp_path / "model.layers"))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the data region: the header still parses, the size is unchanged
    path.write_bytes(bytes(data))


def test_load_and_read_into_return_the_layer_tensors(layerwise):
    model = LayerwiseModel(layerwise("llama"))
    expected = load_file(model.file_path("layer.1"))

    loaded = model.load("layer.1", verify=True)
    buffer = torch.empty(model.part_bytes("layer.1", None) + 256, dtype=torch.uint8)
    read = model.read_into("layer.1", buffer, verify=True)

    for tensors in (loaded, read):
        assert tensors.keys() == expected.keys()
        for name, tensor in expected.items():
            assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor)
    assert read["self_attn.q_proj.weight"].data_ptr() >= buffer.data_ptr()  # views of the caller's buffer


def test_tied_lm_head_reads_the_embedding(layerwise):
    model = LayerwiseModel(layerwise("qwen2"))
    head, embed = model.load("lm_head"), model.load("embed")
    assert head.keys() == {"weight"} and torch.equal(head["weight"], embed["weight"])
    assert model.layer_bytes("lm_head") == model.layer_bytes("embed")


def test_flipped_byte_detected_by_verify_and_read_into(llama_copy):
    model = LayerwiseModel(llama_copy)
    flip_last_byte(model.file_path("layer.1"))
    model.verify("layer.0")  # the others are intact

    for read in (lambda: model.verify("layer.1"), lambda: model.load("layer.1", verify=True)):
        with pytest.raises(LayerIntegrityError, match="checksum mismatch for layer 'layer.1'") as caught:
            read()
        assert str(model.file_path("layer.1")) in str(caught.value)


def test_truncated_file_detected_from_its_size_alone(llama_copy, monkeypatch):
    model = LayerwiseModel(llama_copy)
    path = model.file_path("layer.2")
    path.write_bytes(path.read_bytes()[:-16])

    def must_not_read(*args):
        raise AssertionError("the size check comes first")

    monkeypatch.setattr(layerfile, "read_header", must_not_read)
    monkeypatch.setattr(layerfile, "sha256_file", must_not_read)
    with pytest.raises(LayerIntegrityError, match="manifest says") as caught:
        model.load("layer.2")
    assert str(path) in str(caught.value) and "'layer.2'" in str(caught.value)


def test_layer_bytes_needs_no_read(llama_copy):
    model = LayerwiseModel(llama_copy)
    sizes = {entry.name: entry.bytes for entry in model.manifest.layers}
    shutil.rmtree(llama_copy / "layers")
    assert {name: model.layer_bytes(name) for name in sizes} == sizes


def test_experts_are_read_alone_as_slices_of_the_fused_tensors(layerwise):
    from flexorch.contract.shards import DENSE_PART

    model = LayerwiseModel(layerwise("mixtral"))
    entry = model.entry("layer.1")
    whole = model.load("layer.1")
    buffer = torch.empty(model.part_bytes("layer.1", (1, 3)), dtype=torch.uint8)
    group = model.read_part_into("layer.1", (1, 3), buffer, verify=True)
    assert sorted(group) == sorted(entry.expert_tensors)
    for name, tensor in group.items():
        assert torch.equal(tensor, whole[name][1:3])
    dense = model.read_part_into("layer.1", DENSE_PART, torch.empty(model.part_bytes("layer.1", DENSE_PART),
                                                                     dtype=torch.uint8))
    assert sorted(dense) == sorted(set(whole) - set(entry.expert_tensors))
    assert all(torch.equal(dense[name], whole[name]) for name in dense)


class _RecordingSha256:
    """hashlib.sha256 that notes the thread of every update (the chunks' order shows in the digest)."""

    def __init__(self, sha, threads: list[str]):
        self._sha, self._threads = sha, threads

    def update(self, data) -> None:
        self._threads.append(threading.current_thread().name)
        self._sha.update(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def test_verifying_read_hashes_off_the_reading_thread_in_order(llama_copy, monkeypatch):
    """Small reads, so the file is many chunks: hashed out of order, the digest would not match. A
    copy: its files are not the ones `prepare` marked as verified."""
    threads: list[str] = []
    monkeypatch.setattr(fileread, "READ_CHUNK", 1024)
    sha256 = hashlib.sha256
    monkeypatch.setattr(layerfile.hashlib, "sha256", lambda: _RecordingSha256(sha256(), threads))
    model = LayerwiseModel(llama_copy)
    assert model.data_bytes("layer.1") > 8 * 1024
    read = model.load("layer.1", verify=True)
    assert len(threads) > 8 and all(name.startswith("flexorch-hash") for name in threads)
    assert torch.equal(read["mlp.up_proj.weight"], load_file(model.file_path("layer.1"))["mlp.up_proj.weight"])


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_in_any_chunk_raises_before_tensors_return(llama_copy, monkeypatch, where):
    monkeypatch.setattr(fileread, "READ_CHUNK", 1024)
    model = LayerwiseModel(llama_copy)
    path = model.file_path("layer.1")
    header = model.header("layer.1")
    at = {"first": header.data_offset, "middle": header.data_offset + header.data_bytes // 2,
          "last": header.data_offset + header.data_bytes - 1}[where]
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LayerIntegrityError, match="checksum mismatch for layer 'layer.1'"):
        model.load("layer.1", verify=True)
    model.load("layer.1")  # unverified reads go on: checking is the caller's choice


def test_a_file_cut_short_mid_read_stops_the_hash_thread(llama_copy, monkeypatch):
    """The size was checked (header cached), then the file lost its tail: the read raises, and no
    hashing thread is left working on the caller's buffer."""
    monkeypatch.setattr(fileread, "READ_CHUNK", 1024)
    model = LayerwiseModel(llama_copy)
    path = model.file_path("layer.2")
    model.header("layer.2")
    path.write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(LayerIntegrityError, match="'layer.2' is truncated"):
        model.load("layer.2", verify=True)
    assert not [t for t in threading.enumerate() if t.name.startswith("flexorch-hash")]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="Linux only")
def test_layer_reads_tell_the_kernel_they_are_sequential(layerwise, monkeypatch):
    """POSIX_FADV_SEQUENTIAL doubles the file's read-ahead window (~2x the cold rate, measured); the
    header is read first with read-ahead off (RANDOM), so the data it would pull in is not cached ahead
    of a direct read."""
    advised, real = [], os.posix_fadvise

    def record(fd, offset, length, advice):
        advised.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)  # every module's os: the header's reader and the data's
    model = LayerwiseModel(layerwise("llama"))
    model.load("layer.1")
    model.load("layer.2", verify=True)
    assert [a for a in advised if a != (0, 0, os.POSIX_FADV_RANDOM)] == [(0, 0, os.POSIX_FADV_SEQUENTIAL)] * 2
    assert advised[0] == (0, 0, os.POSIX_FADV_RANDOM)  # the header, before the data
