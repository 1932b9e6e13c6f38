"""The KV cache's bookkeeping (workers/kvcache.py) over every store: what each step keeps, what it
returns to the attention layer, and that nothing is left once the last step has read it; its
compression (int8 / int4, asymmetric per group along the head dim): the round trip's bound, and the
deviation of a compressed generation from the uncompressed one, a resume from a checkpoint. The equivalence with the un-split
model is in test_engine.py and test_pipeline.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from flexorch.contract.choices import KVCompression
from flexorch.contract.protocol import EngineSettings, ScoreSpec, TokenizedPrompt
from flexorch.weights.compression import dequantize_groups, quantize_groups
from flexorch.workers.activations import DeviceStore, DiskStore, HostStore
from flexorch.workers.engine import score_prompts
from flexorch.workers.kvcache import CODES, GENERATED, PROMPT, RANGES, KVCache, pack_new_tokens

STORES = {
    "device": lambda tmp: DeviceStore(),
    "host": lambda tmp: HostStore(torch.device("cpu")),  # the cpu tier of a GPU worker, unpinned here
    "disk": lambda tmp: DiskStore(tmp, torch.device("cpu")),
}


def kv(rows: int, tokens: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """keys, values: (rows, kv_heads 2, tokens, head_dim 4), keys = fill, values = -fill."""
    keys = torch.full((rows, 2, tokens, 4), fill)
    return keys, -keys


@pytest.mark.parametrize("store", tuple(STORES))
def test_each_step_attends_over_every_earlier_token_and_the_last_keeps_nothing(store, tmp_path):
    cache = KVCache(STORES[store](tmp_path), steps=3)
    with cache:
        # step 0: the prompt's 5 columns, nothing cached yet
        keys, values = cache.layer(0, layer=7, batch=1).update(*kv(2, 5, 1.0), 7, {"cache_position": None})
        assert keys.shape == (2, 2, 5, 4) and keys.eq(1.0).all() and values.eq(-1.0).all()
        # step 1: one column per suffix (3) after the prompt's
        keys, values = cache.layer(1, 7, 1).update(*kv(2, 3, 2.0), 7)
        assert keys[:, :, :5].eq(1.0).all() and keys[:, :, 5:].eq(2.0).all() and keys.shape[2] == 8
        assert values[:, :, 5:].eq(-2.0).all()
        # step 2 (the last): prompt, step 1's and its own
        keys, _ = cache.layer(2, 7, 1).update(*kv(2, 3, 3.0), 7)
        assert [keys[0, 0, i, 0].item() for i in range(11)] == [1.0] * 5 + [2.0] * 3 + [3.0] * 3
        if store != "disk":  # the disk store keeps its files until close; the others hold nothing now
            assert not cache.store._batches
    if store == "disk":
        assert not any(tmp_path.iterdir())


def test_the_prompt_block_is_written_once_and_the_generated_block_grows(tmp_path):
    store = DeviceStore()
    cache = KVCache(store, steps=4)
    cache.layer(0, 0, 0).update(*kv(1, 6, 1.0))
    prompt = store._batches[(0, 0, PROMPT)]
    for step in (1, 2):
        cache.layer(step, 0, 0).update(*kv(1, 2, float(step + 1)))
        assert store._batches[(0, 0, PROMPT)] is prompt  # read, never rewritten
        assert store._batches[(0, 0, GENERATED)].shape == (1, 2, 2 * step, 8)  # keys and values side by side


def test_keys_wider_than_values_come_back_apart():
    """MLA (DeepSeek-V3) attends with keys of 192 dims over values of 128; here 6 and 4."""
    cache = KVCache(DeviceStore(), steps=2)
    keys = torch.arange(1 * 2 * 3 * 6, dtype=torch.float32).view(1, 2, 3, 6)
    values = -torch.arange(1 * 2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    first = cache.layer(0, 0, 0)
    assert first.get_seq_length() == 0
    first.update(keys, values)
    later = cache.layer(1, 0, 0)
    assert later.get_seq_length() == 3
    got_keys, got_values = later.update(keys[:, :, :1] + 100, values[:, :, :1] - 100)
    assert torch.equal(got_keys, torch.cat([keys, keys[:, :, :1] + 100], dim=2))
    assert torch.equal(got_values, torch.cat([values, values[:, :, :1] - 100], dim=2))


def test_a_new_token_sits_where_it_would_in_the_full_row():
    # prefix of 3; suffix 1 has 2 tokens plus a generated one, suffix 2 only its generated one
    new = pack_new_tokens([((1, 2, 3), ((4, 5, 40), (50,))), ((1,), ((7, 70),))])
    assert new.input_ids.tolist() == [[40, 50], [70, 0]]
    assert new.position_ids.tolist() == [[5, 3], [2, 0]]
    assert new.segment_ids.tolist() == [[1, 2], [1, -1]]  # padding where a row has fewer suffixes


# -- compression ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_groups_come_back_within_half_a_step_of_their_group(bits):
    gen = torch.Generator().manual_seed(0)
    # keys are not centred on zero: an offset per group, and groups of any scale
    x = torch.randn(3, 2, 5, 128, generator=gen) * torch.logspace(-3, 1, 5)[:, None] + 4.0
    x[0, 0, 0, :64] = 2.5  # a constant group: step 0, every value exact
    codes, ranges = quantize_groups(x, bits, 64)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 2, 5, 128 * bits // 8)
    assert ranges.shape == (3, 2, 5, 2, 2) and ranges.dtype == x.dtype
    back = dequantize_groups(codes, ranges, bits)
    groups = x.unflatten(-1, (2, 64))
    step = (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1)
    bound = (step / 2 * (1 + 1e-4) + 1e-6).repeat_interleave(64, dim=-1)
    assert (back - x).abs().le(bound).all()
    assert back[0, 0, 0, :64].eq(2.5).all()
    # what a block read back and put again (the generated block, each step) keeps: the same codes
    again, ranges_again = quantize_groups(back, bits, 64)
    assert torch.equal(again, codes) and torch.allclose(ranges_again, ranges)
    half = quantize_groups(x.to(torch.bfloat16), bits, 64)
    assert dequantize_groups(*half, bits).dtype == torch.bfloat16


def test_the_group_never_mixes_keys_and_values():
    assert KVCompression.group(128, 128) == 64  # FlexGen's group
    assert KVCompression.group(16, 16) == 16  # the tiny models' heads: a group per head
    assert KVCompression.group(192, 128) == 64  # MLA (DeepSeek-V3): the keys' 3 groups end where values start


@pytest.mark.parametrize("store", tuple(STORES))
@pytest.mark.parametrize("compression", ["int8", "int4"])
def test_a_compressed_cache_keeps_codes_in_its_tier_and_attends_over_them_restored(store, compression, tmp_path):
    scheme = KVCompression(compression)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randn(2, 2, 5, 16, generator=gen), torch.randn(2, 2, 5, 16, generator=gen)  # head_dim 16
    new = torch.randn(2, 2, 3, 16, generator=gen), torch.randn(2, 2, 3, 16, generator=gen)
    held = STORES[store](tmp_path)
    cache = KVCache(held, steps=3, compression=scheme)
    with cache:
        cache.select([0], [None])  # one batch, all its rows
        keys, values = cache.layer(0, 7, 0).update(*prompt)
        assert torch.equal(keys, prompt[0])  # step 0 attends over what it computed
        if store != "disk":
            assert held.held()[(7, 0, PROMPT, CODES)].dtype == torch.uint8
            assert set(held.held()) == {(7, 0, PROMPT, CODES), (7, 0, PROMPT, RANGES)}
        keys, values = cache.layer(1, 7, 0).update(*new)
        # the cached columns within a step of their group (16 values: the head), the new ones exact
        step = (prompt[0].amax(-1, keepdim=True) - prompt[0].amin(-1, keepdim=True)) / (2**scheme.bits - 1)
        assert (keys[:, :, :5] - prompt[0]).abs().le(step / 2 * (1 + 1e-4) + 1e-6).all()
        assert not torch.equal(keys[:, :, :5], prompt[0])
        assert torch.equal(keys[:, :, 5:], new[0]) and torch.equal(values[:, :, 5:], new[1])
        cache.select([], [])  # the batch left: both tensors of both blocks are freed
        if store != "disk":
            assert not held.held()
    if store == "disk":
        assert not any(tmp_path.iterdir())


# Measured on the tiny llama (head_dim 16, so a group per head), 4 prompts x 10 greedy tokens:
# int8 kept all 40 tokens and moved the log-probs up to the first divergence by at most 6.4e-4;
# int4 kept 31 of 40 tokens before the sequences diverged, log-probs within 0.011 until then (12
# tokens each of 5 prompts: int8 60 of 60, 8.2e-4; int4 49 of 60, 0.029). The bounds leave room: a
# random model's flat distributions make near-ties easy to flip.
AGREEMENT = {"int8": 0.95, "int4": 0.6}
MAX_LOGPROB_DEVIATION = {"int8": 0.005, "int4": 0.1}


def _greedy(layerwise_dir, prompts, compression, storage):
    settings = EngineSettings(device="cpu", dtype="float32", layers_per_shard=2, storage=storage, batch_tokens=4096,
                              kv_cache_compression=compression)
    results, _ = score_prompts(layerwise_dir, prompts, ScoreSpec("generate", logprobs=True), settings)
    return [(r.scores["ids"][0][:r.scores["n_new"][0]].tolist(), r.scores["logprobs"][0]) for r in results]


def test_a_compressed_cache_deviates_from_the_uncompressed_generation_within_its_measured_bound(layerwise):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(layerwise("llama"))
    texts = ["The quick brown fox jumps over the lazy dog. Question: What is the capital of France? Answer:",
             "Streaming a large language model layer by layer lets a small graphics card run", "0 1 2 3",
             "Once upon a time"]
    prompts = [TokenizedPrompt(i, tuple(tokenizer(t).input_ids), ((),), max_new_tokens=10) for i, t in enumerate(texts)]
    exact = _greedy(layerwise("llama"), prompts, "none", "cpu")
    deviation = {}
    for compression, storage in (("int8", "cpu"), ("int4", "disk")):
        kept, total, worst = 0, 0, 0.0
        for (want, want_lp), (got, got_lp) in zip(exact, _greedy(layerwise("llama"), prompts, compression, storage)):
            same = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            shared = min(same + 1, len(want), len(got))  # the first differing token still had the same context
            kept, total = kept + same, total + len(want)
            worst = max(worst, float(np.abs(want_lp[:shared] - got_lp[:shared]).max()))
        deviation[compression] = worst
        assert kept / total >= AGREEMENT[compression], (compression, kept, total)
        assert 0 < worst <= MAX_LOGPROB_DEVIATION[compression], (compression, worst)
    assert deviation["int4"] > deviation["int8"]  # 16 levels per group against 256


def test_a_compressed_cache_resumes_from_a_checkpoint_byte_identical(layerwise, tmp_path):
    """A checkpoint (workers/checkpoint.py) keeps the tier's codes and ranges as they are, so a round
    resumed from it generates what an uninterrupted one does (here the disk tier: its files linked)."""
    from test_checkpoint import assert_identical, crash_and_resume, settings
    from test_engine import tokenize

    model = layerwise("llama")
    prompts = tokenize(model)
    score = ScoreSpec("next_token_probs", generate_tokens=3)
    run = settings(tmp_path, storage="disk", kv_cache_compression="int4")
    expected, plain = score_prompts(model, prompts, score, dataclasses.replace(run, checkpoint_dir=None))
    results, summary, _, _ = crash_and_resume(model, prompts, score, run, plain.shard_steps - 3)
    assert summary.shards_resumed > 0
    assert_identical(results, expected)
