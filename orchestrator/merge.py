"""Parts → the output file, in prompt order, written atomically.

`.pkl` is the seed's format: a list with one entry per prompt (the float32 array, or the
suffix_logprob dict of arrays), pickle protocol 4. `.jsonl` has one object per prompt with its
`index`, its `id` and `answer` if the prompt had them, the same fields as lists, the token strings
of token_probs (`tokens`), `generated_ids` for the kinds that generate (per suffix, the argmax token
id of each step: the tokens, not their decoded text, which can cut a multi-byte character in two)
and the prompt's extra fields, passed through. generate's entry is its dict of arrays with `text`
(a list, per suffix); its .jsonl line has `text`, `generated_ids`, `stop_reason` and, asked for,
`logprobs` per suffix (`generate_fields`).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from flexorch.contract.atomic import atomic_writer
from flexorch.contract.protocol import PromptResult, ScoreKind, StopReason
from flexorch.contract.parts import read_part
from flexorch.orchestrator.prompts import PICKLE_PROTOCOL, Prompt


def collect_results(parts: Iterable[str | Path], n_prompts: int) -> list[PromptResult]:
    """Every prompt's result from `parts`, in prompt order.

    A prompt missing from the parts is an internal error (the controller only merges once every
    prompt is committed), so it raises RuntimeError rather than writing a short output.
    """
    by_index: dict[int, PromptResult] = {}
    for part in parts:
        for result in read_part(part):
            if 0 <= result.index < n_prompts:
                by_index.setdefault(result.index, result)  # same job fingerprint: duplicates are equal
    missing = [i for i in range(n_prompts) if i not in by_index]
    if missing:
        raise RuntimeError(f"internal error: no committed result for prompt(s) {missing[:10]}"
                           f"{' ...' if len(missing) > 10 else ''} ({len(missing)} of {n_prompts})")
    return [by_index[i] for i in range(n_prompts)]


def write_output(path: str | Path, kind: str, results: Sequence[PromptResult],
                 prompts: Sequence[Prompt] | None = None, token_labels: Sequence[str] = ()) -> Path:
    """Write `results` (in prompt order) of score kind `kind` to `path` (.pkl or .jsonl) atomically.

    `prompts[i]`: prompt i, whose id, answer and extra fields go into its .jsonl line;
    `token_labels`: score.tokens of token_probs, written as each line's `tokens`.
    """
    path = Path(path)
    if path.suffix == ".pkl":
        with atomic_writer(path) as handle:
            pickle.dump([r.scores for r in results], handle, protocol=PICKLE_PROTOCOL)
    elif path.suffix == ".jsonl":
        with atomic_writer(path) as handle:
            for position, result in enumerate(results):
                prompt = prompts[position] if prompts is not None else None
                record = jsonl_record(kind, result, prompt, token_labels)
                handle.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
    else:
        raise ValueError(f"{path}: unknown output format (expected .pkl or .jsonl)")
    return path


def generate_fields(scores: Mapping) -> dict:
    """generate's fields of an output line, per suffix: `text` (cut before a stop string),
    `generated_ids` (the EOS or the token completing a stop string included), `stop_reason` (eos,
    stop, length) and with score.logprobs each generated token's `logprobs`."""
    n_new = [int(n) for n in scores["n_new"]]
    fields = {"text": list(scores["text"]),
              "generated_ids": [np.asarray(scores["ids"][j, :n]).tolist() for j, n in enumerate(n_new)],
              "stop_reason": [StopReason.of_code(int(c)).value for c in scores["stop"]]}
    if "logprobs" in scores:
        fields["logprobs"] = [np.asarray(scores["logprobs"][j, :n]).tolist() for j, n in enumerate(n_new)]
    return fields


def jsonl_record(kind: str, result: PromptResult, prompt: Prompt | None = None,
                 token_labels: Sequence[str] = ()) -> dict:
    """One output line: index, id and answer (if any), the scores as (nested) lists — a field named
    by the kind (`next_token_probs`, `token_probs`), or suffix_logprob's `logprob`, `is_greedy`,
    `n_tokens` —, `tokens` for token_probs, `generated_ids` for the kinds that generate, then the
    prompt's extra fields."""
    record: dict = {"index": result.index}
    if prompt is not None:
        record.update({k: v for k, v in (("id", prompt.id), ("answer", prompt.answer)) if v is not None})
    if ScoreKind(kind) is ScoreKind.GENERATE:
        record.update(generate_fields(result.scores))
    elif isinstance(result.scores, Mapping):
        record.update({key: np.asarray(value).tolist() for key, value in result.scores.items()})
    else:
        record[kind] = np.asarray(result.scores).tolist()
    if token_labels:
        record["tokens"] = list(token_labels)
    if result.generated:
        record["generated_ids"] = [list(ids) for ids in result.generated]
    if prompt is not None:
        record.update(prompt.fields)  # the reader refuses extra fields named like ours
    return record
