"""Bytes read per pass: FP8 and MXFP4 layerwise dirs against the bf16 conversion of the same model
(issue 27: <= 0.55x and <= 0.3x).

Measured: a llama-shaped model (bf16) and its FP8 release form (every decoder projection in 128 x 128
blocks, as DeepSeek-V3 ships), and a gpt-oss-shaped one and its MXFP4 form (the experts, as gpt-oss
ships), each prepared by `flexorch prepare` and scored for one pass by the engine: the bytes its
reads returned (EngineRun.bytes_read); the MXFP4 one also with its experts streamed 4 at a time (each
group's slices of the blocks and scales read, then dequantised). Described: the same ratio for the
full-size releases, from their manifests (benchmarks/manifests.py), a pass reading the whole dir.

    python benchmarks/bench_formats.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flexorch.contract.protocol import EngineSettings, ScoreSpec, TokenizedPrompt
from flexorch.orchestrator.demo import build_checkpoint, build_tokenizer
from flexorch.orchestrator.prepare import prepare_checkpoint
from flexorch.workers.engine import score_prompts
from flexorch.workers.quantized import quantize_fp8, quantize_mxfp4

from manifests import DEEPSEEK_V3, GPT_OSS_120B, described_manifest, Release

RESULTS = Path(__file__).parent / "results"
PROMPTS = [TokenizedPrompt(0, tuple(range(1, 41)), ((50, 51), (52,)))]


def quantized_copy(src: Path, dst: Path, scheme: str) -> Path:
    """`src` (bf16) with what the release quantises stored in `scheme`, and its quantization_config."""
    shutil.copytree(src, dst)
    out = {}
    for file in sorted(dst.glob("*.safetensors")):
        tensors = load_file(file)
        for name, tensor in tensors.items():
            if scheme == "fp8" and name.startswith("model.layers.") and name.endswith("proj.weight"):
                out[name], out[name.removesuffix("weight") + "weight_scale_inv"] = quantize_fp8(tensor)
            elif scheme == "mxfp4" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                out[name + "_blocks"], out[name + "_scales"] = quantize_mxfp4(tensor)
            else:
                out[name] = tensor
        file.unlink()
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    config["quantization_config"] = fp8 if scheme == "fp8" else {"quant_method": "mxfp4"}
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    return dst


def gpt_oss_checkpoint(path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model("gpt_oss", hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=32,
                                  num_experts_per_tok=4, vocab_size=len(tokenizer), tie_word_embeddings=False,
                                  layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=16)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def bytes_read(src: Path, dst: Path, experts_per_group: int = 0) -> int:
    if not dst.exists():
        prepare_checkpoint(src, dst)
    settings = EngineSettings("cpu", "bfloat16", 1, "cpu", 4096, allow_untested_models=True,
                              experts_per_group=experts_per_group)
    _, run = score_prompts(dst, PROMPTS, ScoreSpec("suffix_logprob"), settings)
    return run.bytes_read


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        llama = build_checkpoint(root / "llama", "llama", dtype="bfloat16", hidden_size=512, intermediate_size=1536,
                                 num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=4)
        oss = gpt_oss_checkpoint(root / "gpt-oss")
        for name, src, scheme in (("llama-shaped, FP8", llama, "fp8"), ("gpt-oss-shaped, MXFP4", oss, "mxfp4")):
            plain = bytes_read(src, root / f"{scheme}-bf16.layers")
            packed = bytes_read(quantized_copy(src, root / f"{scheme}-src", scheme), root / f"{scheme}.layers")
            results[name] = {"bf16_bytes": plain, "quantized_bytes": packed, "ratio": packed / plain}
        streamed = bytes_read(root / "mxfp4-src", root / "mxfp4.layers", experts_per_group=4)
        plain = bytes_read(oss, root / "mxfp4-bf16.layers", experts_per_group=4)
        results["gpt-oss-shaped, MXFP4, experts 4 at a time"] = {"bf16_bytes": plain, "quantized_bytes": streamed,
                                                                 "ratio": streamed / plain}
    for release in (DEEPSEEK_V3, GPT_OSS_120B):
        shipped = described_manifest(release).total_bytes
        plain = described_manifest(Release(release.name, release.model_type, release.config)).total_bytes
        results[f"{release.name}, {release.scheme} (described)"] = {"bf16_bytes": plain, "quantized_bytes": shipped,
                                                                     "ratio": shipped / plain}
    print("| model | bf16 conversion, bytes per pass | as shipped, bytes per pass | ratio |\n|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['bf16_bytes'] / 1e6:,.1f} MB | {row['quantized_bytes'] / 1e6:,.1f} MB | "
              f"{row['ratio']:.3f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "formats-bytes.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
