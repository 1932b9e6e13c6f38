"""The model families of 2025-26 (issue 27: DeepSeek-V3, GLM-4.5, Llama 4, gpt-oss, ERNIE 4.5, dots,
Hunyuan, Phi-3.5-MoE, Granite MoE, and dense Seed-OSS, SmolLM3, EXAONE 4, Apertus, Command A, OLMo 3,
Ministral, GLM-4) against the un-split AutoModelForCausalLM, each from a tiny config
(conftest.FAMILIES) with windows and attention chunks shorter than the longest prompt. The 14 types
of demo.ARCHITECTURES run test_engine.py's fuller matrix; these run every score kind with one and
several layers per shard, the KV cache, and (MoE) streamed experts. Types outside the decoder shape
are refused by name."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import FAMILIES, MOE_FAMILIES
from flexorch.contract.errors import UserError
from flexorch.contract.manifest import read_manifest
from flexorch.contract.models import MOE_MODEL_TYPES, TESTED_MODEL_TYPES, check_decoder_config
from flexorch.contract.protocol import ScoreSpec
from flexorch.workers.engine import score_prompts
from test_engine import _MOE_RSS_SCRIPT, assert_greedy_extension, reference_scores, references_of, settings

TOKEN_IDS = (5, 17, 200)


@pytest.fixture(scope="module")
def family_reference(family):
    return references_of(family, steps=2)  # two greedy steps are checked here


def assert_every_kind_matches(model_dir, ref, run, columns: bool = True) -> None:
    """Two greedy steps (the second from the KV cache), suffix log-probs and, with `columns`, token
    columns (a view of the same softmax: once per family is enough)."""
    probs, _ = score_prompts(model_dir, ref.prompts, ScoreSpec("next_token_probs", generate_tokens=2), run)
    assert_greedy_extension(probs, ref, 2)
    if columns:
        picked, _ = score_prompts(model_dir, ref.prompts, ScoreSpec("token_probs", token_ids=TOKEN_IDS), run)
        for result, expected in zip(picked, ref.probs):
            np.testing.assert_allclose(result.scores[:, 0], expected[:, 0, list(TOKEN_IDS)], atol=2e-6, rtol=0)
    logprobs, _ = score_prompts(model_dir, ref.prompts, ScoreSpec("suffix_logprob"), run)
    for result, logprob, greedy in zip(logprobs, ref.logprob, ref.is_greedy):
        np.testing.assert_allclose(result.scores["logprob"], logprob, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(result.scores["is_greedy"], greedy)


def test_the_families_are_in_the_tested_list():
    assert set(FAMILIES) <= set(TESTED_MODEL_TYPES)
    assert set(MOE_FAMILIES) == set(FAMILIES) & set(MOE_MODEL_TYPES)


@pytest.mark.parametrize("model_type", tuple(FAMILIES))
def test_every_score_kind_matches_unsplit_model(model_type, family, family_reference):
    """One layer per shard and all prompts in a batch; three layers per shard and a few batches."""
    model_dir, ref = family(model_type)[1], family_reference(model_type)
    assert max(len(p.prefix_ids) + max(map(len, p.suffix_ids)) for p in ref.prompts) > 8 * 2  # windows, chunks: 8
    assert_every_kind_matches(model_dir, ref, settings(layers_per_shard=1, batch_tokens=4096))
    assert_every_kind_matches(model_dir, ref, settings(layers_per_shard=3, batch_tokens=60), columns=False)


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_streamed_experts_match_unsplit_model(model_type, family, family_reference):
    """Each MoE layer as its dense part and then one expert at a time, over a few batches
    (tests/test_shardrun.py checks groups of 1, 2 and all against transformers' layer)."""
    model_dir, ref = family(model_type)[1], family_reference(model_type)
    manifest = read_manifest(model_dir)
    assert any(entry.experts for entry in manifest.decoder_layers)
    assert_every_kind_matches(model_dir, ref, settings(batch_tokens=60, experts_per_group=1), columns=False)


def test_llama4_no_rope_temperature_follows_each_tokens_own_position_past_floor_scale(family, tmp_path):
    """Llama 4 tempers its no-rope layers' queries by floor((position + 1) / floor_scale); with
    floor_scale 4 (the releases: 8192) the prompts cross it many times, and a packed row's suffixes,
    which restart at the prefix's end, and the greedy steps from the KV cache take their own positions."""
    from flexorch.orchestrator.prepare import prepare_checkpoint

    src = tmp_path / "src"
    shutil.copytree(family("llama4_text")[0], src)  # the family's weights, another floor_scale
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "floor_scale": 4}))
    prepare_checkpoint(src, tmp_path / "layers")
    ref = reference_scores(src)
    assert any(len(p.suffix_ids) > 1 for p in ref.prompts)  # packed rows: later suffixes sit past their position
    assert_every_kind_matches(tmp_path / "layers", ref, settings(layers_per_shard=2, batch_tokens=4096), columns=False)


# What is no decoder of attention layers, each as transformers configures it by default.
REFUSED = {"gpt2": "no num_hidden_layers", "t5": "an encoder-decoder", "bart": "an encoder-decoder",
           "qwen3_next": "recurrent", "falcon_h1": "recurrent", "qwen3_5": "recurrent",
           "qwen3_5_text": "recurrent", "qwen3_5_moe": "recurrent", "mamba": "recurrent", "jamba": "recurrent"}


@pytest.mark.parametrize("model_type", tuple(REFUSED))
def test_a_type_outside_the_decoder_shape_is_refused_in_one_line_naming_it(model_type):
    from transformers import AutoConfig

    config = json.loads(AutoConfig.for_model(model_type).to_json_string())
    with pytest.raises(UserError) as refused:
        check_decoder_config(config, "model/config.json")
    message = str(refused.value)
    assert "\n" not in message and f"model type {model_type!r}" in message and REFUSED[model_type] in message
    assert "tested: llama, " in message and "deepseek_v3" in message


def test_prepare_refuses_qwen3_5_by_name(tmp_path):
    """Qwen3.5 (qwen3_5, transformers 5.25) mixes Gated DeltaNet linear-attention layers into its
    stack: the engine hands only hidden states between shards, so it is refused, not run."""
    from transformers import AutoConfig

    from flexorch.orchestrator.prepare import prepare_checkpoint

    AutoConfig.for_model("qwen3_5").save_pretrained(tmp_path / "model")
    with pytest.raises(UserError, match=r"model type 'qwen3_5' cannot run in flexorch \(recurrent"):
        prepare_checkpoint(tmp_path / "model", tmp_path / "layers")


def test_deepseek_v3_shaped_experts_stream_under_a_ram_cap_below_one_moe_layer(tmp_path):
    """DeepSeek-V3's MoE layout (256 routed experts, 8 per token in 4 of 8 groups, a shared expert,
    a first dense layer) at hidden 512: its MoE layer (805 MB) is larger than the RAM cap. The plan
    streams the experts, and the measured peak RSS stays under the cap."""
    from flexorch.orchestrator.demo import build_checkpoint
    from flexorch.orchestrator.planner import make_plan
    from flexorch.orchestrator.prepare import prepare_checkpoint
    from test_planner import Limits, Spec, machine

    src = build_checkpoint(tmp_path / "src", "deepseek_v3", layout="safetensors",
                           **{**FAMILIES["deepseek_v3"], "hidden_size": 512, "intermediate_size": 1024,
                              "num_hidden_layers": 2, "n_routed_experts": 256, "num_experts_per_tok": 8,
                              "n_group": 8, "topk_group": 4, "moe_intermediate_size": 512})
    manifest = prepare_checkpoint(src, tmp_path / "layers")
    shutil.rmtree(src)
    layer = manifest.entry("layer.1")
    cap = 750 * 10**6
    assert layer.experts == 256 and layer.bytes > cap
    spec = Spec(devices=("cpu",), storage="cpu", limits=Limits(ram=cap))
    plan = make_plan(machine(ram=8 * 10**9, cpus=2), manifest, spec, [43] * 8, suffix_counts=[2] * 8)
    (worker,) = plan.workers
    assert 0 < worker.settings.experts_per_group < layer.experts
    out = subprocess.run([sys.executable, "-c", _MOE_RSS_SCRIPT, str(tmp_path / "layers"),
                          json.dumps(dataclasses.asdict(worker.settings))], capture_output=True, text=True, check=True)
    peak = json.loads(out.stdout.splitlines()[-1])["peak_rss"]
    print(f"MoE layer {layer.bytes / 1e6:.0f} MB, {worker.settings.experts_per_group} experts per group: "
          f"cap {cap / 1e6:.0f} MB, predicted {worker.predicted_peak_ram / 1e6:.0f} MB, measured peak RSS {peak / 1e6:.0f} MB")
    assert peak < cap
