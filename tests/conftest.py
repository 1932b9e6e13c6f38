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


# A vocabulary much larger than a decoder layer: 8192 x 64 fp32 rows are a 2 MB embedding and head,
# against 148 KB per decoder layer of the tiny models (ids stay < 384: the rest pads the vocabulary).
LARGE_VOCAB = 8192


@pytest.fixture(scope="session")
def large_vocab(tmp_path_factory):
    """large_vocab(arch) -> (checkpoint, its layerwise dir) of the tiny `arch` with LARGE_VOCAB (cached)."""
    from flexorch.orchestrator.demo import build_checkpoint
    from flexorch.orchestrator.prepare import prepare_checkpoint

    cache = {}

    def get(arch: str):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"large-vocab-{arch}")
            src = build_checkpoint(root / "model", arch, vocab_size=LARGE_VOCAB)
            prepare_checkpoint(src, root / "model.layers")
            cache[arch] = (src, root / "model.layers")
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def gemma3_270m():
    """The de-quantised Gemma 3 270M checkpoint dir (tests/realmodel.py: built once per machine into
    $FLEXORCH_TEST_CACHE, reused); skipped, saying which package is missing, without the real-model extra."""
    import realmodel

    reason = realmodel.missing_reason()
    if reason:
        pytest.skip(reason)
    return realmodel.gemma3_270m()


@pytest.fixture(autouse=True)
def _assumed_figures(monkeypatch):
    """Plans in tests use the planner's assumed figures: calibrating (10-15 s, once per machine) would
    make them depend on the machine running the tests. tests/test_calibrate.py turns it back on."""
    monkeypatch.setenv("FLEXORCH_CALIBRATE", "0")
