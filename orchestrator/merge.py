"""Parts → the output file, in prompt order, written atomically.

`.pkl` is the seed's format: a list with one entry per prompt (the float32 array, or the
suffix_logprob dict of arrays), pickle protocol 4. `.jsonl` has one object per prompt with its
`index`, its `id` if the prompt had one, and the same fields as lists.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from flexorch.contract.atomic import atomic_writer
from flexorch.contract.protocol import PromptResult
from flexorch.contract.parts import read_part

# The seed's readers may run an older Python; protocol 4 (Python 3.4+) holds numpy arrays fine.
PICKLE_PROTOCOL = 4


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
                 ids: Sequence[object] | None = None) -> Path:
    """Write `results` (in prompt order) of score kind `kind` to `path` (.pkl or .jsonl) atomically.

    `ids[i]`: prompt i's id from the prompts file (None where it had none); jsonl only.
    """
    path = Path(path)
    if path.suffix == ".pkl":
        with atomic_writer(path) as handle:
            pickle.dump([r.scores for r in results], handle, protocol=PICKLE_PROTOCOL)
    elif path.suffix == ".jsonl":
        with atomic_writer(path) as handle:
            for position, result in enumerate(results):
                prompt_id = ids[position] if ids is not None else None
                handle.write(json.dumps(jsonl_record(kind, result, prompt_id)).encode("utf-8") + b"\n")
    else:
        raise ValueError(f"{path}: unknown output format (expected .pkl or .jsonl)")
    return path


def jsonl_record(kind: str, result: PromptResult, prompt_id: object | None = None) -> dict:
    """One output line: index, id (if any), and the scores as (nested) lists: a field named by the
    kind (`next_token_probs`, `token_probs`), or suffix_logprob's `logprob`, `is_greedy`, `n_tokens`."""
    record: dict = {"index": result.index}
    if prompt_id is not None:
        record["id"] = prompt_id
    if isinstance(result.scores, Mapping):
        record.update({key: np.asarray(value).tolist() for key, value in result.scores.items()})
    else:
        record[kind] = np.asarray(result.scores).tolist()
    return record
