"""A manifest computed from a Llama-family model's shapes, with no weights on disk.

The planner needs only layer sizes and a few config values, so `flexorch plan`-style estimates
(will Llama-2-70B run on a 6 GB card, and how long will it take?) can be made before anything is
downloaded; the tests use it to describe models too big to build.
"""

from __future__ import annotations

from dataclasses import replace

from flexorch.contract.manifest import DECODER, DTYPE_BYTES, EMBED, FORMAT_VERSION, LM_HEAD, NORM, LayerEntry, Manifest


def llama_shaped_manifest(layers: int, hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int,
                          dtype: str = "float16", tied: bool = False) -> Manifest:
    """Sizes from the shapes: q, o (hidden x hidden), k, v (hidden x kv), gate/up/down
    (hidden x intermediate) and two norms per decoder layer; vocab x hidden embedding and head."""
    size = DTYPE_BYTES[dtype]
    kv = hidden // heads * kv_heads
    layer_params = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    embed_params = vocab * hidden

    def entry(name, kind, params, prefix, tied_to=None):
        # the embedding, norm and head hold one `weight` (what lets the head be read by rows)
        return LayerEntry(name=name, kind=kind, file=None if tied_to else f"layers/{name}.safetensors",
                          bytes=0 if tied_to else params * size, sha256=None, dtype=dtype, params=params,
                          source_prefix=prefix, tied_to=tied_to,
                          tensors=() if kind == DECODER or tied_to else ("weight",))

    entries = [entry("embed", EMBED, embed_params, "model.embed_tokens.")]
    entries += [entry(f"layer.{i}", DECODER, layer_params, f"model.layers.{i}.") for i in range(layers)]
    entries += [entry("norm", NORM, hidden, "model.norm."),
                entry("lm_head", LM_HEAD, 0 if tied else embed_params, "lm_head.", "embed" if tied else None)]
    config = {"hidden_size": hidden, "intermediate_size": intermediate, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "num_hidden_layers": layers}
    return Manifest(version=FORMAT_VERSION, model_type="llama", architectures=("LlamaForCausalLM",), dtype=dtype,
                    num_layers=layers, hidden_size=hidden, vocab_size=vocab, layers=tuple(entries), config=config)


def llama2_70b() -> Manifest:
    """Llama-2-70B in fp16: 80 layers of 1.71 GB, 32000 x 8192 embedding and head (524 MB each)."""
    return llama_shaped_manifest(80, 8192, 28672, 32000, heads=64, kv_heads=8)


def llama3_70b() -> Manifest:
    """Llama-3-70B in fp16: 80 layers of 1.71 GB, a 128256 x 8192 embedding and head (2.1 GB each)."""
    return llama_shaped_manifest(80, 8192, 28672, 128256, heads=64, kv_heads=8)


def llama2_13b() -> Manifest:
    """Llama-2-13B in fp16: 40 layers of 634 MB."""
    return llama_shaped_manifest(40, 5120, 13824, 32000, heads=40, kv_heads=40)


def moe_shaped_manifest(layers: int, hidden: int, moe_intermediate: int, experts: int, per_token: int, vocab: int,
                        heads: int, kv_heads: int, dtype: str = "float16") -> Manifest:
    """A Mixtral-shaped MoE model: Llama's attention and norms, a router (experts x hidden) and
    `experts` experts of gate/up/down (hidden x moe_intermediate) per layer, fused as prepare stores them."""
    size = DTYPE_BYTES[dtype]
    dense = llama_shaped_manifest(layers, hidden, 0, vocab, heads, kv_heads, dtype)
    expert_params = 3 * hidden * moe_intermediate
    router = experts * hidden

    def moe(entry: LayerEntry) -> LayerEntry:
        if entry.kind != DECODER:
            return entry
        params = entry.params + router + experts * expert_params
        return replace(entry, params=params, bytes=params * size, experts=experts, expert_bytes=expert_params * size,
                       expert_tensors=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))

    config = {**dense.config, "intermediate_size": moe_intermediate, "num_local_experts": experts,
              "num_experts_per_tok": per_token}
    return replace(dense, model_type="mixtral", architectures=("MixtralForCausalLM",),
                   layers=tuple(moe(e) for e in dense.layers), config=config)


def mixtral_8x7b() -> Manifest:
    """Mixtral-8x7B in fp16: 32 layers of 2.9 GB (8 experts of 352 MB), 2 of 8 experts per token."""
    return moe_shaped_manifest(32, 4096, 14336, 8, 2, 32000, heads=32, kv_heads=8)
