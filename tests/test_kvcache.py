"""The KV cache's bookkeeping (workers/kvcache.py) over every store: what each step keeps, what it
returns to the attention layer, and that nothing is left once the last step has read it. The
equivalence with the un-split model is in test_engine.py and test_pipeline.py."""

from __future__ import annotations

import pytest
import torch

from flexorch.workers.activations import DeviceStore, DiskStore, HostStore
from flexorch.workers.kvcache import GENERATED, PROMPT, KVCache, pack_new_tokens

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
