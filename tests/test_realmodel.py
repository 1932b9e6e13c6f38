"""flexorch against transformers on a real trained checkpoint: Gemma 3 270M base (tests/realmodel.py;
262,144-token vocabulary, local and global attention layers), the un-split AutoModelForCausalLM in
float32 with the tokenizer reloaded from disk as the reference, through the public API.

One flexorch job per setting and score kind: the checkpoint dir itself (converted once into the test
cache and reused) for suffix_logprob, next_token_probs and token_probs, the last two with three
greedy steps; `flexorch prepare --compress int8` and `int4` for suffix_logprob. The head of a 262k
vocabulary (671 MB) is far larger than a decoder shard (22 MB), so the engine computes it in steps of
vocabulary rows, which the other tests reach only with conftest's 8192-token large_vocab models.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import flexorch

# Real facts a 270M base model mostly knows; the answer's position varies, some suffixes are several tokens.
PROMPTS = [
    {"id": "capital", "prefix": "The capital of France is", "suffixes": [" Rome", " Paris", " Madrid", " Berlin"],
     "answer": 1},
    {"id": "arithmetic", "prefix": "Two plus two equals", "suffixes": [" four", " seven", " nine"], "answer": 0},
    {"id": "opposite", "prefix": "The opposite of hot is", "suffixes": [" tall", " heavy", " cold"], "answer": 2},
    {"id": "colour", "prefix": "On a clear day the sky is", "suffixes": [" green", " blue"], "answer": 1},
    {"id": "animal", "prefix": "A cow says", "suffixes": [" moo", " woof", " meow"], "answer": 0},
    {"id": "week", "prefix": "The day after Monday is", "suffixes": [" Sunday", " Friday", " Tuesday"],
     "answer": 2},
    {"id": "author", "prefix": "Romeo and Juliet was written by William", "suffixes": [" Shakespeare", " Wordsworth"],
     "answer": 0},
    {"id": "water", "prefix": "Water is made of hydrogen and", "suffixes": [" gold", " oxygen", " iron", " sand"],
     "answer": 1},
]
# token_probs' tokens: the first token of each correct answer and a few common ones, each a single token.
TOKENS = [" Paris", " four", " cold", " blue", " moo", " Tuesday", " Shakespeare", " oxygen", " the", " a"]
STEPS = 3
# Measured: flexorch within 1.5e-5 of the model run wholly in float64, and of this reference (float32
# logits normalised in float64); transformers' own float32 log-softmax is 1.3e-4 from both.
LOGPROB_TOLERANCE = 1e-4
# Relative: a float32 softmax over 262,144 logits is itself up to ~1.3e-4 off (next_token_probs
# normalises in float32, token_probs' streamed head in float64, the reference in float64).
PROB_RTOL = 2e-4
# Measured on these prompts against float32: int8 moved log-probs by up to 0.12 and no answer; int4 by
# up to 5.3 and no answer (its smallest margin between the best two suffixes 1.4, float32's 1.2). On
# benchmarks/bench_realmodel.py's 102 questions int8 flipped 2 answers and int4 18 (0.98 and 0.82
# agreement), so int4 is allowed one flip of 8: these prompts kept theirs by their margins, not because
# int4 keeps answers. The deviation bounds leave 4x and ~2x room and catch a broken dequantisation.
MAX_COMPRESSED_DEVIATION = {"int8": 0.5, "int4": 12.0}
INT4_MIN_AGREEMENT = 7


@dataclass(frozen=True)
class Reference:
    """The un-split model's scores, per suffix of every prompt in order (n suffixes in all)."""

    logprob: np.ndarray  # float64 (n,)
    is_greedy: np.ndarray  # bool (n,)
    probs: np.ndarray  # float32 (n, STEPS, vocab): the softmax after the suffix and each greedy token
    generated: list[tuple[int, ...]]  # per suffix, the argmax id of each step
    choices: list[int]  # per prompt, the suffix with the highest log-prob
    token_ids: list[int]  # TOKENS' ids


@pytest.fixture(scope="module")
def reference(gemma3_270m) -> Reference:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma3_270m)
    model = AutoModelForCausalLM.from_pretrained(gemma3_270m, dtype=torch.float32).eval()
    rows = [(tokenizer(p["prefix"])["input_ids"], tokenizer(s, add_special_tokens=False)["input_ids"])
            for p in PROMPTS for s in p["suffixes"]]
    token_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TOKENS]
    assert all(len(ids) == 1 for ids in token_ids), "each of TOKENS must be one token"
    logprob, is_greedy = [], []
    sequences = [prefix + suffix for prefix, suffix in rows]
    steps = []  # per step, (rows, vocab) the softmax after each row's last token
    for step in range(STEPS):
        logits = _forward(model, sequences)
        if step == 0:
            for (prefix, suffix), row in zip(rows, logits):
                # float64 normalisation: over 262,144 logits float32's own puts log-probs ~1.3e-4 off
                # (measured against the model in float64; flexorch's streamed head sums in float64).
                predicted = torch.log_softmax(row[len(prefix) - 1:-1].double(), -1)  # (len(suffix), vocab)
                picked = predicted.gather(1, torch.tensor(suffix)[:, None])[:, 0]
                logprob.append(picked.sum().item())
                is_greedy.append(bool((predicted.argmax(-1) == torch.tensor(suffix)).all()))
        last = torch.stack([row[-1] for row in logits])  # (rows, vocab)
        steps.append(torch.softmax(last.double(), -1).float())
        sequences = [seq + [int(top)] for seq, top in zip(sequences, last.argmax(-1))]
    generated = [tuple(seq[len(prefix) + len(suffix):]) for seq, (prefix, suffix) in zip(sequences, rows)]
    bounds = np.cumsum([0] + [len(p["suffixes"]) for p in PROMPTS])
    choices = [int(np.argmax(logprob[a:b])) for a, b in zip(bounds, bounds[1:])]
    return Reference(np.array(logprob), np.array(is_greedy), torch.stack(steps, 1).numpy(), generated, choices,
                     [ids[0] for ids in token_ids])


def _forward(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Each sequence's float32 logits (len, vocab), all in one right-padded batch: a forward reads the
    whole 1 GB of weights (~0.7 s of a core) however few its rows, so one per suffix and step would
    cost a minute."""
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits  # (rows, width, vocab)
    return [logits[row, :len(seq)] for row, seq in enumerate(sequences)]


@pytest.fixture(scope="module")
def flexorch_cache(gemma3_270m):
    """The checkpoint's layerwise conversion lives beside it in the test cache, made once per machine.
    Planned on the assumed figures, as conftest's per-test fixture does (set up after this one)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLEXORCH_CACHE", str(gemma3_270m.parent / "flexorch-cache"))
        patch.setenv("FLEXORCH_CALIBRATE", "0")
        yield


@pytest.fixture(scope="module")
def compressed(gemma3_270m, tmp_path_factory) -> dict[str, Path]:
    """`flexorch prepare --compress SCHEME` of the checkpoint, int8 and int4 side by side."""
    root = tmp_path_factory.mktemp("gemma3-compressed")
    runs = {scheme: subprocess.Popen([sys.executable, "-m", "flexorch.orchestrator.cli", "prepare", str(gemma3_270m),
                                      str(root / scheme), "--compress", scheme],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for scheme in ("int8", "int4")}
    for scheme, run in runs.items():
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, f"prepare --compress {scheme}: {err}"
    return {scheme: root / scheme for scheme in runs}


def _score(model, kind: str, **settings) -> flexorch.Results:
    return flexorch.score(model, PROMPTS, score=kind, devices="cpu", progress=False, **settings)


@pytest.fixture(scope="module")
def suffix_logprob(gemma3_270m, flexorch_cache) -> flexorch.Results:
    return _score(gemma3_270m, "suffix_logprob")


def _flat(results: flexorch.Results, key: str) -> np.ndarray:
    return np.concatenate([np.asarray(r.scores[key]) for r in results])


def _answers(results: flexorch.Results) -> list[int]:
    return [int(np.argmax(r.scores["logprob"])) for r in results]


def test_the_checkpoint_is_a_trained_model(reference):
    right = sum(c == p["answer"] for c, p in zip(reference.choices, PROMPTS))
    assert right >= 7, f"the un-split model answered {right}/8 facts: the de-quantised checkpoint looks broken"


def test_suffix_logprob_matches_transformers(suffix_logprob, reference):
    assert np.abs(_flat(suffix_logprob, "logprob") - reference.logprob).max() <= LOGPROB_TOLERANCE
    assert _flat(suffix_logprob, "is_greedy").tolist() == reference.is_greedy.tolist()
    assert _answers(suffix_logprob) == reference.choices
    assert suffix_logprob.accuracy == np.mean([c == p["answer"] for c, p in zip(reference.choices, PROMPTS)])


def test_next_token_probs_and_greedy_tokens_match_transformers(gemma3_270m, flexorch_cache, reference):
    results = _score(gemma3_270m, "next_token_probs", generate_tokens=STEPS)
    probs = np.concatenate([np.asarray(r.scores) for r in results])  # (n, STEPS, vocab)
    assert probs.shape == reference.probs.shape
    np.testing.assert_allclose(probs, reference.probs, rtol=PROB_RTOL, atol=1e-12)
    assert [ids for r in results for ids in r.generated] == reference.generated


def test_token_probs_and_greedy_tokens_match_transformers(gemma3_270m, flexorch_cache, reference):
    results = _score(gemma3_270m, "token_probs", tokens=TOKENS, generate_tokens=STEPS)
    probs = np.concatenate([np.asarray(r.scores) for r in results])  # (n, STEPS, len(TOKENS))
    np.testing.assert_allclose(probs, reference.probs[:, :, reference.token_ids], rtol=PROB_RTOL, atol=1e-12)
    # The head in vocabulary steps keeps a running argmax here, not one over whole logits.
    assert [ids for r in results for ids in r.generated] == reference.generated


def test_int8_gives_the_same_answers(compressed, reference):
    results = _score(compressed["int8"], "suffix_logprob")
    assert results.report["compression"] == "int8"
    assert _answers(results) == reference.choices
    assert np.abs(_flat(results, "logprob") - reference.logprob).max() <= MAX_COMPRESSED_DEVIATION["int8"]


def test_int4_answers_agree_at_the_measured_level(compressed, reference):
    results = _score(compressed["int4"], "suffix_logprob")
    assert results.report["compression"] == "int4"
    agree = sum(a == b for a, b in zip(_answers(results), reference.choices))
    assert agree >= INT4_MIN_AGREEMENT, f"int4 agreed on {agree}/8 answers"
    assert np.abs(_flat(results, "logprob") - reference.logprob).max() <= MAX_COMPRESSED_DEVIATION["int4"]
