"""Shared fixtures: one tiny checkpoint per architecture and layout, built once per session, and
its layerwise conversion. Tests compare against the un-split Hugging Face model loaded from the
same dir, with the tokenizer reloaded from it (as a user gets it)."""

from __future__ import annotations

import pytest

from flexorch.orchestrator.demo import ARCHITECTURES

ALL_ARCHITECTURES = tuple(ARCHITECTURES)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch, layout="safetensors-sharded") -> path of a tiny HF checkpoint (cached)."""
    from flexorch.orchestrator.demo import build_checkpoint

    cache = {}

    def get(arch: str, layout: str = "safetensors-sharded"):
        if (arch, layout) not in cache:
            path = tmp_path_factory.mktemp(f"ckpt-{arch}-{layout}")
            cache[arch, layout] = build_checkpoint(path / "model", arch, layout=layout)
        return cache[arch, layout]

    return get


@pytest.fixture(scope="session")
def layerwise(tmp_path_factory, checkpoint):
    """layerwise(arch, layout="safetensors-sharded") -> path of its `flexorch prepare` output (cached)."""
    from flexorch.orchestrator.prepare import prepare_checkpoint

    cache = {}

    def get(arch: str, layout: str = "safetensors-sharded"):
        if (arch, layout) not in cache:
            dst = tmp_path_factory.mktemp(f"layers-{arch}-{layout}") / "model.layers"
            prepare_checkpoint(checkpoint(arch, layout), dst)
            cache[arch, layout] = dst
        return cache[arch, layout]

    return get


@pytest.fixture(autouse=True)
def _assumed_figures(monkeypatch):
    """Plans in tests use the planner's assumed figures: calibrating (10-15 s, once per machine) would
    make them depend on the machine running the tests. tests/test_calibrate.py turns it back on."""
    monkeypatch.setenv("FLEXORCH_CALIBRATE", "0")
