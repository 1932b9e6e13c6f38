"""Manifests of released models at full size, described from their config.json alone (no weights):
what `flexorch prepare` would write for them, for planning on a described machine
(benchmarks/plans_real.py) and for tests of models too big to build.

Each layer's tensors are read off transformers' own module for the config, built on the meta device
(no memory), so names, shapes and the fused experts layout are the model's, not assumed. Sizes: the
config's dtype per weight, or the scheme the release ships in (the layout orchestrator/shipped.py
keeps): FP8 stores a byte per weight and a float32 scale per 128 x 128 block; MXFP4 half a byte per
weight and one E8M0 byte per 32. Which tensors a release quantises is its own: DeepSeek-V3's FP8
covers every decoder projection and its experts (not the router, norms, embedding or head); gpt-oss's
MXFP4 covers the experts' projections only. Layer files' safetensors headers (a few hundred bytes)
are left out of the sizes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from flexorch.contract.manifest import DECODER, DTYPE_BYTES, EMBED, FORMAT_VERSION, LM_HEAD, NORM, LayerEntry, Manifest

FP8_BLOCK, MX_BLOCK = 128, 32
_ROUTER = re.compile(r"(^|\.)(gate|router)\.weight$")
_EXPERTS = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj)$")  # fused, expert first
_EXPERT_FIRST = re.compile(r"(^|\.)experts\.")


@dataclass(frozen=True)
class Release:
    """A model as released: its config.json's values (the ones that differ from transformers' defaults)
    and the scheme its weights ship in."""

    name: str
    model_type: str
    config: dict = field(default_factory=dict)
    scheme: str | None = None  # "fp8" | "mxfp4"; None: the config's dtype


# Values from each release's config.json on the hub (dtype bfloat16 throughout).
DEEPSEEK_V3 = Release("DeepSeek-V3", "deepseek_v3", dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
    max_position_embeddings=163840, tie_word_embeddings=False), scheme="fp8")
QWEN3_235B = Release("Qwen3-235B-A22B", "qwen3_moe", dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=94,
    num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    max_position_embeddings=40960, tie_word_embeddings=False))
GPT_OSS_120B = Release("gpt-oss-120b", "gpt_oss", dict(
    vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36, num_attention_heads=64,
    num_key_value_heads=8, head_dim=64, num_local_experts=128, num_experts_per_tok=4, sliding_window=128,
    layer_types=["sliding_attention", "full_attention"] * 18, tie_word_embeddings=False), scheme="mxfp4")
LLAMA4_MAVERICK = Release("Llama-4-Maverick-17B-128E", "llama4_text", dict(
    vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=48,
    num_attention_heads=40, num_key_value_heads=8, head_dim=128, num_local_experts=128, num_experts_per_tok=1,
    interleave_moe_layer_step=2, tie_word_embeddings=False))
RELEASES = (DEEPSEEK_V3, QWEN3_235B, GPT_OSS_120B, LLAMA4_MAVERICK)


def stored_tensors(name: str, shape: tuple[int, ...], scheme: str | None, dtype_bytes: int) -> dict[str, int]:
    """A decoder layer tensor as the layer file holds it under `scheme`: stored name → bytes."""
    count = math.prod(shape)
    weight = len(shape) >= 2 and (name.endswith("weight") or bool(_EXPERTS.search(name)))
    if scheme == "fp8" and weight and not _ROUTER.search(name):
        *lead, rows, cols = shape
        blocks = math.prod(lead) * -(-rows // FP8_BLOCK) * -(-cols // FP8_BLOCK)
        return {f"{name}.fp8": count, f"{name}.scale": 4 * blocks}
    if scheme == "mxfp4" and _EXPERTS.search(name):
        return {f"{name}.mxfp4": count // 2, f"{name}.scale": count // MX_BLOCK}
    return {name: count * dtype_bytes}


def described_manifest(release: Release, dtype: str = "bfloat16") -> Manifest:
    """The manifest `flexorch prepare` would write for `release`, sha256 None."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(release.model_type, **release.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    size = DTYPE_BYTES[dtype]

    def entry(name: str, kind: str, prefix: str, shapes: dict[str, tuple[int, ...]], scheme=None) -> LayerEntry:
        stored: dict[str, int] = {}
        for tensor, shape in shapes.items():
            stored |= stored_tensors(tensor, shape, scheme, size)
        expert_names = tuple(n for n in stored if _EXPERT_FIRST.search(n) and "shared" not in n)
        experts = next((shapes[n][0] for n in shapes if _EXPERTS.search(n)), 0)
        return LayerEntry(
            name=name, kind=kind, file=f"layers/{name}.safetensors", bytes=sum(stored.values()), sha256=None,
            dtype=dtype, params=sum(math.prod(s) for s in shapes.values()), source_prefix=prefix,
            tensors=tuple(stored), experts=experts,
            expert_bytes=sum(stored[n] for n in expert_names) // experts if experts else 0,
            expert_tensors=expert_names if experts else (), compression=scheme)

    def shapes(module) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in module.state_dict().items()}

    inner = model.model
    entries = [entry("embed", EMBED, "model.embed_tokens.", shapes(inner.embed_tokens))]
    entries += [entry(f"layer.{i}", DECODER, f"model.layers.{i}.", shapes(layer), release.scheme)
                for i, layer in enumerate(inner.layers)]
    entries += [entry("norm", NORM, "model.norm.", shapes(inner.norm)),
                entry("lm_head", LM_HEAD, "lm_head.", shapes(model.lm_head))]
    return Manifest(version=FORMAT_VERSION, model_type=release.model_type,
                    architectures=tuple(config.architectures or (type(model).__name__,)), dtype=dtype,
                    num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                    layers=tuple(entries), config={**config.to_dict(), **release.config}, compression=release.scheme,
                    source=f"described: {release.name}")
