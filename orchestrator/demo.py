"""Small random-weight Hugging Face checkpoints, built locally with no network.

`flexorch demo-model DIR` writes the built-in demo model (a Llama-family checkpoint whose scores are
meaningless: its weights are random). The tests build one tiny checkpoint per supported architecture
with the same function, in every weight layout `flexorch prepare` reads.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

# Text the tokenizer is trained on: enough variety for a few hundred merges.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Question: What is the capital of France? Answer: Paris. Question: Which planet is known as the red planet?
Answer: Mars. Multiple choice questions have one prefix and several suffixes, and the model scores each.
Streaming a large language model layer by layer lets a small graphics card run a model far larger than
its memory: load a layer, pass every prompt through it, free it, load the next one.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 A B C D E yes no true false maybe
Science, history, geography, mathematics, literature, music, art, physics, chemistry and biology.
"""

# Per architecture: config overrides on top of a tiny common shape. Small sliding windows make the
# tests exercise sliding-window masks on prompts longer than the window.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
ARCHITECTURES: dict[str, dict] = {
    "llama": dict(tie_word_embeddings=False),
    "mistral": dict(sliding_window=12, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=16, tie_word_embeddings=False),
    "gemma": dict(head_dim=16, tie_word_embeddings=True),
    "phi3": dict(sliding_window=12, tie_word_embeddings=False, pad_token_id=0),
    # Soft-capping values far below the defaults (50, 30), so that they change these tiny models' scores.
    "gemma2": dict(head_dim=16, sliding_window=12, tie_word_embeddings=True, attn_logit_softcapping=0.5,
                   final_logit_softcapping=0.2),
    # Local and global layers: each type its own window and rotary base.
    "gemma3_text": dict(head_dim=16, sliding_window=12, tie_word_embeddings=True,
                        layer_types=["sliding_attention", "full_attention"] * 2),
    "olmo2": dict(tie_word_embeddings=False),
    # Every multiplier away from 1, so that each one is applied where transformers applies it.
    "granite": dict(tie_word_embeddings=True, embedding_multiplier=4.0, logits_scaling=0.25,
                    residual_multiplier=0.5, attention_multiplier=0.1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, tie_word_embeddings=False),
    # A shared expert beside the routed ones, and one dense layer among the MoE layers.
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=96, mlp_only_layers=[2], tie_word_embeddings=False),
    "qwen3_moe": dict(head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                      tie_word_embeddings=False),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=48, tie_word_embeddings=False),
}

# Weight layouts a checkpoint dir can use (all of which `flexorch prepare` reads).
LAYOUTS = ("safetensors", "safetensors-sharded", "bin-sharded", "bin")


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on a built-in text, adding BOS like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_checkpoint(path: str | Path, model_type: str = "llama", *, layout: str = "safetensors",
                     dtype: str = "float32", seed: int = 0, shard_bytes: int | None = None,
                     **config_overrides) -> Path:
    """Write a random-weight `model_type` checkpoint with a tokenizer to `path`; returns the path.

    `layout` picks the weight files: one model.safetensors, safetensors shards with an index,
    pytorch .bin shards with an index, or one pytorch_model.bin.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if model_type not in ARCHITECTURES and not config_overrides:
        raise ValueError(f"unknown tiny architecture {model_type!r}; choose from {sorted(ARCHITECTURES)} "
                         "or give its config overrides")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    path = Path(path)
    tokenizer = build_tokenizer()
    overrides = {**_TINY, **ARCHITECTURES.get(model_type, {}), **config_overrides}
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(model_type, **{**ids, **overrides})  # a larger vocab_size pads the embedding
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():  # random init leaves some norms at exactly 0 or 1: perturb every tensor
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.eval()
    if shard_bytes is None:  # several shards even for a tiny model, so the index path is exercised
        shard_bytes = max(1, sum(p.numel() * p.element_size() for p in model.parameters()) // 3)
    sharded = layout.endswith("sharded")
    with _quiet_transformers():  # its per-shard progress bars would land in the caller's stderr
        model.save_pretrained(path, safe_serialization=True, max_shard_size=shard_bytes if sharded else "100GB")
    if layout.startswith("bin"):
        _rewrite_as_bin(path, sharded)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _rewrite_as_bin(path: Path, sharded: bool) -> None:
    """Replace the safetensors files save_pretrained wrote by pytorch .bin files (transformers 5
    no longer writes them, but many checkpoints on disk still are)."""
    import json

    import torch
    from safetensors.torch import load_file

    index_path = path / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        files = sorted(set(index["weight_map"].values()))
    else:
        index, files = None, ["model.safetensors"]
    renamed = {}
    for position, name in enumerate(files, start=1):
        new_name = (f"pytorch_model-{position:05d}-of-{len(files):05d}.bin" if sharded and index
                    else "pytorch_model.bin")
        tensors = load_file(path / name)
        if not sharded and new_name in renamed.values():
            raise ValueError("layout 'bin' needs a single weight file")
        torch.save(tensors, path / new_name)
        (path / name).unlink()
        renamed[name] = new_name
    if index:
        index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
        index_path.unlink()


def build_demo_model(path: str | Path) -> Path:
    """The built-in demo: a small Llama (8 layers x 256 wide, about 10 MB), random weights."""
    return build_checkpoint(path, "llama", hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                            layout="safetensors-sharded", seed=1234, shard_bytes=4_000_000)
