"""Shared fixtures: one tiny checkpoint per architecture and layout, built once per session, and
its layerwise conversion. Tests compare against the un-split Hugging Face model loaded from the
same dir, with the tokenizer reloaded from it (as a user gets it)."""

from __future__ import annotations

import pytest

from flexorch.orchestrator.demo import ARCHITECTURES

ALL_ARCHITECTURES = tuple(ARCHITECTURES)


def pytest_configure(config):
    """torch on one thread in the test process: the tiny models' matrices are too small to split, and
    on a machine whose cores are shared a second thread waits more than it computes (measured on 2
    busy cores: a family's tests in half the time and half the CPU). Workers the tests spawn keep the
    threads their plan gives them."""
    import torch

    torch.set_num_threads(1)


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


def built_once(tmp_path_factory, label: str, overrides):
    """get(model_type) -> (checkpoint, its layerwise dir) of the tiny `model_type` built with
    `overrides(model_type)`, each built and prepared once per session."""
    from flexorch.orchestrator.demo import build_checkpoint
    from flexorch.orchestrator.prepare import prepare_checkpoint

    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            root = tmp_path_factory.mktemp(f"{label}-{model_type}")
            src = build_checkpoint(root / "model", model_type, **overrides(model_type))
            prepare_checkpoint(src, root / "model.layers")
            cache[model_type] = (src, root / "model.layers")
        return cache[model_type]

    return get


@pytest.fixture(scope="session")
def large_vocab(tmp_path_factory):
    """large_vocab(arch) -> (checkpoint, its layerwise dir) of the tiny `arch` with LARGE_VOCAB (cached)."""
    return built_once(tmp_path_factory, "large-vocab", lambda arch: {"vocab_size": LARGE_VOCAB})


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


# The families of issue 27 beyond demo.ARCHITECTURES (tests/test_families.py): tiny configs on top
# of demo's common shape (hidden 64, 4 layers). Windows and attention chunks of 8 tokens, below the
# longest prompts (~25 tokens), so the masks of each are exercised; every MoE layout's routing
# (grouped sigmoid with a scaling factor, shared experts, input-scaled experts, biased experts) and
# dense layers among MoE ones.
_SLIDING = ["sliding_attention", "full_attention"] * 2
FAMILIES: dict[str, dict] = {
    # MLA attention, a first dense layer, group-limited sigmoid routing scaled by 2.5, a shared expert
    "deepseek_v3": dict(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1,
                        moe_intermediate_size=32, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4, tie_word_embeddings=False),
    "glm4_moe": dict(head_dim=16, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                     topk_group=1, routed_scaling_factor=2.0, n_shared_experts=1, moe_intermediate_size=32,
                     use_qk_norm=True, tie_word_embeddings=False),
    # dense and MoE layers alternating, chunked local attention, no-rope layers with temperature tuning
    "llama4_text": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                        intermediate_size=64, intermediate_size_mlp=128, attention_chunk_size=8,
                        no_rope_layer_interval=2, tie_word_embeddings=False),
    # attention sinks, biased clamped experts, sliding and full layers
    "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=8,
                    layer_types=_SLIDING, tie_word_embeddings=False),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
                         moe_layer_start_index=1, moe_layer_end_index=3, tie_word_embeddings=False),
    "dots1": dict(head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                  routed_scaling_factor=2.0, first_k_dense_replace=1, moe_intermediate_size=32,
                  tie_word_embeddings=False),
    "hunyuan_v1_moe": dict(head_dim=16, num_experts=4, moe_topk=2, tie_word_embeddings=False),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=8,
                   tie_word_embeddings=False),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, embedding_multiplier=4.0,
                       logits_scaling=0.25, residual_multiplier=0.5, attention_multiplier=0.1,
                       tie_word_embeddings=True),
    "hunyuan_v1_dense": dict(head_dim=16, tie_word_embeddings=False),
    "seed_oss": dict(head_dim=16, tie_word_embeddings=False),
    "smollm3": dict(no_rope_layer_interval=2, tie_word_embeddings=True),
    "exaone4": dict(sliding_window=8, sliding_window_pattern=2, tie_word_embeddings=False),
    "apertus": dict(tie_word_embeddings=False),
    "cohere2": dict(head_dim=16, sliding_window=8, layer_types=_SLIDING, logit_scale=0.5, tie_word_embeddings=True),
    "olmo3": dict(sliding_window=8, tie_word_embeddings=False),
    "ministral": dict(head_dim=16, sliding_window=8, layer_types=_SLIDING, tie_word_embeddings=False),
    "glm4": dict(head_dim=16, tie_word_embeddings=False),
    "glm": dict(head_dim=16, tie_word_embeddings=False),
}
MOE_FAMILIES = ("deepseek_v3", "glm4_moe", "llama4_text", "gpt_oss", "ernie4_5_moe", "dots1", "hunyuan_v1_moe",
                "phimoe", "granitemoe")


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """family(model_type) -> (checkpoint, its layerwise dir) of the tiny FAMILIES[model_type] (cached)."""
    return built_once(tmp_path_factory, "family", FAMILIES.__getitem__)
