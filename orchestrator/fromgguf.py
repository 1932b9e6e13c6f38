"""`flexorch prepare model.gguf DST`: a GGUF file through transformers' own GGUF loader.

transformers reads GGUF (llama.cpp's format) by dequantising every tensor into a float model
(`from_pretrained(dir, gguf_file=...)`, with the `gguf` package: the `gguf` extra);
its Q4_K / Q8_0 / ... blocks have no kernel here. So the layerwise dir holds the dequantised weights in
`dtype` (bfloat16 unless said: a 4-bit GGUF grows about 4x), and converting holds the whole model in
RAM once. The float model is saved as a checkpoint dir next to DST, converted as any other, and removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flexorch.contract.errors import UserError

GGUF_DTYPES = ("bfloat16", "float16", "float32")


def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf" and path.is_file()


def gguf_to_checkpoint(path: Path, out: Path, dtype: str, console=None) -> Path:
    """Write the float checkpoint dir `out` (config, safetensors, tokenizer) of GGUF file `path`."""
    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype}: a GGUF file is dequantised into one of {', '.join(GGUF_DTYPES)}")
    try:
        import gguf  # noqa: F401  transformers' loader needs it; said here rather than deep in transformers
    except ImportError:
        from flexorch.orchestrator.extras import install_hint

        raise UserError(f"{path}: reading GGUF needs the gguf package, which is not installed: "
                        f"{install_hint('gguf')}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if console is not None:
        console.print(f"{path.name}: GGUF, dequantised into {dtype} by transformers' GGUF loader (the whole model "
                      "in RAM once; the layerwise dir holds it in that dtype)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError, NotImplementedError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: transformers' GGUF loader cannot read it ({text[:200]})") from None
    _save_float(model, out)
    tokenizer.save_pretrained(out)
    return out


def _save_float(model, out: Path) -> None:
    """The dequantised model as a float checkpoint. transformers' save_pretrained refuses a model it
    loaded from GGUF (marked quantised with a quantizer that cannot serialise), though its weights are
    plain tensors by then: unmarked, it is saved as any model is."""
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out)


def prepare_gguf(path: Path, dst: Path, prepare, dtype: str | None = None, console=None):
    """`prepare(checkpoint_dir)` of the float checkpoint of `path`, made in a temporary dir beside `dst`."""
    tmp = dst.parent / f".{dst.name}.gguf-{os.getpid()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        return prepare(gguf_to_checkpoint(path, tmp, dtype or "bfloat16", console))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
