"""Generation (score kind generate) against the un-split Hugging Face model's `generate`.

The reference is `model.generate(do_sample=False)` per prompt alone (no padding), cut where the
decoded generated text first holds a stop string; one job mixes sequences that end at EOS, at a
stop string and at their own limit, over every KV tier, batch layouts that put sequences together
or apart, and (orchestrated) 1 and 2 workers. Seeded sampling draws the same tokens whatever the
batches or workers.
"""

from __future__ import annotations

import dataclasses
import re
import functools

import numpy as np
import pytest
import torch

from flexorch.contract.protocol import EngineSettings, Sampling, ScoreSpec, StopReason, TokenizedPrompt
from flexorch.workers.engine import score_prompts
from flexorch.orchestrator.generation import cut_at_stop
from flexorch.workers.generate import Generation, choose, sequence_seed

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Question: What is the capital of France? Answer:",
    "Hi",
    "Streaming a large language model layer by layer lets a small graphics card run",
    "0 1 2 3",
    "Once upon a time",
]
LIMITS = [8, 3, 8, 5, 6]  # per prompt
ARCHS = ("llama", "qwen2", "mixtral", "gemma2")


def settings(**overrides) -> EngineSettings:
    base = dict(device="cpu", dtype="float32", layers_per_shard=2, storage="cpu", batch_tokens=4096)
    return EngineSettings(**{**base, **overrides})


@functools.lru_cache(maxsize=None)
def _hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def hf_greedy(model_dir, prefix_ids, limit, eos_ids) -> list[int]:
    """model.generate(do_sample=False) of one prompt alone: its new ids, EOS included."""
    model, _ = _hf(str(model_dir))
    with torch.no_grad():
        out = model.generate(torch.tensor([prefix_ids]), attention_mask=torch.ones(1, len(prefix_ids), dtype=torch.long),
                             max_new_tokens=limit, do_sample=False, eos_token_id=list(eos_ids) or None,
                             pad_token_id=0, min_new_tokens=0)
    return out[0, len(prefix_ids):].tolist()


def cut_at_stop_ids(ids, stop, decode) -> list[int]:
    """The ids up to the first whose decoded text holds a stop string."""
    for k in range(1, len(ids) + 1):
        if any(s in decode(ids[:k]) for s in stop):
            return ids[:k]
    return ids


def mixed_job(model_dir):
    """Prompts and an EOS id chosen from the reference's own greedy text so that, in one job, one
    sequence ends at EOS, one at a stop string and the rest at their limits; with the expected ids
    and reasons."""
    _, tokenizer = _hf(str(model_dir))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    prefixes = [tuple(tokenizer(t).input_ids) for t in TEXTS]
    free = [hf_greedy(model_dir, p, n, ()) for p, n in zip(prefixes, LIMITS)]
    eos = free[0][4]  # prompt 0 ends at its 5th token (or earlier, if that id came before)
    stop_text = decode(free[2][5:6]).strip() or decode(free[2][5:7])
    stops = [(), (), (stop_text,), (), ("never-in-this-text",)]
    prompts = [TokenizedPrompt(i, p, ((),), max_new_tokens=n, stop=s)
               for i, (p, n, s) in enumerate(zip(prefixes, LIMITS, stops))]
    expected = []
    for ids, s in zip(free, stops):  # greedy: with an EOS id, the same ids up to its first one
        ids = ids[:ids.index(eos) + 1] if eos in ids else ids
        ids = cut_at_stop_ids(ids, s, decode) if s else ids
        reason = (StopReason.EOS if ids and ids[-1] == eos else
                  StopReason.STOP if s and any(x in decode(ids) for x in s) else StopReason.LENGTH)
        expected.append((ids, reason))
    return prompts, (eos,), expected, decode


def generated(result) -> list[tuple[list[int], StopReason]]:
    scores = result.scores
    return [(scores["ids"][j, :scores["n_new"][j]].tolist(), StopReason.of_code(int(scores["stop"][j])))
            for j in range(len(scores["n_new"]))]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_hf_generate_with_eos_stop_and_limits(arch, checkpoint, layerwise):
    prompts, eos, expected, _ = mixed_job(checkpoint(arch))
    reasons = {reason for _, reason in expected}
    assert reasons == set(StopReason), f"the job should end sequences every way, got {reasons}"
    score = ScoreSpec("generate", eos_ids=eos, logprobs=True)
    # every KV tier (on llama); all prompts in one batch, one batch each, a few per batch (rows
    # leaving a shared batch, whole batches leaving)
    tiers = (("cpu", 4096), ("gpu", 1), ("disk", 40)) if arch == "llama" else (("cpu", 40),)
    for storage, budget in tiers:
        results, _ = score_prompts(layerwise(arch), prompts, score,
                                   settings(storage=storage, batch_tokens=budget, disk_folder=None))
        for result, want in zip(results, expected):
            assert generated(result) == [want], (arch, storage, budget, result.index)
            assert np.isfinite(result.scores["logprobs"]).all() and (result.scores["logprobs"] <= 0).all()


def test_logprobs_are_the_models(checkpoint, layerwise):
    """The reported log-prob of each generated token is log_softmax of the un-split model's logits."""
    model, tokenizer = _hf(str(checkpoint("llama")))
    prefix = tuple(tokenizer(TEXTS[0]).input_ids)
    results, _ = score_prompts(layerwise("llama"), [TokenizedPrompt(0, prefix, ((),), max_new_tokens=4)],
                               ScoreSpec("generate", logprobs=True), settings())
    ids = results[0].scores["ids"][0].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([list(prefix) + ids])).logits[0, len(prefix) - 1:-1]
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(results[0].scores["logprobs"][0], want, atol=1e-5)


def test_a_generation_ended_early_reports_its_pass_whole(checkpoint, layerwise):
    """Every sequence ends at EOS on its first step of six: the last progress event is the pass's
    end (what the worker never throttles away), and no later step was computed."""
    _, tokenizer = _hf(str(checkpoint("llama")))
    prefix = tuple(tokenizer(TEXTS[3]).input_ids)
    eos = hf_greedy(checkpoint("llama"), prefix, 1, ())[0]
    events = []
    results, _ = score_prompts(layerwise("llama"), [TokenizedPrompt(0, prefix, ((),), max_new_tokens=6)],
                               ScoreSpec("generate", eos_ids=(eos,)), settings(), on_progress=events.append)
    assert generated(results[0]) == [([eos], StopReason.EOS)]
    last = events[-1]
    assert (last.stage, last.step, last.prompts_done) == (last.stages, last.steps, last.prompts) and last.steps == 6
    assert max(e.step for e in events[:-1]) == 1


def test_suffixes_generate_apart_and_finished_rows_leave(checkpoint, layerwise):
    """A prompt with suffixes continues each alone (as HF on prefix + suffix); a short prompt's row
    leaves its batch while a long one runs on."""
    _, tokenizer = _hf(str(checkpoint("qwen2")))
    prefix = tuple(tokenizer(TEXTS[2]).input_ids)
    suffixes = (tuple(tokenizer(" a graphics", add_special_tokens=False).input_ids), ())
    prompts = [TokenizedPrompt(0, prefix, suffixes, max_new_tokens=6),
               TokenizedPrompt(1, tuple(tokenizer(TEXTS[1]).input_ids), ((),), max_new_tokens=2)]
    results, summary = score_prompts(layerwise("qwen2"), prompts, ScoreSpec("generate"), settings())
    for j, suffix in enumerate(suffixes):
        want = hf_greedy(checkpoint("qwen2"), prefix + suffix, 6, ())
        assert generated(results[0])[j] == (want, StopReason.LENGTH)
    assert generated(results[1]) == [(hf_greedy(checkpoint("qwen2"), prompts[1].prefix_ids, 2, ()), StopReason.LENGTH)]
    # tokens per shard: step 0 both rows in full (padded to prompt 0's), step 1 both rows' two
    # columns (one per suffix; prompt 1 has one, padded), steps 2-5 prompt 0's alone: prompt 1 left
    one_step = [dataclasses.replace(p, max_new_tokens=1) for p in prompts]
    _, first = score_prompts(layerwise("qwen2"), one_step, ScoreSpec("generate"), settings())
    shards = first.tokens // (2 * prompts[0].n_tokens)
    assert summary.tokens == shards * (2 * prompts[0].n_tokens + 2 * 2 + 4 * 2)


def test_seeded_sampling_independent_of_batches(checkpoint, layerwise):
    _, tokenizer = _hf(str(checkpoint("llama")))
    prompts = [TokenizedPrompt(i, tuple(tokenizer(t).input_ids), ((),), max_new_tokens=6) for i, t in enumerate(TEXTS)]
    score = ScoreSpec("generate", sampling=Sampling(temperature=1.5, top_p=0.95, top_k=50, seed=7))
    runs = [score_prompts(layerwise("llama"), prompts, score, settings(batch_tokens=budget, storage=storage))[0]
            for budget, storage in ((4096, "cpu"), (1, "gpu"))]
    alone = [score_prompts(layerwise("llama"), prompts[3:], score, settings())[0][0]]
    ids = [[generated(r) for r in run] for run in runs]
    assert ids[0] == ids[1]
    assert [generated(r) for r in alone] == ids[0][3:4]  # another round, other neighbours
    greedy = [generated(r) for r in score_prompts(layerwise("llama"), prompts, ScoreSpec("generate"), settings())[0]]
    assert ids[0] != greedy  # a temperature of 1.5 over a random model's flat distribution does not pick the argmax
    other_seed = ScoreSpec("generate", sampling=Sampling(temperature=1.5, top_p=0.95, top_k=50, seed=8))
    assert [generated(r) for r in score_prompts(layerwise("llama"), prompts, other_seed, settings())[0]] != ids[0]


def test_choose_filters_like_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seeds = [sequence_seed(0, 0, 0, step) for step in range(400)]
    drawn = {int(choose(logits, torch.tensor([s]), Sampling(temperature=1.0, top_p=0.7))[0]) for s in seeds}
    assert drawn == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 crosses it: the two likeliest stay
    drawn = {int(choose(logits, torch.tensor([s]), Sampling(temperature=1.0, top_k=3))[0]) for s in seeds}
    assert drawn == {0, 1, 2}
    ids, logprobs = choose(logits, None, Sampling())
    assert ids.tolist() == [0] and logprobs.tolist() == pytest.approx([np.log(0.5)], abs=1e-6)


def test_generation_state_reasons_and_cut():
    prompts = [TokenizedPrompt(0, (1,), ((), ()), max_new_tokens=3, stop=("ab",))]
    generation = Generation(prompts, eos_ids=(9,), decode=lambda ids: "".join("ab"[t % 2] for t in ids))
    generation.advance(0, [2, 9], [-1.0, -2.0])  # "a"; EOS
    assert generation.live(0)
    generation.advance(0, [3, 4], [-1.0, -1.0])  # "ab": stop; the ended suffix ignores its id
    assert generation.done
    scores = generation.scores(0, logprobs=True)
    assert scores["ids"].tolist() == [[2, 3], [9, -1]] and scores["n_new"].tolist() == [2, 1]
    assert [StopReason.of_code(c) for c in scores["stop"]] == [StopReason.STOP, StopReason.EOS]
    assert cut_at_stop("x = 1\n\ny", ("\n\n", "=")) == "x "


def test_stop_strings_found_in_the_decoded_tail_where_the_whole_text_has_them(checkpoint):
    """Each step decodes only a sequence's tail: on long sequences of words with characters split
    over byte tokens, and of random ids, each ends where decoding its whole text first holds a
    stop string (stops cut from that text, so they are reached at many lengths, accents included)."""
    import random
    from types import SimpleNamespace

    _, tokenizer = _hf(str(checkpoint("llama")))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    words = [tokenizer(w, add_special_tokens=False).input_ids for w in (" café", " résumé", " 東京", " über", " the")]
    rng = random.Random(0)
    sequences, stops = [], []
    while len(sequences) < 32:
        ids = []
        while len(ids) < 60:
            ids += rng.choice(words) if rng.random() < 0.7 else [rng.randrange(tokenizer.vocab_size)]
        ids, text = ids[:60], decode(ids[:60])
        end = rng.randrange(len(text) // 2, len(text))
        sequences.append(ids)
        stops.append((text[end - rng.randrange(1, 4):end],))
    prompts = [TokenizedPrompt(i, (1,), ((),), max_new_tokens=len(ids), stop=stop)
               for i, (ids, stop) in enumerate(zip(sequences, stops))]
    generation = Generation(prompts, eos_ids=(), decode=decode)
    for step in range(60):
        for i, ids in enumerate(sequences):
            generation.advance(i, [ids[step]], [0.0])
    for i, (ids, stop) in enumerate(zip(sequences, stops)):
        (got,) = generated(SimpleNamespace(scores=generation.scores(i, logprobs=False)))
        assert got == (cut_at_stop_ids(ids, stop, decode), StopReason.STOP), (i, stop)


def with_eos(layerwise_dir, tmp_path, eos) -> "Path":
    """A copy of the layerwise dir whose generation_config.json names `eos` (what a job reads)."""
    import json
    import shutil

    copy = tmp_path / "model.layers"
    shutil.copytree(layerwise_dir, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": list(eos)}))
    return copy


def test_job_equals_hf_generate_on_1_and_2_workers_and_2_stages(checkpoint, layerwise, tmp_path):
    """A generation job through the API (.jsonl output, flexorch show): the ids, stop reasons and
    text cut before the stop string are HF's, with one worker, two, and a pipeline of two stages
    (every stage keeps the same sequences' state from the head's ids)."""
    import json

    import flexorch
    from flexorch.orchestrator.show import load

    prompts, eos, expected, decode = mixed_job(checkpoint("llama"))
    model = with_eos(layerwise("llama"), tmp_path, eos)
    items = [{"prefix_ids": list(p.prefix_ids), "max_new_tokens": p.max_new_tokens, **({"stop": list(p.stop)} if p.stop else {})}
             for p in prompts]
    for devices, parallel in ((["cpu"], "data"), (["cpu", "cpu"], "data"), (["cpu", "cpu"], "pipeline")):
        output = tmp_path / f"out{len(devices)}{parallel}.jsonl"
        results = flexorch.generate(model, items, devices=devices, parallel=parallel, progress=False, output=output,
                                    logprobs=True)
        assert len(results.report["plan"]["workers"]) == len(devices)
        lines = [json.loads(line) for line in output.read_text().splitlines()]
        for prompt, result, line, (ids, reason) in zip(prompts, results, lines, expected):
            want_text = cut_at_stop(decode(ids), prompt.stop)
            assert line["generated_ids"] == [ids] and line["stop_reason"] == [reason.value], (devices, prompt.index)
            assert line["text"] == [want_text] and result.choice == [want_text]
            assert len(line["logprobs"][0]) == len(ids)
        assert load(output).summary.choices == tuple([cut_at_stop(decode(ids), p.stop)] for p, (ids, _) in zip(prompts, expected))


def test_seeded_sampling_same_on_any_worker_count_and_batch(checkpoint, layerwise, tmp_path):
    """Two workers, each its own rounds and batches, draw what one engine over every prompt draws."""
    import flexorch

    _, tokenizer = _hf(str(checkpoint("llama")))
    sampling = Sampling(temperature=1.2, top_k=40, seed=3)
    prompts = [TokenizedPrompt(i, tuple(tokenizer(t).input_ids), ((),), max_new_tokens=4) for i, t in enumerate(TEXTS)]
    alone, _ = score_prompts(layerwise("llama"), prompts, ScoreSpec("generate", sampling=sampling), settings())
    items = [{"prefix": t, "max_new_tokens": 4} for t in TEXTS]
    two = flexorch.generate(layerwise("llama"), items, devices=["cpu", "cpu"], batch_tokens=60, temperature=1.2,
                            top_k=40, seed=3, progress=False)
    assert [r.scores["ids"].tolist() for r in two] == [r.scores["ids"].tolist() for r in alone]


def test_planner_prices_each_prompts_own_steps_and_kv_cache():
    """A round's passes are its longest generation; a prompt that stops early costs its own later
    steps only (its share of the live rows), and the KV cache grows with each prompt's own limit."""
    from test_planner import job_spec, llama2_13b, machine

    from flexorch.orchestrator.generation import GenerateSettings
    from flexorch.orchestrator.planner import make_plan
    from flexorch.orchestrator.planner.model import _describe_job
    from flexorch.orchestrator.spec import ScoreSettings

    spec = job_spec(devices=("cpu",), score=ScoreSettings("generate", generate=GenerateSettings()))
    hardware, manifest, tokens = machine(), llama2_13b(), [200] * 8
    long = _describe_job(hardware, manifest, spec, "float16", tokens, [1] * 8, [1] * 8, new_tokens=[256] * 8)
    mixed = _describe_job(hardware, manifest, spec, "float16", tokens, [1] * 8, [1] * 8, new_tokens=[256] + [16] * 7)
    assert long.steps == mixed.steps == 256
    later = lambda job: sum(load.later_layer_flops for load in job.loads)  # noqa: E731
    # per step of the round: one prompt of 255 later steps in all, seven of 15 (with shorter rows)
    assert later(mixed) < later(long) * (1 + 7 * 15 / 255) / 8 * 1.01
    # cached: the 200 prompt tokens and one per step but the last, to each prompt's own limit
    cache = lambda job: sum(load.cache_tokens for load in job.loads)  # noqa: E731
    assert cache(mixed) / cache(long) == pytest.approx((454 + 7 * 214) / (8 * 454))
    plans = [make_plan(hardware, manifest, spec, tokens, suffix_counts=[1] * 8, new_tokens=limits)
             for limits in ([256] * 8, [256] + [16] * 7)]
    # fewer live rows per later step: less compute (not 0.18x: the first step and per-batch costs stay)
    assert plans[1].workers[0].predicted_compute_seconds < 0.8 * plans[0].workers[0].predicted_compute_seconds


@pytest.mark.parametrize("score, expected", [
    ({"kind": "generate", "temperature": -1}, "score.temperature: expected a number >= 0 (0: greedy), got -1"),
    ({"kind": "generate", "top_p": 0}, "score.top_p: expected a number in (0, 1], got 0"),
    ({"kind": "generate", "max_new_tokens": 0}, "score.max_new_tokens: expected an integer from 1 to"),
    ({"kind": "generate", "stop": ["", "x"]}, "score.stop: expected a list of non-empty strings"),
    ({"kind": "suffix_logprob", "stop": ["x"]}, "score.stop: is only used with score.kind generate"),
])
def test_bad_generation_keys_name_the_key(tmp_path, score, expected):
    from flexorch.contract.errors import UserError
    from flexorch.orchestrator.spec import job_from_mapping

    (tmp_path / "m").mkdir()
    (tmp_path / "p.jsonl").write_text('{"prefix": "Q"}\n')
    with pytest.raises(UserError, match=re.escape(expected)):
        job_from_mapping({"model": "m", "prompts": "p.jsonl", "output": "o.jsonl", "score": score}, tmp_path / "job.yaml",
                         base=tmp_path)


def test_generation_settings_and_prompts_without_suffixes(tmp_path):
    from flexorch.contract.errors import UserError
    from flexorch.orchestrator.prompts import read_prompts
    from flexorch.orchestrator.spec import job_from_mapping

    (tmp_path / "m").mkdir()
    path = tmp_path / "p.jsonl"
    path.write_text('{"prefix": "Q", "max_new_tokens": 3, "stop": "\\n"}\n{"prefix_ids": [1, 2]}\n')
    spec = job_from_mapping({"model": "m", "prompts": "p.jsonl", "output": "o.jsonl", "score": {
        "kind": "generate", "max_new_tokens": 9, "stop": ["."], "temperature": 0.5, "top_k": 5, "seed": 2}},
        tmp_path / "job.yaml", base=tmp_path)
    assert (spec.score.generate.max_new_tokens, spec.score.generate.stop) == (9, (".",))
    assert spec.score.generate.sampling == Sampling(temperature=0.5, top_k=5, seed=2)
    first, second = read_prompts(path, generate=True)
    assert (first.suffixes, first.max_new_tokens, first.stop) == (("",), 3, ("\n",))
    assert (second.suffix_ids, second.max_new_tokens, second.stop) == (((),), None, None)
    with pytest.raises(UserError, match="missing key 'suffixes'"):  # other kinds score suffixes
        read_prompts(path)
    path.write_text('{"prefix": "Q", "max_new_tokens": 0}\n')
    with pytest.raises(UserError, match="line 1: max_new_tokens: expected an integer from 1"):
        read_prompts(path, generate=True)
