"""The shard layout (flexorch/contract/shards.py), with expert streaming: described models, no files."""

import pytest

from flexorch.contract.shards import DENSE_PART, Shard, plan_shards
from flexorch.orchestrator.shapes import llama_shaped_manifest, mixtral_8x7b


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
