"""The shard runners (workers/shardrun.py) run directly, one shard's steps over a pass's batches: a
streamed MoE layer's dense part and groups of experts against transformers' own decoder layer, a
head in vocabulary steps against the whole head, and what a pass holds between shards. Scores of
whole runs against the un-split model are in test_engine.py."""

from __future__ import annotations

import pytest
import torch

from flexorch.contract.choices import Storage
from flexorch.contract.manifest import DECODER, read_manifest
from flexorch.contract.models import MOE_MODEL_TYPES
from flexorch.contract.protocol import ScoreKind, ScoreSpec
from flexorch.contract.shards import Shard, ShardKind, plan_shards
from flexorch.workers.activations import make_store
from flexorch.workers.adapter import ModelAdapter, additive_mask, attention_allowed
from flexorch.workers.engine import _Pass
from flexorch.workers.kvcache import NoCache
from flexorch.workers.layerfile import LayerwiseModel
from flexorch.workers.link import LocalLink
from flexorch.workers.prefetch import ShardLoader
from flexorch.workers.scoring import StepResult
from conftest import FAMILIES
from flexorch.workers.shardrun import (RUNS, DensePartRun, ExpertGroupRun, HeadStepRun, LayerRun, ShardContext,
                                       shard_runs)

CPU = torch.device("cpu")
# Two prompts, one batch each (batch_tokens 1): a prefix and one suffix; a prefix and two suffixes
# (a mask that keeps them apart).
ROWS = [((1, 2, 3, 4, 5, 6, 7), ((8, 9, 10),)), ((1, 2, 3, 4), ((5,), (6, 7)))]


def run_steps(model_dir, shards: list[Shard], current: _Pass, inputs: list[torch.Tensor],
              score: ScoreSpec = ScoreSpec()) -> LocalLink:
    """`inputs` (per batch (rows, Q, d_model)) sent to the first of `shards`, then every step of them
    run by its runner, as the engine's loop does; returns the link holding what they sent on."""
    model = LayerwiseModel(model_dir)
    link = LocalLink(make_store(Storage.CPU, CPU, None))
    context = ShardContext(model, ModelAdapter(model_dir, CPU, torch.float32), link, NoCache(), score, CPU)
    for b, hidden in enumerate(inputs):
        link.send(0, shards[0].index, b, hidden)
    with torch.inference_mode(), ShardLoader(model, shards, CPU, torch.float32) as loader:
        for run in shard_runs(shards, context):
            loaded = loader.next_shard()
            run.run(loaded, current, lambda done, batches: None)
            loader.release(loaded)
    return link


@pytest.fixture(scope="module")
def moe_model(checkpoint, layerwise, family):
    """moe_model(arch) -> (layerwise dir, transformers' own model of the tiny checkpoint) of a MoE type of
    demo's architectures or of conftest's FAMILIES (cached)."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(arch):
        if arch not in cache:
            src, model_dir = family(arch) if arch in FAMILIES else (checkpoint(arch), layerwise(arch))
            cache[arch] = model_dir, AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        return cache[arch]

    return get


# Every MoE layout: routed top-k (Mixtral, Qwen, OLMoE, ERNIE, Phi-3.5-MoE, Granite MoE, Hunyuan),
# shared experts beside them, routed outputs scaled after group-limited sigmoid routing (DeepSeek-V3,
# GLM-4.5, dots), biased clamped experts (gpt-oss), and experts whose input the router score scales
# (Llama 4).
@pytest.mark.parametrize("arch", MOE_MODEL_TYPES)
def test_a_dense_part_and_groups_of_experts_sum_to_transformers_whole_moe_layer(arch, moe_model):
    model_dir, hf = moe_model(arch)
    manifest = read_manifest(model_dir)
    entry = next(e for e in manifest.layers if e.kind == DECODER and e.experts)
    layer = hf.model.layers[entry.index]
    current = _Pass.of_rows(ROWS, batch_tokens=1, kind=ScoreKind.NEXT_TOKEN_PROBS)
    torch.manual_seed(0)
    inputs = [torch.randn(*packed.shape, manifest.hidden_size) for packed in current.packed]
    kind = ModelAdapter(model_dir, CPU, torch.float32).layer_kinds[entry.index]
    expected = []  # per batch: transformers' layer, given the mask and positions the engine builds
    with torch.no_grad():
        for hidden, packed in zip(inputs, current.packed):
            mask = additive_mask(attention_allowed(packed, kind.window, chunk=kind.chunk), torch.float32)
            out = layer(hidden, attention_mask=mask, position_ids=packed.position_ids,
                        position_embeddings=hf.model.rotary_emb(hidden, packed.position_ids))
            expected.append(out[0] if isinstance(out, tuple) else out)
    for group in (1, 2, entry.experts):
        steps = [s for s in plan_shards(manifest, 1, group) if s.names == (entry.name,)]
        assert [RUNS[step.kind] for step in steps] == (
            [DensePartRun] + [ExpertGroupRun] * -(-entry.experts // group))
        current = _Pass.of_rows(ROWS, batch_tokens=1, kind=ScoreKind.NEXT_TOKEN_PROBS)
        link = run_steps(model_dir, steps, current, [h.clone() for h in inputs])
        assert current.streamed is None, "the layer is whole again after its last group"
        for b, want in enumerate(expected):
            torch.testing.assert_close(link.receive(0, steps[0].index + 1, b), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("score", [ScoreSpec("suffix_logprob"), ScoreSpec("next_token_probs"),
                                   ScoreSpec("token_probs", token_ids=(3, 300, 8191))], ids=str)
def test_a_head_in_vocabulary_steps_records_the_whole_heads_results(score, large_vocab):
    model_dir = large_vocab("llama")[1]
    manifest = read_manifest(model_dir)
    stepped = [s for s in plan_shards(manifest, 1) if s.rows is not None]
    whole = [Shard(stepped[0].index, stepped[0].names)]  # norm + the whole head
    assert len(stepped) > 2 and [RUNS[shard.kind] for shard in stepped + whole] == (
        [HeadStepRun] * len(stepped) + [LayerRun])
    torch.manual_seed(0)
    inputs = [torch.randn(*packed.shape, manifest.hidden_size)
              for packed in _Pass.of_rows(ROWS, 1, score.kind).packed]
    results = {}
    for name, shards in (("stepped", stepped), ("whole", whole)):
        current = _Pass.of_rows(ROWS, batch_tokens=1, kind=score.kind)
        run_steps(model_dir, shards, current, inputs, score)
        assert current.head_steps is None
        results[name] = current.results
    for got, want in zip(results["stepped"], results["whole"]):
        torch.testing.assert_close(got.values, want.values, atol=1e-6 if score.kind.generates else 1e-5, rtol=0)
        for field in ("is_greedy", "next_ids"):
            assert (getattr(got, field) is None) == (getattr(want, field) is None)
            if getattr(want, field) is not None:
                assert torch.equal(getattr(got, field), getattr(want, field))


def test_a_passs_batch_results_are_shared_out_per_prompt_in_their_rows_order():
    rows = [((1,), ((2,), (3,))), ((1, 2, 3, 4), ((5,),)), ((1, 2), ((3,), (4,), (5,)))]
    current = _Pass.of_rows(rows, batch_tokens=10, kind=ScoreKind.SUFFIX_LOGPROB)
    assert current.batches == [[1, 2], [0]]  # longest first: prompts 1 and 2 share a batch
    current.record(0, StepResult(torch.tensor([10., 20., 21., 22.]), torch.tensor([True, False, True, True]), None))
    current.record(1, StepResult(torch.tensor([0., 1.]), torch.tensor([False, False]), None))
    shares = {i: (r.values.tolist(), r.is_greedy.tolist(), r.next_ids) for i, r in current.prompt_results()}
    assert shares == {0: ([0., 1.], [False, False], None), 1: ([10.], [True], None),
                      2: ([20., 21., 22.], [False, True, True], None)}


def test_every_kind_of_shard_has_a_runner():
    assert set(RUNS) == set(ShardKind)
    assert {Shard(0, ("embed",)).kind, Shard(1, ("layer.0",), (0, 0), 4).kind, Shard(1, ("layer.0",), (0, 2), 4).kind,
            Shard(2, ("lm_head",), rows=(10, 20), head_rows=30).kind} == set(ShardKind)
