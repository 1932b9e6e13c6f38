"""contract/verified.py: a layer file hashed once is not hashed again while it is unchanged, and any
change to it (content, size, times, a copy) is hashed and caught."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import flexorch
from flexorch.contract.verified import VERIFIED_DIR, is_marked, mark, mark_path, unmarked_bytes
from flexorch.workers import layerfile
from flexorch.workers.layerfile import LayerIntegrityError, LayerwiseModel

LAYER = "layer.1"


@pytest.fixture
def model_dir(layerwise, tmp_path) -> Path:
    """A copy of the tiny llama's layerwise dir: new files, so none of them is marked."""
    return Path(shutil.copytree(layerwise("llama"), tmp_path / "model.layers"))


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """The files the reader hashes, in order."""
    seen: list[str] = []
    background, whole = layerfile.BackgroundSha256, layerfile.sha256_file

    class Counting(background):
        def __init__(self):
            seen.append("read")
            super().__init__()

    monkeypatch.setattr(layerfile, "BackgroundSha256", Counting)
    monkeypatch.setattr(layerfile, "sha256_file", lambda path: seen.append("whole") or whole(path))
    return seen


def _file_and_digest(model_dir: Path) -> tuple[str, str]:
    entry = LayerwiseModel(model_dir).stored_entry(LAYER)
    return entry.file, entry.sha256


def _settle(model_dir: Path) -> None:
    """Date LAYER's mark a second after the file's last change, as one made later is (a mark in the
    same clock step as the change does not count)."""
    path, changed = mark_path(model_dir, *_file_and_digest(model_dir))
    os.utime(path, ns=(changed + 10**9, changed + 10**9))


def test_a_file_that_matched_is_not_hashed_again(model_dir, hashes):
    LayerwiseModel(model_dir).load(LAYER, verify=True)
    assert hashes == ["read"] and mark_path(model_dir, *_file_and_digest(model_dir))[0].is_file()
    _settle(model_dir)
    assert is_marked(model_dir, *_file_and_digest(model_dir))
    LayerwiseModel(model_dir).load(LAYER, verify=True)  # a new job's reader
    LayerwiseModel(model_dir)._verify_once(LAYER)  # a part read's check of the whole file
    assert hashes == ["read"]


def test_a_mark_from_the_clock_step_of_the_change_does_not_count(model_dir):
    file, digest = _file_and_digest(model_dir)
    assert mark(model_dir, file, digest)
    path, changed = mark_path(model_dir, file, digest)
    os.utime(path, ns=(changed, changed))
    assert not is_marked(model_dir, file, digest)


@pytest.mark.parametrize("change", ["flip a byte", "flip a byte, times set back", "replace with a copy"])
def test_a_file_changed_after_it_was_marked_is_hashed_and_caught(model_dir, hashes, change):
    LayerwiseModel(model_dir).load(LAYER, verify=True)
    _settle(model_dir)
    path = model_dir / _file_and_digest(model_dir)[0]
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # in the data region: the header parses, the size is unchanged
    if change == "replace with a copy":
        path.with_suffix(".new").write_bytes(bytes(data))
        os.replace(path.with_suffix(".new"), path)
    else:
        path.write_bytes(bytes(data))
    if change == "flip a byte, times set back":
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not is_marked(model_dir, *_file_and_digest(model_dir))
    with pytest.raises(LayerIntegrityError, match=f"checksum mismatch for layer '{LAYER}'"):
        LayerwiseModel(model_dir).load(LAYER, verify=True)
    assert hashes == ["read", "read"]


def test_a_dir_that_cannot_be_marked_is_hashed_every_time(model_dir, hashes):
    shutil.rmtree(model_dir / VERIFIED_DIR, ignore_errors=True)  # the copy's marks, if any
    (model_dir / VERIFIED_DIR).write_text("not a dir")  # no mark can be made under it
    for _ in range(2):
        LayerwiseModel(model_dir).load(LAYER, verify=True)
    assert hashes == ["read", "read"]
    assert not mark(model_dir, *_file_and_digest(model_dir))


def test_prepare_marks_what_it_wrote(layerwise):
    model_dir = layerwise("llama")
    model = LayerwiseModel(model_dir)
    files = {model.stored_entry(e.name).file: model.stored_entry(e.name).sha256 for e in model.manifest.layers}
    assert all(mark_path(model_dir, file, digest)[0].is_file() for file, digest in files.items())


def _stored(model_dir: Path) -> list[tuple[str, str, int]]:
    return [(e.file, e.sha256, e.bytes) for e in LayerwiseModel(model_dir).manifest.layers if e.file]


def test_unmarked_bytes_are_the_files_a_reader_would_hash(model_dir):
    files = _stored(model_dir)
    assert unmarked_bytes(model_dir, files) == sum(size for *_, size in files)  # a copy: none marked
    LayerwiseModel(model_dir).load(LAYER, verify=True)
    _settle(model_dir)
    layer = LayerwiseModel(model_dir).stored_entry(LAYER).bytes
    assert unmarked_bytes(model_dir, files) == sum(size for *_, size in files) - layer


def test_a_plan_prices_the_files_its_workers_will_hash(model_dir):
    """The plan's first pass of each worker hashes what is not marked; once all is, nothing is priced."""
    prompts = [{"prefix": "The capital of France is", "suffixes": [" Paris", " Rome"]}]
    copied = flexorch.plan(model_dir, prompts, devices="cpu")
    total = sum(size for *_, size in _stored(model_dir))
    assert any(r.startswith("checksums: ") and "not verified since `flexorch prepare`" in r for r in copied.reasons)
    model = LayerwiseModel(model_dir)
    for entry in model.manifest.layers:
        if entry.file:
            model.load(entry.name, verify=True)
    for file, digest, _ in _stored(model_dir):
        path, changed = mark_path(model_dir, file, digest)
        os.utime(path, ns=(changed + 10**9, changed + 10**9))
    verified = flexorch.plan(model_dir, prompts, devices="cpu")
    assert not any(r.startswith("checksums: ") for r in verified.reasons)
    (hashing,), (plain,) = copied.workers, verified.workers
    assert hashing.settings == plain.settings and total > 0
    assert hashing.predicted_read_seconds > plain.predicted_read_seconds
