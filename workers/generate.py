"""Generation: the next-token choice and each sequence's state between steps.

A sequence is one (prompt, suffix): the prompt's prefix, that suffix (often none) and what was
generated after it. `choose` picks each scored position's next id from its logits — argmax, or a
draw from a random stream of its own, seeded from (seed, prompt index, suffix number, step) with a
counter-based hash, so a sequence draws the same token whatever worker, batch or round computes it.
`Generation` holds every sequence's ids, log-probs and why it ended, in one place the engine's step
loop updates (and a checkpoint of a round can save); a prompt whose sequences have all ended leaves
the following steps' batches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from flexorch.contract.protocol import Sampling, StopReason, TokenizedPrompt

# Tokens decoded beyond a stop string's length when looking for it in a sequence's newest text: what
# covers tokens that add less than a character there (a character split over byte tokens, the
# leading space a tokenizer drops at the start of a text).
STOP_MARGIN_TOKENS = 8


def sequence_seed(seed: int, prompt: int, suffix: int, step: int) -> int:
    """The seed of one sequence's draw at one step: a hash of the four counters (63 bits)."""
    digest = hashlib.blake2b(f"{seed}:{prompt}:{suffix}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def choose(logits: torch.Tensor, seeds: torch.Tensor | None, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (n, vocab) float32; seeds: (n,) per row (sampling only) → (next ids (n,), their
    log-probs under the model (n,) float32), both on the CPU."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if sampling.greedy:
        ids = logits.argmax(-1)
    else:
        ids = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        probs = _filtered(logits.float() / sampling.temperature, sampling).softmax(-1).cpu()
        for r in range(probs.shape[0]):  # one generator per row: its draw depends on its seed alone
            generator = torch.Generator().manual_seed(int(seeds[r]))
            ids[r] = int(torch.multinomial(probs[r], 1, generator=generator))
    return ids.cpu(), logprobs.gather(1, ids[:, None].to(logprobs.device))[:, 0].cpu()


def _filtered(scaled: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """top-k, then top-p (the smallest set of the likeliest ids holding p, as HF's warpers) → -inf."""
    if sampling.top_k and sampling.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, sampling.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, -torch.inf)
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scaled, descending=True, dim=-1)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the likelier ids
        drop = before >= sampling.top_p  # the id that crosses p stays
        scaled = scaled.masked_fill(drop.scatter(1, order, drop), -torch.inf)
    return scaled


@dataclass
class _Sequence:
    limit: int
    stop: tuple[str, ...]
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reason: StopReason | None = None  # None while it runs


class Generation:
    """Every sequence of a round: its generated ids, log-probs and why it ended.

    `decode` (ids → text) is needed only where some prompt has stop strings; they are looked for
    in the decoded generated text (as HF's StopStringCriteria and lm-eval do), the output being
    that text cut before the first one. Only the text's tail is decoded each step: it held no stop
    string before the newest token, so a new one ends in that token's text and starts at most its
    length in characters before it; decoding the whole text cost each sequence O(its length) per step."""

    def __init__(self, prompts: Sequence[TokenizedPrompt], eos_ids: Sequence[int], decode=None):
        self.prompts, self.eos, self.decode = list(prompts), frozenset(eos_ids), decode
        self.sequences = [[_Sequence(p.max_new_tokens, p.stop) for _ in p.suffix_ids] for p in prompts]
        for per_prompt in self.sequences:
            for s in per_prompt:
                if s.limit <= 0:
                    s.reason = StopReason.LENGTH

    @property
    def steps(self) -> int:
        """Passes over the model the round needs at most: its longest limit."""
        return max((s.limit for per in self.sequences for s in per), default=0)

    def live(self, i: int) -> bool:
        """Whether prompt i has a sequence still running (its row stays in the batches)."""
        return any(s.reason is None for s in self.sequences[i])

    @property
    def done(self) -> bool:
        return not any(self.live(i) for i in range(len(self.sequences)))

    def advance(self, i: int, ids: Sequence[int], logprobs: Sequence[float]) -> None:
        """Prompt i's next id and its log-prob per suffix (a suffix already ended ignores its own)."""
        for s, token, logprob in zip(self.sequences[i], ids, logprobs):
            if s.reason is not None:
                continue
            s.ids.append(int(token))
            s.logprobs.append(float(logprob))
            if int(token) in self.eos:
                s.reason = StopReason.EOS
            elif s.stop and self._stopped(s):
                s.reason = StopReason.STOP
            elif len(s.ids) >= s.limit:
                s.reason = StopReason.LENGTH

    def _stopped(self, s: _Sequence) -> bool:
        tail = s.ids[-(max(map(len, s.stop)) + STOP_MARGIN_TOKENS):]
        text = self.decode(tail)
        return any(stop in text for stop in s.stop)

    def scores(self, i: int, logprobs: bool) -> dict[str, np.ndarray]:
        """Prompt i's output arrays (PromptResult.scores of generate)."""
        sequences = self.sequences[i]
        width = max((len(s.ids) for s in sequences), default=0)
        ids = np.full((len(sequences), width), -1, dtype=np.int64)
        values = np.full((len(sequences), width), np.nan, dtype=np.float32)
        for j, s in enumerate(sequences):
            ids[j, :len(s.ids)] = s.ids
            values[j, :len(s.ids)] = s.logprobs
        out = {"ids": ids, "n_new": np.array([len(s.ids) for s in sequences], dtype=np.int64),
               "stop": np.array([(s.reason or StopReason.LENGTH).code for s in sequences], dtype=np.int8)}
        if logprobs:
            out["logprobs"] = values
        return out

    # -- a checkpoint's share (workers/checkpoint.py) ---------------------------------------------------
    def ran(self, i: int, step: int) -> bool:
        """Whether prompt i had a sequence running at `step`, as `live` said then: one that ended
        holds an id of that step, one still running reaches it. With the state at `step`, `live`."""
        return any(s.reason is None or len(s.ids) > step for s in self.sequences[i])

    def state(self) -> dict[str, torch.Tensor]:
        """Every sequence's state, in (prompt, suffix) order: n_new (n,); ids (sum n_new,) and their
        log-probs (float64: a Python float exactly) concatenated; reason (n,) int8, its code (-1: running)."""
        flat = [s for per in self.sequences for s in per]
        return {"n_new": torch.tensor([len(s.ids) for s in flat], dtype=torch.long),
                "ids": torch.tensor([t for s in flat for t in s.ids], dtype=torch.long),
                "logprobs": torch.tensor([v for s in flat for v in s.logprobs], dtype=torch.float64),
                "reason": torch.tensor([-1 if s.reason is None else s.reason.code for s in flat], dtype=torch.int8)}

    def check(self, state: dict[str, torch.Tensor], step: int) -> None:
        """ValueError where `state` is not one this round's sequences could hold at generation step
        `step` (every running sequence holds `step` ids); nothing changes either way."""
        self._checked(state, step)

    def restore(self, state: dict[str, torch.Tensor], step: int) -> None:
        """Put back what `state` gave at generation step `step` (checked first: see `check`)."""
        n_new, reason, ids, logprobs = self._checked(state, step)
        first = 0
        for s, n, code in zip((s for per in self.sequences for s in per), n_new, reason):
            s.ids, s.logprobs = ids[first:first + n], logprobs[first:first + n]
            s.reason = None if code == -1 else StopReason.of_code(code)
            first += n

    def _checked(self, state: dict[str, torch.Tensor], step: int) -> tuple[list, list, list, list]:
        """`state` as lists (n_new, reason, ids, log-probs), or ValueError (see `check`)."""
        flat = [s for per in self.sequences for s in per]
        n_new, reason = state["n_new"].tolist(), state["reason"].tolist()
        ids, logprobs = state["ids"].tolist(), state["logprobs"].tolist()
        if len(n_new) != len(flat) or len(reason) != len(flat):
            raise ValueError(f"generation state of {len(n_new)} sequences, the round has {len(flat)}")
        if sum(n_new) != len(ids) or len(ids) != len(logprobs):
            raise ValueError("generation state: ids and log-probs do not add up")
        for s, n, code in zip(flat, n_new, reason):
            running = code == -1
            if not -1 <= code < len(StopReason) or n > s.limit or (n != step or n >= s.limit if running else n > step):
                raise ValueError(f"generation state: a sequence of {n} ids (reason {code}) at step {step}")
        return n_new, reason, ids, logprobs
