"""Which model types flexorch runs: the ones whose stage-wise scores are tested against the un-split
model. Torch-free, so the controller refuses an untested model before any work starts and the worker
applies the same rule."""

from __future__ import annotations

from flexorch.contract.errors import UserError

# Each runs through the general adapter (workers/adapter.py) and is tested, every score kind, against
# the un-split AutoModelForCausalLM (tests/test_engine.py; the families of 2025-26 in
# tests/test_families.py). MoE types are marked: their experts can be streamed in groups
# (docs/design.md).
DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gemma2", "gemma3_text", "olmo2",
                     "granite", "seed_oss", "smollm3", "exaone4", "apertus", "cohere2", "olmo3", "ministral", "glm4",
                     "glm", "hunyuan_v1_dense")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "llama4_text", "gpt_oss",
                   "ernie4_5_moe", "dots1", "hunyuan_v1_moe", "phimoe", "granitemoe")
TESTED_MODEL_TYPES = DENSE_MODEL_TYPES + MOE_MODEL_TYPES


def check_model_type(model_type: str, allow_untested: bool, where: str) -> None:
    """Refuse a model type outside TESTED_MODEL_TYPES unless the job says allow_untested_models."""
    if model_type in TESTED_MODEL_TYPES or allow_untested:
        return
    raise UserError(
        f"{where}: model type {model_type!r} is not tested with flexorch (tested: {', '.join(TESTED_MODEL_TYPES)}); "
        "set allow_untested_models: true in the job to run it anyway (scores are then unchecked)"
    )


# Layer types of `layer_types` that are attention layers; any other (linear_attention, mamba, ...)
# carries a recurrent state. Types known to be built of such layers, alone or mixed with attention,
# whether or not their config lists layer_types: the engine hands only hidden states between shards,
# so no allow_untested_models can run them.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
# Qwen3.5 (qwen3_5*, as Qwen3-Next) mixes Gated DeltaNet linear attention into its layers; a
# multimodal config keeps its layer_types in text_config, so its types are named here.
RECURRENT_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba", "falcon_h1", "jamba", "zamba", "zamba2", "bamba",
                         "nemotron_h", "granitemoehybrid", "qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe",
                         "qwen3_5_moe_text", "recurrent_gemma", "rwkv", "xlstm", "lfm2", "lfm2_moe", "minimax",
                         "plamo2", "kimi_linear", "olmo_hybrid")
ENCODER_DECODER_MODEL_TYPES = ("t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "led", "t5gemma",
                               "t5gemma2", "prophetnet", "bigbird_pegasus", "blenderbot", "blenderbot-small",
                               "m2m_100", "nllb-moe", "fsmt", "plbart", "mvp", "switch_transformers", "longt5")


def check_decoder_config(config: dict, where: str) -> None:
    """Refuse, whatever allow_untested_models says, a config.json that is no decoder-only stack of
    attention layers (embeddings → layers → norm → lm head) the engine can stream: an
    encoder-decoder, a recurrent or hybrid model, or one whose config has no num_hidden_layers
    (GPT-2's n_layer: learned positions and its own module names)."""
    model_type = config.get("model_type")
    layer_types = config.get("layer_types")
    layer_types = layer_types if isinstance(layer_types, list) else []
    if config.get("is_encoder_decoder") is True or model_type in ENCODER_DECODER_MODEL_TYPES:
        reason = "an encoder-decoder"
    elif model_type in RECURRENT_MODEL_TYPES or any(t not in ATTENTION_LAYER_TYPES for t in layer_types):
        reason = "recurrent (state-space or linear-attention) layers"
    elif "num_hidden_layers" not in config:
        reason = "its config has no num_hidden_layers"
    else:
        return
    raise UserError(f"{where}: model type {str(model_type)[:40]!r} cannot run in flexorch ({reason}): it streams "
                    f"decoder-only models of attention layers (tested: {', '.join(TESTED_MODEL_TYPES)}); "
                    "allow_untested_models does not change that")
