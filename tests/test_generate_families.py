"""Greedy generation (score kind generate, through the KV cache) against the un-split Hugging Face
model's `model.generate(do_sample=False)`, token for token, on every tested architecture: the 14 of
demo.ARCHITECTURES and the 18 families of conftest.FAMILIES (MLA attention, attention sinks, chunked
local attention and no-rope layers, sliding windows, MoE layers; tests/test_generate.py runs the
fuller job matrix on four of them).

One job of two prompts in one batch, each with its own limit: a long one (45 tokens, past every
sliding window and attention chunk of the tiny configs: 12 tokens in ARCHITECTURES, 8 in FAMILIES)
and a short one (6 tokens) whose generated tokens, fed through the cache, cross the window or chunk
too. The MoE types run once more with their experts streamed two at a time, and DeepSeek-V3 once
more with values narrower than its keys (NARROW_VALUES).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FAMILIES, built_once
from flexorch.contract.models import MOE_MODEL_TYPES, TESTED_MODEL_TYPES
from flexorch.contract.protocol import ScoreSpec, StopReason, TokenizedPrompt
from flexorch.orchestrator.demo import ARCHITECTURES
from flexorch.workers.engine import score_prompts
from test_generate import TEXTS, _hf, generated, hf_greedy, settings

PROMPTS = (TEXTS[0], TEXTS[3])  # 45 and 6 tokens with the demo tokenizer
LIMITS = (5, 8)  # new tokens per prompt

CASES = [pytest.param("arch", name, id=name) for name in ARCHITECTURES] + \
        [pytest.param("family", name, id=name) for name in FAMILIES]
MOE_CASES = [case for case in CASES if case.values[1] in MOE_MODEL_TYPES]


def span(name: str) -> int:
    """The tiny config's sliding window or attention chunk (0: none)."""
    config = {**ARCHITECTURES, **FAMILIES}[name]
    return max(config.get("sliding_window", 0), config.get("attention_chunk_size", 0))


# DeepSeek-V3's MLA with values half as wide as its keys (the releases: 128 against 192). The cache
# keeps what attention hands it side by side and splits at the keys' width: transformers 5.25 hands it
# the compressed latents (kv_lora_rank 16 against the rope part's 8, in the family config too), a
# release that caches the expanded keys and values hands it qk_nope + qk_rope against v_head_dim,
# 16 and 16 in the family config: only this one makes them differ there.
NARROW_VALUES = {**FAMILIES["deepseek_v3"], "v_head_dim": 8}


@pytest.fixture(scope="module")
def narrow_values(tmp_path_factory):
    return built_once(tmp_path_factory, "narrow-values", lambda _: NARROW_VALUES)


def paths(kind: str, name: str, request):
    """(HF checkpoint, layerwise dir) of a demo architecture, a 2026 family or the narrow-values
    DeepSeek-V3, from the session fixtures (the last: this module's)."""
    if kind in ("family", "narrow_values"):
        return request.getfixturevalue(kind)(name)
    return request.getfixturevalue("checkpoint")(name), request.getfixturevalue("layerwise")(name)


def assert_greedy_equals_hf(kind: str, name: str, request, **overrides) -> None:
    model_dir, layers = paths(kind, name, request)
    model, tokenizer = _hf(str(model_dir))
    eos = (model.generation_config.eos_token_id,)  # both sides end at the checkpoint's own EOS
    prefixes = [tuple(tokenizer(text).input_ids) for text in PROMPTS]
    # the long prompt overflows the window; the short one's last token fed through the cache (at
    # position prefix + limit - 2) sits where the window no longer reaches position 0, or in chunk 2
    assert len(prefixes[0]) > span(name) and len(prefixes[1]) + LIMITS[1] - 2 >= span(name)
    expected = []
    for prefix, limit in zip(prefixes, LIMITS):
        ids = hf_greedy(model_dir, prefix, limit, eos)
        expected.append((ids, StopReason.EOS if ids[-1] in eos else StopReason.LENGTH))
    assert len(expected[1][0]) >= 4, "the cache should serve several steps"
    prompts = [TokenizedPrompt(i, p, ((),), max_new_tokens=n) for i, (p, n) in enumerate(zip(prefixes, LIMITS))]
    results, _ = score_prompts(layers, prompts, ScoreSpec("generate", eos_ids=eos, logprobs=True),
                               settings(**overrides))
    assert [generated(result) for result in results] == [[want] for want in expected], name
    # Tiny random models often repeat one token, whose argmax a wrong cache could keep: each step's
    # log-prob, against the un-split model's full forward over prompt + generated ids, tells (float32:
    # within 6e-7 on every type).
    for result, prefix, (ids, _) in zip(results, prefixes, expected):
        with torch.no_grad():
            logits = model(torch.tensor([list(prefix) + ids])).logits[0, len(prefix) - 1:-1]
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(result.scores["logprobs"][0, :len(ids)], want, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("kind, name", CASES)
def test_greedy_generation_equals_hf_generate(kind, name, request):
    assert_greedy_equals_hf(kind, name, request)


@pytest.mark.parametrize("kind, name", MOE_CASES)
def test_greedy_generation_with_streamed_experts_equals_hf_generate(kind, name, request):
    # expert streaming runs one layer per shard
    assert_greedy_equals_hf(kind, name, request, layers_per_shard=1, experts_per_group=2)


def test_mla_with_values_narrower_than_keys_equals_hf_generate(request):
    qk_head_dim = NARROW_VALUES["qk_nope_head_dim"] + NARROW_VALUES["qk_rope_head_dim"]
    assert NARROW_VALUES["v_head_dim"] < qk_head_dim
    assert_greedy_equals_hf("narrow_values", "deepseek_v3", request)


def test_every_tested_type_is_generated():
    assert {case.values[1] for case in CASES} == set(TESTED_MODEL_TYPES)
