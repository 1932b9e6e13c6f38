"""The shard loader: slots sized by the decoder shards, the embedding gathered by the rows it needs."""

from __future__ import annotations

import pytest
import torch

from flexorch.contract.shards import plan_shards
from flexorch.workers.layerfile import LayerwiseModel
from flexorch.workers.prefetch import ShardLoader


def loader_of(model: LayerwiseModel, layers: int, dtype=torch.float32, passes: int = 1) -> ShardLoader:
    size = lambda name: model.part_bytes(name, None)  # noqa: E731
    shards = plan_shards(model.manifest, layers, size=size)
    return ShardLoader(model, shards, torch.device("cpu"), dtype, passes=passes, gather=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # an untied head, and one reading the embedding's file
@pytest.mark.parametrize("layers", [1, 3])
def test_slots_hold_the_largest_decoder_shard_not_the_head(arch, layers, large_vocab):
    model = LayerwiseModel(large_vocab(arch)[1])
    decoders = [e.name for e in model.manifest.decoder_layers]
    # 4 layers of 148 KB: shards of 1 layer, or of 3 and 1; the embedding and head are 2 MB each
    largest = max(sum(model.part_bytes(n, None) for n in decoders[i:i + layers]) for i in range(0, 4, layers))
    loader = loader_of(model, layers)
    assert loader.slot_bytes == largest
    assert model.part_bytes("lm_head", None) > 4 * largest
    with loader:
        loader.embed_ids(torch.tensor([3, 1, 3, 2]))
        shards = []
        for _ in loader.shards:
            loaded = loader.next_shard()
            shards.append(loaded.shard)
            loader.release(loaded)
    head = [s for s in shards if s.rows is not None]
    assert [s.rows[0] for s in head] == [0] + [s.rows[1] for s in head[:-1]]  # contiguous, in order
    assert head[-1].rows[1] == model.manifest.vocab_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_gathered_embedding_is_the_whole_tables_rows(dtype, large_vocab):
    model = LayerwiseModel(large_vocab("llama")[1])
    table = model.load("embed")["weight"].to(dtype)
    ids = torch.tensor([[7, 8, 9, 0, 8], [8191, 300, 9, 9, 10]])  # runs 7..10 and singles; repeats
    with loader_of(model, 1, dtype) as loader:
        loader.embed_ids(ids)
        loaded = loader.next_shard()
        rows = loaded.tensors["embed"]["weight"]
        assert loaded.embed_ids.tolist() == [0, 7, 8, 9, 10, 300, 8191]
        assert rows.dtype == dtype and torch.equal(rows, table[loaded.embed_ids])
        assert torch.equal(rows[torch.searchsorted(loaded.embed_ids, ids)], table[ids])  # bit-equal lookups
        assert loaded.nbytes == 7 * model.row_bytes("embed")
        loader.release(loaded)


def test_a_pass_with_more_distinct_ids_than_a_slot_holds_gets_its_own_buffer(large_vocab):
    model = LayerwiseModel(large_vocab("llama")[1])
    ids = torch.arange(0, 8192, 2)  # 4096 rows of 256 bytes: 1 MB, beyond a 148 KB slot
    with loader_of(model, 1) as loader:
        loader.embed_ids(ids)
        loaded = loader.next_shard()
        assert torch.equal(loaded.tensors["embed"]["weight"], model.load("embed")["weight"][ids])
        loader.release(loaded)


def test_without_gather_the_embedding_is_read_whole_and_sizes_the_slots(large_vocab):
    model = LayerwiseModel(large_vocab("llama")[1])
    shards = plan_shards(model.manifest, 1, size=lambda name: model.part_bytes(name, None))
    with ShardLoader(model, shards, torch.device("cpu"), torch.float32) as loader:
        assert loader.slot_bytes == model.part_bytes("embed", None)
        loaded = loader.next_shard()
        assert loaded.embed_ids is None
        assert torch.equal(loaded.tensors["embed"]["weight"], model.load("embed")["weight"])
        loader.release(loaded)


def test_closing_while_the_loader_waits_for_a_passs_ids_returns(large_vocab):
    model = LayerwiseModel(large_vocab("llama")[1])
    with loader_of(model, 1, passes=2) as loader:
        loader.embed_ids(torch.tensor([1, 2]))
        loader.release(loader.next_shard())  # the second pass's embedding waits for ids never given
