"""The shard layout (flexorch/contract/shards.py), with expert streaming: described models, no files."""

import pytest

from flexorch.contract.shards import ALIGN, DENSE_PART, Shard, plan_shards
from flexorch.orchestrator.shapes import llama2_70b, llama3_70b, llama_shaped_manifest, mixtral_8x7b


def test_a_streamed_moe_layer_is_its_dense_part_then_groups_of_experts_under_one_index():
    shards = plan_shards(mixtral_8x7b(), 1, experts_per_group=3)
    assert shards[0] == Shard(0, ("embed",))
    layer0 = [s for s in shards if s.names == ("layer.0",)]
    assert [(s.index, s.experts) for s in layer0] == [(1, DENSE_PART), (1, (0, 3)), (1, (3, 6)), (1, (6, 8))]
    assert [s.last_step for s in layer0] == [False, False, False, True]  # the output is complete after the last group
    assert shards[-1] == Shard(33, ("norm", "lm_head"))
    assert len(shards) == 2 + 32 * 4


def test_without_experts_per_group_moe_layers_are_whole_and_dense_models_unchanged():
    assert [s.experts for s in plan_shards(mixtral_8x7b(), 2)] == [None] * 18
    dense = llama_shaped_manifest(4, 64, 128, 384, heads=4, kv_heads=2)
    assert plan_shards(dense, 1, experts_per_group=2) == plan_shards(dense, 1)


def test_expert_streaming_needs_one_layer_per_shard():
    with pytest.raises(ValueError, match="one layer per shard"):
        plan_shards(mixtral_8x7b(), 2, experts_per_group=2)


def test_a_head_larger_than_a_decoder_shard_is_read_in_steps_of_vocabulary_rows():
    manifest = llama3_70b()  # head 128256 x 8192 x 2 = 2,101,346,304 bytes; a layer 1,711,308,800
    layer = manifest.entry("layer.0").bytes
    shards = plan_shards(manifest, 1)
    head = [s for s in shards if s.rows is not None]
    assert shards[-len(head) - 1] == Shard(80, ("layer.79",)) and {s.index for s in head} == {81}
    assert head[0].names == ("norm", "lm_head") and all(s.names == ("lm_head",) for s in head[1:])
    assert [s.rows[0] for s in head] == [0] + [s.rows[1] for s in head[:-1]] and head[-1].rows[1] == 128256
    row = 8192 * 2
    # each step fits a decoder shard: norm + rows (+ alignment) of the first, which is the largest
    assert 16384 + (head[0].rows[1] * row) + ALIGN <= layer < 16384 + (head[0].rows[1] + 1) * row + ALIGN
    assert [s.last_step for s in head] == [False] * (len(head) - 1) + [True]
    assert len(head) == 2
    assert plan_shards(manifest, 2)[-1] == Shard(41, ("norm", "lm_head"))  # fits two layers' 3.4 GB whole


def test_a_head_that_fits_a_decoder_shard_is_one_shard_and_a_tied_one_reads_the_embedding():
    assert plan_shards(llama2_70b(), 1)[-1] == Shard(81, ("norm", "lm_head"))  # 524 MB head, 1.7 GB layers
    tied = llama_shaped_manifest(4, 64, 128, 8192, heads=4, kv_heads=2, dtype="float32", tied=True)
    head = [s for s in plan_shards(tied, 1) if s.rows is not None]  # 2 MB embedding read as the head
    assert head and head[-1].rows[1] == 8192
