"""The engine against the un-split Hugging Face model, for every supported architecture.

References are computed with AutoModelForCausalLM on prefix_ids + suffix_ids (one forward per
suffix, the tokenizer reloaded from the model dir), then compared with the layer-streamed scores
for several shard sizes, storages and batch budgets.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from flexorch.orchestrator.demo import ARCHITECTURES
from flexorch.workers.adapter import _cache_kwarg, attention_allowed
from flexorch.workers.engine import EngineHooks, _Pass, make_batches, score_prompts
from flexorch.workers.fileread import cached_share

from test_fileread import evict, takes_direct_reads
from flexorch.workers.kvcache import append_columns, pack_new_tokens
from flexorch.contract.errors import UserError
from flexorch.contract.manifest import read_manifest
from flexorch.contract.models import MOE_MODEL_TYPES
from flexorch.workers.layerfile import LayerIntegrityError
from flexorch.contract.protocol import EngineSettings, ScoreSpec, TokenizedPrompt

# Lengths vary from 1 token to several times the tiny models' sliding window (12), suffixes
# include one-token and empty ones.
TEXTS = [
    ("The quick brown fox jumps over the lazy dog. Question: What is the capital of France? Answer:",
     [" Paris", " Mars, the red planet", " A", ""]),
    ("Hi", [" yes", " no"]),
    ("Streaming a large language model layer by layer lets a small graphics card run a model far larger",
     [" than its memory", " B", " C D E"]),
    ("0 1 2 3", [" 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20", " 4"]),
]
GREEDY_STEPS = 5  # the longest generation tested (the KV cache: 2, 3 and 5 steps)


def tokenize(model_dir) -> list[TokenizedPrompt]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [
        TokenizedPrompt(i, tuple(tokenizer(prefix).input_ids),
                        tuple(tuple(tokenizer(s, add_special_tokens=False).input_ids) for s in suffixes))
        for i, (prefix, suffixes) in enumerate(TEXTS)
    ]


@dataclass
class Reference:
    prompts: list[TokenizedPrompt]
    probs: list[np.ndarray]  # per prompt: (n_suffixes, GREEDY_STEPS, vocab), greedy-extended
    generated: list[list[tuple[int, ...]]]  # per prompt, per suffix: the greedy ids
    logprob: list[np.ndarray]  # per prompt: (n_suffixes,)
    is_greedy: list[np.ndarray]


def reference_scores(model_dir, steps: int = GREEDY_STEPS) -> Reference:
    """The un-split model's scores, greedy-extended `steps` tokens (fewer where a test checks fewer:
    each step is a forward per suffix)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = tokenize(model_dir)
    ref = Reference(prompts, [], [], [], [])
    with torch.no_grad():
        for prompt in prompts:
            probs, gens, logprobs, greedy = [], [], [], []
            for suffix in prompt.suffix_ids:
                ids = list(prompt.prefix_ids) + list(suffix)
                logits = model(torch.tensor([ids])).logits[0].float()
                last, extended, gen = logits[-1], [], []
                for step in range(steps):
                    if step:  # step 0's last logits are the prompt's own
                        last = model(torch.tensor([ids])).logits[0, -1].float()
                    extended.append(torch.softmax(last, -1).numpy())
                    gen.append(int(last.argmax()))
                    ids = ids + [gen[-1]]
                probs.append(np.stack(extended))
                gens.append(tuple(gen))
                start = len(prompt.prefix_ids) - 1
                predicted = logits[start:start + len(suffix)]
                target = torch.tensor(suffix, dtype=torch.long)
                # summed in float64, as the engine does (one float32 ulp at -400 is 3e-5)
                logprobs.append(float(torch.log_softmax(predicted, -1).gather(1, target[:, None]).double().sum()))
                greedy.append(bool((predicted.argmax(-1) == target).all()))
            ref.probs.append(np.stack(probs))
            ref.generated.append(gens)
            ref.logprob.append(np.array(logprobs))
            ref.is_greedy.append(np.array(greedy))
    return ref


@pytest.fixture(scope="session")
def references(checkpoint):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = reference_scores(checkpoint(arch))
        return cache[arch]

    return get


def settings(**overrides) -> EngineSettings:
    base = dict(device="cpu", dtype="float32", layers_per_shard=1, storage="cpu", batch_tokens=4096)
    return EngineSettings(**{**base, **overrides})


# (layers_per_shard, storage, batch_tokens, double_buffer): 1 and >1 layers, every storage, budgets that
# put all prompts in one batch, split them across batches, and force one prompt per batch; two shard
# slots and one.
# layers per shard, storage, batch tokens, two slots, layer files read cold around the page cache
CONFIGS = [(1, "cpu", 4096, True, False), (3, "gpu", 60, True, True), (2, "disk", 1, False, True)]


def evicted(model_dir: Path, direct: bool) -> Path:
    """The layer files dropped from the page cache, so direct reads take them from the disk (a mostly
    cached file is copied from the cache: workers/fileread.py)."""
    if direct:
        for path in (model_dir / "layers").iterdir():
            evict(path)
    return model_dir


@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_next_token_probs_match_unsplit_model(arch, layerwise, references, tmp_path):
    ref = references(arch)
    for layers, storage, budget, double_buffer, direct in CONFIGS:
        model_dir = evicted(layerwise(arch), direct)
        results, summary = score_prompts(
            model_dir, ref.prompts, ScoreSpec("next_token_probs"),
            settings(layers_per_shard=layers, storage=storage, batch_tokens=budget, disk_folder=str(tmp_path),
                     double_buffer=double_buffer, direct_reads=direct))
        if direct and takes_direct_reads(next((model_dir / "layers").iterdir())):  # read around the cache: only the headers landed there
            assert all(cached_share(p, p.stat().st_size) < 0.1 for p in (model_dir / "layers").glob("*_layer.*"))
        assert [r.index for r in results] == [p.index for p in ref.prompts]
        for result, expected in zip(results, ref.probs):
            assert result.scores.dtype == np.float32
            assert result.scores.shape == (expected.shape[0], 1, expected.shape[2])
            np.testing.assert_allclose(result.scores[:, 0], expected[:, 0], atol=2e-6, rtol=0)
        assert summary.bytes_read > 0
    assert not any(tmp_path.iterdir()), "disk activations are removed after the pass"


@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_suffix_logprob_matches_unsplit_model(arch, layerwise, references, tmp_path):
    ref = references(arch)
    for layers, storage, budget, double_buffer, direct in CONFIGS:
        results, _ = score_prompts(
            evicted(layerwise(arch), direct), ref.prompts, ScoreSpec("suffix_logprob"),
            settings(layers_per_shard=layers, storage=storage, batch_tokens=budget, disk_folder=str(tmp_path),
                     double_buffer=double_buffer, direct_reads=direct))
        for result, prompt, logprob, greedy in zip(results, ref.prompts, ref.logprob, ref.is_greedy):
            scores = result.scores
            np.testing.assert_allclose(scores["logprob"], logprob, atol=1e-4, rtol=0)
            np.testing.assert_array_equal(scores["is_greedy"], greedy)
            np.testing.assert_array_equal(scores["n_tokens"], [len(s) for s in prompt.suffix_ids])
            assert scores["logprob"].dtype == np.float64


def assert_greedy_extension(results, ref: Reference, steps: int) -> None:
    """Scores and ids of `steps` greedy steps equal the un-split model's greedy extension."""
    for result, expected, generated in zip(results, ref.probs, ref.generated):
        assert result.scores.shape == expected[:, :steps].shape
        np.testing.assert_allclose(result.scores, expected[:, :steps], atol=2e-6, rtol=0)
        assert [tuple(g) for g in result.generated] == [g[:steps] for g in generated]


@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv-cache", "recompute"])
@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_greedy_generation_matches_unsplit_model(arch, kv_cache, layerwise, references):
    ref = references(arch)
    results, _ = score_prompts(layerwise(arch), ref.prompts, ScoreSpec("next_token_probs", generate_tokens=3),
                               settings(layers_per_shard=2, batch_tokens=64, kv_cache=kv_cache))
    assert_greedy_extension(results, ref, 3)


# (steps, layers_per_shard, storage, batch_tokens): 2, 3 and 5 steps, the cache in every tier, one and
# several layers per shard, one batch, a few, one prompt per batch.
KV_CONFIGS = [(2, 1, "cpu", 4096), (3, 2, "disk", 1), (5, 3, "gpu", 60), (5, 2, "cpu", 1), (2, 3, "disk", 60)]


@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_kv_cache_generation_matches_unsplit_greedy_extension(arch, layerwise, references, tmp_path):
    ref = references(arch)
    for steps, layers, storage, budget in KV_CONFIGS:
        results, _ = score_prompts(
            layerwise(arch), ref.prompts, ScoreSpec("next_token_probs", generate_tokens=steps),
            settings(layers_per_shard=layers, storage=storage, batch_tokens=budget, disk_folder=str(tmp_path)))
        assert_greedy_extension(results, ref, steps)
    assert not any(tmp_path.iterdir()), "the disk tier's cache files are removed after the round"


def test_cached_steps_compute_one_token_per_suffix(layerwise, references):
    ref = references("llama")
    run = lambda kv: score_prompts(layerwise("llama"), ref.prompts, ScoreSpec(generate_tokens=3),  # noqa: E731
                                   settings(batch_tokens=1, kv_cache=kv))[1]
    first = sum(p.n_tokens for p in ref.prompts)  # one prompt per batch: no padding
    suffixes = sum(len(p.suffix_ids) for p in ref.prompts)
    shards = 6  # the embedding, 4 decoder layers, norm + head
    # with the cache each later step computes the newest token of every suffix; without, every row
    # again, one token longer per suffix each step
    assert run(True).tokens == shards * (first + 2 * suffixes)
    assert run(False).tokens == shards * (3 * first + (1 + 2) * suffixes)


# Experts per group: one (every score kind, greedy steps too), two (the last group smaller where the
# count is odd) and all; each with another activation storage and batch budget.
EXPERT_GROUPS = [(1, "cpu", 4096, ("next_token_probs", "token_probs", "suffix_logprob")),
                 (2, "disk", 60, ("next_token_probs", "suffix_logprob")),
                 (None, "gpu", 60, ("next_token_probs", "suffix_logprob"))]


@pytest.mark.parametrize("arch", [t for t in MOE_MODEL_TYPES if t in ARCHITECTURES])  # others: test_families.py
def test_streamed_experts_match_unsplit_model(arch, layerwise, references, tmp_path):
    """Scores with each MoE layer run as its dense part and then groups of experts."""
    ref = references(arch)
    manifest = read_manifest(layerwise(arch))
    for group, storage, budget, kinds in EXPERT_GROUPS:
        run = settings(storage=storage, batch_tokens=budget, disk_folder=str(tmp_path),
                       experts_per_group=group or manifest.decoder_layers[0].experts)
        steps = 3 if group == 1 else 1
        probs, summary = score_prompts(layerwise(arch), ref.prompts, ScoreSpec("next_token_probs", generate_tokens=steps),
                                       run)
        for result, expected, generated in zip(probs, ref.probs, ref.generated):
            np.testing.assert_allclose(result.scores, expected[:, :steps], atol=2e-6, rtol=0)
            assert [tuple(g) for g in result.generated] == [g[:steps] for g in generated]
        # each expert is read once per pass, the dense parts and the edges too: no layer twice
        assert summary.bytes_read < steps * manifest.total_bytes
        if "token_probs" in kinds:
            token_ids = (5, 17, 200)
            columns, _ = score_prompts(layerwise(arch), ref.prompts, ScoreSpec("token_probs", token_ids=token_ids),
                                       run)
            for result, expected in zip(columns, ref.probs):
                np.testing.assert_allclose(result.scores[:, 0], expected[:, 0, list(token_ids)], atol=2e-6, rtol=0)
        logprobs, _ = score_prompts(layerwise(arch), ref.prompts, ScoreSpec("suffix_logprob"), run)
        for result, logprob, greedy in zip(logprobs, ref.logprob, ref.is_greedy):
            np.testing.assert_allclose(result.scores["logprob"], logprob, atol=1e-4, rtol=0)
            np.testing.assert_array_equal(result.scores["is_greedy"], greedy)


@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_token_probs_are_columns_of_the_full_softmax(arch, layerwise, references):
    ref = references(arch)
    token_ids = (5, 17, 200)
    results, _ = score_prompts(layerwise(arch), ref.prompts,
                               ScoreSpec("token_probs", token_ids=token_ids, generate_tokens=2), settings())
    for result, expected in zip(results, ref.probs):
        np.testing.assert_allclose(result.scores, expected[:, :2, list(token_ids)], atol=2e-6, rtol=0)


def test_prefix_is_computed_once_per_prompt():
    rows = [((1, 2, 3, 4, 5), ((6,), (7, 8), ())), ((1, 2), ((3,),))]
    packed = _Pass.of_rows(rows, batch_tokens=1000, kind="next_token_probs")
    # one row per prompt: prefix + every suffix once (5 + 3 = 8 tokens), padded to the longest row
    assert packed.packed[0].input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 0, 0, 0, 0, 0]]
    assert packed.packed[0].position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 5, 6]


def test_a_new_token_sees_its_prefix_its_suffix_and_its_own_generated_tokens():
    """One row: prefix (2 tokens), suffix 1 (1 token), suffix 2 (empty), after two cached steps: the
    newest token of each suffix attends to the prefix, its suffix and its earlier generated token."""
    rows = [((1, 2), ((3,), ()))]
    keys = _Pass.of_rows(rows, 1000, "next_token_probs").keys[0]
    rows = [((1, 2), ((3, 10), (20,)))]  # step 1: each suffix got its first generated token
    keys = append_columns(keys, pack_new_tokens(rows))
    rows = [((1, 2), ((3, 10, 11), (20, 21)))]  # step 2
    new = pack_new_tokens(rows)
    assert new.position_ids.tolist() == [[4, 3]]  # where they sit in prefix + suffix + generated
    allowed = attention_allowed(append_columns(keys, new), None, queries=2)[0, 0].int().tolist()
    #        prefix  s1   step 1: s1 s2   step 2: s1 s2
    assert allowed == [[1, 1, 1, 1, 0, 1, 0],
                       [1, 1, 0, 0, 1, 0, 1]]
    window = attention_allowed(append_columns(keys, new), 2, queries=2)[0, 0].int().tolist()
    assert window == [[0, 0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 1, 0, 1]]  # positions 3..4 and 2..3 only


FORWARDS = {  # a decoder layer's forward as each transformers version names its cache
    "cache": lambda self, hidden_states, attention_mask=None, cache=None, **kwargs: None,  # 5.2x
    "past_key_values": lambda self, hidden_states, attention_mask=None, past_key_values=None, **kwargs: None,
    "past_key_value": lambda self, hidden_states, attention_mask=None, past_key_value=None, **kwargs: None,  # 4.x
}


@pytest.mark.parametrize("name", tuple(FORWARDS))
def test_the_cache_goes_under_the_name_the_decoder_layer_takes(name):
    forward = FORWARDS[name]

    @functools.wraps(forward)
    def deprecating(*args, **kwargs):  # as transformers' deprecate_kwarg wraps forward
        return forward(*args, **kwargs)

    assert _cache_kwarg(forward) == _cache_kwarg(deprecating) == name


def test_layouts_beyond_the_cache_are_rebuilt_from_ids_moved_to_the_device_once_per_pass(layerwise, references,
                                                                                          monkeypatch):
    """With no room to keep a pass's masks and rotary tables, each layer rebuilds them, but from
    position and segment ids already on the device: moving them (from pageable memory, which on a
    GPU waits for every queued kernel) happens once per batch and pass, not once per layer."""
    import flexorch.workers.engine as engine

    ref = references("llama")
    run = settings(layers_per_shard=2, batch_tokens=60)
    kept, _ = score_prompts(layerwise("llama"), ref.prompts, ScoreSpec("next_token_probs"), run)
    calls, moves = [], []
    original = engine._Pass.ids_on_device

    def counted(self, b, device):
        calls.append(b)
        if b not in self._ids_on_device:
            moves.append(b)
        return original(self, b, device)

    monkeypatch.setattr(engine, "LAYOUT_CACHE_BYTES", 0)
    monkeypatch.setattr(engine._Pass, "ids_on_device", counted)
    rebuilt, _ = score_prompts(layerwise("llama"), ref.prompts, ScoreSpec("next_token_probs"), run)
    batches = len(make_batches([(p.prefix_ids, p.suffix_ids) for p in ref.prompts], 60))
    layers = read_manifest(layerwise("llama")).num_layers
    assert sorted(moves) == list(range(batches))
    assert len(calls) == batches * layers  # every layer rebuilt its layout
    for a, b in zip(kept, rebuilt):
        np.testing.assert_array_equal(a.scores, b.scores)


def test_the_heap_keeps_the_planned_slack_between_shards(layerwise, references, monkeypatch):
    from flexorch.workers.heap import Heap

    slacks = []
    monkeypatch.setattr(Heap, "trim", lambda self, slack: slacks.append(slack) or True)
    ref = references("llama")
    score_prompts(layerwise("llama"), ref.prompts, ScoreSpec("next_token_probs"), settings(heap_slack=12345))
    assert slacks and set(slacks) == {12345}  # after every shard


def test_batches_respect_the_token_budget():
    rows = [((1,) * n, ((2,),)) for n in (3, 9, 5, 9, 2, 4)]
    batches = make_batches(rows, batch_tokens=20)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    for batch in batches:
        longest = max(len(rows[i][0]) + 1 for i in batch)
        assert longest * len(batch) <= 20 or len(batch) == 1
    assert batches[0] == [1, 3]  # the two longest share a batch


def test_half_precision_runs_on_cpu(layerwise, references):
    ref = references("llama")
    results, _ = score_prompts(layerwise("llama"), ref.prompts, ScoreSpec("next_token_probs"),
                               settings(dtype="bfloat16"))
    for result, expected in zip(results, ref.probs):
        np.testing.assert_allclose(result.scores[:, 0], expected[:, 0], atol=0.05)


def test_hooks_see_every_shard_and_batch(layerwise, references):
    ref = references("llama")
    shards, batches = [], []
    hooks = EngineHooks(before_batch=lambda step, shard, batch: batches.append((step, shard, batch)),
                        after_shard=lambda step, shard: shards.append((step, shard)))
    score_prompts(layerwise("llama"), ref.prompts, ScoreSpec("next_token_probs", generate_tokens=2),
                  settings(layers_per_shard=2, batch_tokens=1), hooks=hooks)
    # embed, 2 shards of 2 decoder layers, norm + head; twice (two greedy steps)
    assert shards == [(step, shard) for step in range(2) for shard in range(4)]
    assert len(batches) == 2 * 4 * len(ref.prompts)


def test_progress_is_reported_after_every_batch_within_a_shard(layerwise, references):
    ref = references("llama")
    events = []
    score_prompts(layerwise("llama"), ref.prompts, ScoreSpec("suffix_logprob"),
                  settings(layers_per_shard=2, batch_tokens=1), on_progress=events.append)  # a batch per prompt
    n = len(ref.prompts)
    # embed, 2 shards of 2 decoder layers, norm + head: each reports batches 1..n-1 as it goes (stage: the
    # shards done before it), then its end (stage: those done with it)
    assert [(e.stage, e.batch, e.batches) for e in events] == [
        event for done in range(4) for event in [(done, b, n) for b in range(1, n)] + [(done + 1, 0, 0)]]
    assert all(e.tokens_done > 0 and e.prompts == n for e in events)


def test_an_engine_and_its_shard_slots_are_freed_when_its_run_returns(layerwise, references):
    # A worker runs one engine per round: a reference cycle would keep the last round's slots (a layer each)
    # alive beside the next round's until the garbage collector happened to run.
    import gc
    import weakref

    from flexorch.workers.engine import Engine

    ref = references("llama")
    engine = Engine(layerwise("llama"), settings(batch_tokens=1), ScoreSpec("suffix_logprob"),
                    on_progress=lambda event: None)
    gc.disable()
    try:
        engine.run(ref.prompts)
        freed = weakref.ref(engine)
        del engine
        assert freed() is None
    finally:
        gc.enable()


def test_one_slot_reads_each_shard_only_after_the_one_before_is_released(layerwise):
    from flexorch.contract.shards import plan_shards
    from flexorch.workers.layerfile import LayerwiseModel
    from flexorch.workers.prefetch import ShardLoader

    model = LayerwiseModel(layerwise("llama"))
    shards = plan_shards(model.manifest, 1)
    events, read = [], model.read_part_into

    def recording_read(name, experts, buffer, **options):
        events.append(("read", name))
        return read(name, experts, buffer, **options)

    model.read_part_into = recording_read
    with ShardLoader(model, shards, torch.device("cpu"), torch.float32, slots=1) as loader:
        assert len(loader._slots) == 1
        for shard in shards:
            loaded = loader.next_shard()
            events.append(("release", loaded.shard.index))
            loader.release(loaded)
    expected = []
    for shard in shards:
        expected += [("read", name) for name in shard.names] + [("release", shard.index)]
    assert events == expected


def test_corrupt_layer_is_detected_before_use(layerwise, references, tmp_path):
    ref = references("llama")
    model_dir = tmp_path / "model"
    shutil.copytree(layerwise("llama"), model_dir)
    manifest = json.loads((model_dir / "flexorch_manifest.json").read_text())
    victim = model_dir / manifest["layers"][2]["file"]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(LayerIntegrityError, match=victim.name):
        score_prompts(model_dir, ref.prompts, ScoreSpec(), settings())


def relabel(model_dir, **config):
    """Change config.json, and the manifest's copy of what it says, as if prepared so."""
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    manifest = json.loads((model_dir / "flexorch_manifest.json").read_text())
    manifest["model_type"] = config["model_type"]
    manifest["architectures"] = config["architectures"]
    manifest["config"].update(config)
    (model_dir / "flexorch_manifest.json").write_text(json.dumps(manifest))


def test_untested_model_type_is_refused_unless_allowed(layerwise, references, tmp_path, monkeypatch):
    """A Llama relabelled seed_oss (transformers' Seed-OSS has Llama's layers), taken off the tested
    list: refused by name with the tested list, and with allow_untested_models run through the
    general adapter."""
    import flexorch.contract.models as models

    monkeypatch.setattr(models, "TESTED_MODEL_TYPES", tuple(t for t in models.TESTED_MODEL_TYPES if t != "seed_oss"))
    model_dir = tmp_path / "model"
    shutil.copytree(layerwise("llama"), model_dir)
    relabel(model_dir, model_type="seed_oss", architectures=["SeedOssForCausalLM"])
    ref = references("llama")
    with pytest.raises(UserError, match=r"'seed_oss' is not tested .*tested: llama, .*mixtral.*allow_untested_models"):
        score_prompts(model_dir, ref.prompts, ScoreSpec(), settings())
    results, _ = score_prompts(model_dir, ref.prompts, ScoreSpec(), settings(allow_untested_models=True))
    for result, expected in zip(results, ref.probs):
        np.testing.assert_allclose(result.scores[:, 0], expected[:, 0], atol=2e-6, rtol=0)


def test_a_model_without_the_decoder_shape_is_refused(layerwise, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(layerwise("llama"), model_dir)
    relabel(model_dir, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=64, n_layer=4, n_head=4)
    with pytest.raises(UserError, match="GPT2LMHeadModel is not embeddings → decoder layers → norm → lm head"):
        score_prompts(model_dir, tokenize(layerwise("llama")), ScoreSpec(), settings(allow_untested_models=True))


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    from flexorch.workers.engine import score_prompts
    from flexorch.contract.protocol import EngineSettings, ScoreSpec, TokenizedPrompt
    prompts = [TokenizedPrompt(i, tuple(range(1, 40)), ((50, 51), (52,))) for i in range(8)]
    _, summary = score_prompts(sys.argv[1], prompts, ScoreSpec(),
                               EngineSettings("cpu", "float32", 1, "cpu", 4096, verify_checksums=False))
    print(json.dumps({"peak_rss": summary.peak_rss, "bytes_read": summary.bytes_read}))
""")


def test_peak_rss_follows_the_layer_not_the_model(tmp_path):
    """A model 4x as deep (and ~150 MB larger) costs far less than 150 MB more RSS to stream."""
    from flexorch.orchestrator.demo import build_checkpoint
    from flexorch.orchestrator.prepare import prepare_checkpoint

    peaks, sizes = {}, {}
    for layers in (4, 16):
        src = build_checkpoint(tmp_path / f"src{layers}", "llama", hidden_size=512, intermediate_size=1536,
                               num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                               layout="safetensors")
        manifest = prepare_checkpoint(src, tmp_path / f"layers{layers}")
        shutil.rmtree(src)
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / f"layers{layers}")],
                             capture_output=True, text=True, check=True)
        peaks[layers] = json.loads(out.stdout.splitlines()[-1])["peak_rss"]
        sizes[layers] = manifest.total_bytes
    model_growth = sizes[16] - sizes[4]  # 12 layers of ~12.6 MB
    rss_growth = peaks[16] - peaks[4]
    print(f"model {sizes[4] / 1e6:.0f} -> {sizes[16] / 1e6:.0f} MB, peak RSS {peaks[4] / 1e6:.0f} -> "
          f"{peaks[16] / 1e6:.0f} MB")
    assert model_growth > 140e6
    assert rss_growth < 0.15 * model_growth


_MOE_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    from flexorch.workers.engine import score_prompts
    from flexorch.contract.protocol import EngineSettings, ScoreSpec, TokenizedPrompt
    prompts = [TokenizedPrompt(i, tuple(range(1, 40)), ((50, 51), (52,))) for i in range(8)]
    settings = EngineSettings(**json.loads(sys.argv[2]))
    _, summary = score_prompts(sys.argv[1], prompts, ScoreSpec(), settings)
    print(json.dumps({"peak_rss": summary.peak_rss}))
""")


def test_streamed_experts_keep_peak_rss_below_the_cap_and_the_whole_layer_run(tmp_path):
    """A Mixtral of two 101 MB layers (32 experts of 3.1 MB) under a RAM cap in which the planner
    cannot fit whole layers (it counts 512 MB for Python + torch): it streams the experts, and the
    measured peak stays below the cap and well below a whole-layer run's (measured ~140 MB lower)."""
    from dataclasses import asdict

    from flexorch.orchestrator.demo import build_checkpoint
    from flexorch.orchestrator.planner import make_plan
    from flexorch.orchestrator.prepare import prepare_checkpoint
    from test_planner import Limits, Spec, machine

    # two layers, so that the whole-layer run's double buffer holds two MoE layers at once
    src = build_checkpoint(tmp_path / "src", "mixtral", hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                           num_local_experts=32, layout="safetensors")
    manifest = prepare_checkpoint(src, tmp_path / "layers")
    shutil.rmtree(src)
    layer = manifest.entry("layer.0")
    cap = 700 * 10**6
    spec = Spec(devices=("cpu",), storage="cpu", limits=Limits(ram=cap))
    (worker,) = make_plan(machine(ram=8 * 10**9, cpus=2), manifest, spec, [43] * 8, suffix_counts=[2] * 8).workers
    streamed = worker.settings
    assert 0 < streamed.experts_per_group < layer.experts
    peaks = {}
    for name, settings in (("streamed", streamed), ("whole", dataclasses.replace(streamed, experts_per_group=0))):
        out = subprocess.run([sys.executable, "-c", _MOE_RSS_SCRIPT, str(tmp_path / "layers"),
                              json.dumps(asdict(settings))], capture_output=True, text=True, check=True)
        peaks[name] = json.loads(out.stdout.splitlines()[-1])["peak_rss"]
    print(f"layer {layer.bytes / 1e6:.0f} MB, {streamed.experts_per_group} experts per group: peak RSS "
          f"{peaks['streamed'] / 1e6:.0f} MB streamed, {peaks['whole'] / 1e6:.0f} MB whole layers, cap {cap / 1e6:.0f} MB")
    assert peaks["streamed"] < cap
    # the two slots shrink from two layers to two steps: at least half of that difference shows in RSS
    saved = 2 * (layer.bytes - streamed.experts_per_group * layer.expert_bytes)
    assert peaks["whole"] - peaks["streamed"] > saved / 2

def test_a_resident_model_is_read_once_for_every_step_and_call(layerwise, references):
    from flexorch.workers.prefetch import ResidentShards

    ref = references("llama")
    score = ScoreSpec("next_token_probs", generate_tokens=GREEDY_STEPS)
    manifest = read_manifest(layerwise("llama"))
    resident = ResidentShards()
    first, summary = score_prompts(layerwise("llama"), ref.prompts, score, settings(resident=True), resident=resident)
    # three greedy steps, one read of the model (the embedding whole: it serves every later round)
    assert summary.bytes_read == sum(manifest.stored_bytes(entry) for entry in manifest.layers)
    again, summary = score_prompts(layerwise("llama"), ref.prompts, score, settings(resident=True), resident=resident)
    assert summary.bytes_read == 0  # a later round reads nothing
    for a, b, expected, generated in zip(first, again, ref.probs, ref.generated):
        np.testing.assert_allclose(a.scores, expected, atol=2e-6, rtol=0)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert [tuple(g) for g in a.generated] == generated


def references_of(build, steps: int = GREEDY_STEPS):
    """get(name) -> reference_scores of the checkpoint `build(name)` makes, computed once per name."""
    return functools.cache(lambda name: reference_scores(build(name)[0], steps))


@pytest.fixture(scope="session")
def large_vocab_references(large_vocab):
    return references_of(large_vocab, steps=3)


# llama: an untied head; qwen2 and gemma2 read the embedding's file as their head, and gemma2 also
# scales its embeddings and soft-caps its logits.
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_a_head_in_vocabulary_steps_and_a_gathered_embedding_match_unsplit_model(arch, large_vocab,
                                                                                   large_vocab_references):
    from flexorch.contract.shards import plan_shards

    model, ref = large_vocab(arch)[1], large_vocab_references(arch)
    head = [s for s in plan_shards(read_manifest(model), 2) if s.rows is not None]
    assert len(head) > 5, "the head is read in steps"
    run = settings(layers_per_shard=2, batch_tokens=60)

    probs, _ = score_prompts(model, ref.prompts, ScoreSpec("next_token_probs", generate_tokens=3), run)
    assert_greedy_extension(probs, ref, 3)
    token_ids = (5, 17, 300, read_manifest(model).vocab_size - 1)
    columns, _ = score_prompts(model, ref.prompts, ScoreSpec("token_probs", token_ids=token_ids, generate_tokens=2),
                               run)
    for result, expected, generated in zip(columns, ref.probs, ref.generated):
        np.testing.assert_allclose(result.scores, expected[:, :2, list(token_ids)], atol=2e-6, rtol=0)
        assert [tuple(g) for g in result.generated] == [g[:2] for g in generated]
    logprobs, summary = score_prompts(model, ref.prompts, ScoreSpec("suffix_logprob"), run)
    for result, logprob, greedy in zip(logprobs, ref.logprob, ref.is_greedy):
        np.testing.assert_allclose(result.scores["logprob"], logprob, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(result.scores["is_greedy"], greedy)
    resident, _ = score_prompts(model, ref.prompts, ScoreSpec("suffix_logprob"),  # every head step kept apart
                                dataclasses.replace(run, resident=True))
    for result, logprob in zip(resident, ref.logprob):
        np.testing.assert_allclose(result.scores["logprob"], logprob, atol=1e-5, rtol=0)
    manifest = read_manifest(model)
    whole_pass = sum(manifest.stored_bytes(entry) for entry in manifest.layers)  # a tied head reads the embedding's
    # of the embedding, the rows of the prompts' ids (< 384 distinct, 96 KB) are read, not all 2 MB
    assert summary.bytes_read < whole_pass - 0.9 * manifest.entry("embed").bytes


@pytest.fixture(scope="session")
def last_pad_id(tmp_path_factory):
    """last_pad_id(arch) -> (layerwise dir, Reference) of the tiny `arch` whose pad_token_id is the last
    vocabulary id, as Qwen2/2.5/3's 151643 is (cached)."""
    from flexorch.orchestrator.demo import build_checkpoint, build_tokenizer
    from flexorch.orchestrator.prepare import prepare_checkpoint

    cache = {}

    def get(arch: str):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"last-pad-{arch}")
            src = build_checkpoint(root / "model", arch, pad_token_id=len(build_tokenizer()) - 1)
            prepare_checkpoint(src, root / "model.layers")
            cache[arch] = (root / "model.layers", reference_scores(src, steps=2))
        return cache[arch]

    return get


# A pass gathers the embedding rows of its tokens (fewer than the vocabulary), so a padding_idx kept
# from the full vocabulary points past them: every worker failed on such a config. The tested types'
# embeddings are nn.Embedding (qwen2 as the rest) or Gemma's scaled subclass of it (gemma3_text).
@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
def test_a_pad_id_beyond_the_gathered_rows_matches_unsplit_model(arch, last_pad_id):
    model, ref = last_pad_id(arch)
    assert read_manifest(model).vocab_size - 1 == json.loads((model / "config.json").read_text())["pad_token_id"]
    results, _ = score_prompts(model, ref.prompts, ScoreSpec("suffix_logprob"), settings(batch_tokens=60))
    for result, logprob, greedy in zip(results, ref.logprob, ref.is_greedy):
        np.testing.assert_allclose(result.scores["logprob"], logprob, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(result.scores["is_greedy"], greedy)


def test_a_pad_id_beyond_the_gathered_rows_gives_every_score_kind(last_pad_id):
    model, ref = last_pad_id("qwen2")
    probs, _ = score_prompts(model, ref.prompts, ScoreSpec("next_token_probs", generate_tokens=2),
                             settings(layers_per_shard=2, batch_tokens=60))
    assert_greedy_extension(probs, ref, 2)
    token_ids = (5, 17, read_manifest(model).vocab_size - 1)
    columns, _ = score_prompts(model, ref.prompts, ScoreSpec("token_probs", token_ids=token_ids), settings())
    for result, expected in zip(columns, ref.probs):
        np.testing.assert_allclose(result.scores[:, 0], expected[:, 0, list(token_ids)], atol=2e-6, rtol=0)
