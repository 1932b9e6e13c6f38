"""score.kind generate: the job-wide generation settings of the job file, validated, and the
output's text (decoded, cut before the first stop string).

`score: {kind: generate, max_new_tokens: 256, stop: ["\\n\\n"], temperature: 0.7, top_p: 0.9,
top_k: 50, seed: 1, logprobs: true}`; a prompt's own `max_new_tokens` and `stop` replace the
job's. torch-free, like the rest of the orchestrator.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence

from flexorch.contract.protocol import Sampling

GENERATE_KEYS = ("max_new_tokens", "stop", "temperature", "top_p", "top_k", "seed", "logprobs")
DEFAULT_MAX_NEW_TOKENS = 256  # lm-eval's max_gen_toks default
MAX_NEW_TOKENS = 1 << 20  # far past any context; keeps a typo from planning a year-long job


class _Problems(Protocol):
    def add(self, key: str | None, message: str) -> None: ...


@dataclass(frozen=True)
class GenerateSettings:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # a prompt's own replaces it
    stop: tuple[str, ...] = ()  # a prompt's own replaces it
    sampling: Sampling = Sampling()
    logprobs: bool = False  # keep each generated token's log-prob in the output


def generate_settings(problems: _Problems, score: dict) -> GenerateSettings | None:
    """The generation keys of a `score:` mapping of kind generate, each problem added."""
    limit = max_new_tokens(problems, "score.max_new_tokens", score.get("max_new_tokens"))
    stop = stop_strings(problems, "score.stop", score.get("stop"))
    temperature = _number(problems, "score.temperature", score.get("temperature"), 0.0, "a number >= 0 (0: greedy)",
                          lambda v: v >= 0)
    top_p = _number(problems, "score.top_p", score.get("top_p"), 1.0, "a number in (0, 1]", lambda v: 0 < v <= 1)
    top_k = _whole(problems, "score.top_k", score.get("top_k"), 0, "an integer >= 0 (0: the whole vocabulary)")
    seed = _whole(problems, "score.seed", score.get("seed"), 0, "an integer >= 0")
    logprobs = score.get("logprobs", False)
    if not isinstance(logprobs, bool):
        problems.add("score.logprobs", f"expected true or false, got {logprobs!r}")
        logprobs = None
    values = (limit, stop, temperature, top_p, top_k, seed, logprobs)
    if any(v is None for v in values):
        return None
    return GenerateSettings(limit, stop, Sampling(temperature, top_p, top_k, seed), logprobs)


def max_new_tokens(problems: _Problems, key: str, value, default: int | None = DEFAULT_MAX_NEW_TOKENS) -> int | None:
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_NEW_TOKENS:
        return value
    problems.add(key, f"expected an integer from 1 to {MAX_NEW_TOKENS}, got {value!r}")
    return None


def stop_strings(problems: _Problems, key: str, value) -> tuple[str, ...] | None:
    """A list of non-empty strings (one string: a list of it); None given: none."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        problems.add(key, f"expected a list of non-empty strings, got {value!r}")
        return None
    return tuple(items)


def _number(problems: _Problems, key: str, value, default: float, what: str, ok) -> float | None:
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and ok(value):
        return float(value)
    problems.add(key, f"expected {what}, got {value!r}")
    return None


def _whole(problems: _Problems, key: str, value, default: int, what: str) -> int | None:
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63:
        return value
    problems.add(key, f"expected {what}, got {value!r}")
    return None


def with_text(results: Sequence, tokenizer, stops: Sequence[Sequence[str]]) -> list:
    """generate's PromptResults with each sequence's text added to its scores (`text`: a list, one
    string per suffix); stops[i]: prompt i's stop strings."""
    out = []
    for result, stop in zip(results, stops):
        scores = result.scores
        texts = [generated_text(tokenizer, scores["ids"][j, :scores["n_new"][j]].tolist(), stop)
                 for j in range(len(scores["n_new"]))]
        out.append(replace(result, scores={**scores, "text": texts}))
    return out


def generated_text(tokenizer, ids: Sequence[int], stop: Sequence[str]) -> str:
    """The text of generated `ids` (special tokens, EOS among them, left out), cut before the first
    stop string: what lm-eval and HF's stop strings give."""
    return cut_at_stop(tokenizer.decode(list(ids), skip_special_tokens=True), stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` before the first stop string (lm-eval splits at each in turn: the same cut)."""
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]


def eos_ids(model_dir: Path, config: dict) -> tuple[int, ...]:
    """The ids that end a sequence: generation_config.json's eos_token_id where the model dir has
    one (what model.generate uses), else config.json's; an int or a list in either."""
    source = config
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        try:
            source = json.loads(path.read_text())
        except (OSError, ValueError):
            source = config  # model.generate would refuse it too; config.json's ids still end text
    value = source.get("eos_token_id", config.get("eos_token_id"))
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    return tuple(int(v) for v in items if isinstance(v, int) and not isinstance(v, bool))
