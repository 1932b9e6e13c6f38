"""Which positions of a packed batch are scored, and the scores computed from their logits.

The lm head runs only on those positions: the last token of each suffix for next-token scores;
for suffix_logprob, the last prefix token and every suffix token but the last (each predicts the
next suffix token). Scores are float32 from the head's logits, log-probs summed in float64.

A head in steps of vocabulary rows (contract/shards.py) never holds a whole row of logits but for
next_token_probs, whose output is that row: `StepScores` keeps each scored position's final-norm
output and reduces each step's logits online — running max and sum of exponentials (the
logsumexp), the logits of the ids asked for, the running argmax (ties to the first index, as
torch.argmax) — so its scores equal the whole head's up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexorch.contract.protocol import ScoreKind, ScoreSpec
from flexorch.workers.generate import choose

# Logit rows per head call: bounds the (rows, vocab) float32 logits to ~256 MB at a 128k vocab.
_LOGIT_ELEMENTS = 64 << 20


@dataclass(frozen=True)
class ScoreTargets:
    """Positions to score in one batch, flattened over its rows.

    row, col: (n,) where in the (rows, L) batch each scored hidden state is.
    owner: (n,) the suffix (numbered over the batch, row by row) each position belongs to.
    target: (n,) the token each position must predict (suffix_logprob only; else -1).
    """

    row: torch.Tensor
    col: torch.Tensor
    owner: torch.Tensor
    target: torch.Tensor
    n_suffixes: int
    seeds: torch.Tensor | None = None  # generate with sampling: (n,) each position's draw seed (workers/generate.py)


def score_targets(rows: list[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]], kind: ScoreKind) -> ScoreTargets:
    """rows: (prefix_ids, suffix_ids) per packed row, in batch order; positions from `kind`."""
    row, col, owner, target = [], [], [], []
    first_suffix = 0
    for r, (prefix, suffixes) in enumerate(rows):
        for column, number, token in ScoreKind(kind).positions(len(prefix), tuple(map(len, suffixes))):
            row.append(r)
            col.append(column)
            owner.append(first_suffix + number)
            target.append(suffixes[number][token] if token >= 0 else -1)
        first_suffix += len(suffixes)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return ScoreTargets(as_long(row), as_long(col), as_long(owner), as_long(target), first_suffix)


@dataclass(frozen=True)
class StepResult:
    """Scores of one generation step, per suffix: a batch's (suffixes numbered over the batch), or
    one prompt's share of them (`suffixes`)."""

    values: torch.Tensor  # next_token_probs: (n_suffixes, vocab); token_probs: (n_suffixes, k);
    #                       suffix_logprob: (n_suffixes,) float64 log-probs;
    #                       generate: (n_suffixes,) float32 log-prob of the chosen id
    is_greedy: torch.Tensor | None  # suffix_logprob: (n_suffixes,) bool
    next_ids: torch.Tensor | None  # next-token kinds: (n_suffixes,) argmax (generate: chosen) ids

    def suffixes(self, part: slice) -> "StepResult":
        """The scores of suffixes `part` alone (views, no copy)."""
        return StepResult(*(None if t is None else t[part] for t in (self.values, self.is_greedy, self.next_ids)))


def scored_positions(hidden: torch.Tensor, targets: ScoreTargets) -> torch.Tensor:
    """hidden: (rows, L, d_model) → (n, d_model) at the scored positions."""
    return hidden[targets.row.to(hidden.device), targets.col.to(hidden.device)]


def compute_scores(hidden: torch.Tensor, targets: ScoreTargets, logits_fn, score: ScoreSpec,
                   vocab_size: int) -> StepResult:
    """hidden: (rows, L, d_model) after the last decoder layer; logits_fn: (n, d) → float32 (n, vocab)."""
    selected = scored_positions(hidden, targets)  # (n, d_model)
    n = selected.shape[0]
    if n == 0:  # only empty suffixes under suffix_logprob
        zeros = torch.zeros(targets.n_suffixes, dtype=torch.float64)
        return StepResult(zeros, torch.ones(targets.n_suffixes, dtype=torch.bool), None)
    rows_per_call = max(1, _LOGIT_ELEMENTS // vocab_size)
    logprobs, hits, probs, next_ids = [], [], [], []  # per call; the first two for suffix_logprob
    for start in range(0, n, rows_per_call):
        logits = logits_fn(selected[start:start + rows_per_call])  # (m, vocab) float32
        if not score.kind.generates:  # suffix_logprob
            target = targets.target[start:start + rows_per_call].to(logits.device)
            logprobs.append(torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0].double().cpu())
            hits.append((logits.argmax(-1) == target).cpu())
        elif score.kind is ScoreKind.GENERATE:
            seeds = None if targets.seeds is None else targets.seeds[start:start + rows_per_call]
            ids, chosen = choose(logits, seeds, score.sampling)
            next_ids.append(ids)
            probs.append(chosen)
        else:
            columns = torch.softmax(logits, dim=-1)
            if score.kind is ScoreKind.TOKEN_PROBS:
                columns = columns[:, list(score.token_ids)]
            probs.append(columns.cpu())
            next_ids.append(logits.argmax(-1).cpu())
    if score.kind.generates:
        return StepResult(torch.cat(probs), None, torch.cat(next_ids))
    return _summed(torch.cat(logprobs), torch.cat(hits), targets)


def _summed(logprobs: torch.Tensor, hits: torch.Tensor, targets: ScoreTargets) -> StepResult:
    """suffix_logprob: per scored position (n,) log-probs and whether the argmax was the target →
    per suffix their sum, greedy where every one hit."""
    logprob = torch.zeros(targets.n_suffixes, dtype=torch.float64).index_add_(0, targets.owner, logprobs)
    misses = torch.zeros(targets.n_suffixes, dtype=torch.long).index_add_(0, targets.owner, (~hits).long())
    return StepResult(logprob, misses == 0, None)


class StepScores:
    """One batch's scores from a head in steps of vocabulary rows, reduced as the steps come.

    normed: (n, d_model) the final-norm outputs of the batch's scored positions, kept for every
    step; `add` takes each step's logits (n, rows of the step) through `head_logits`."""

    def __init__(self, normed: torch.Tensor, targets: ScoreTargets, score: ScoreSpec):
        n, device = normed.shape[0], normed.device
        self.normed, self.targets, self.score = normed, targets, score
        self.max = torch.full((n,), -torch.inf, device=device)
        self.sum_exp = torch.zeros(n, dtype=torch.float64, device=device)
        self.best = torch.full((n,), -torch.inf, device=device)  # the running argmax's logit
        self.best_id = torch.zeros(n, dtype=torch.long, device=device)
        if score.kind is ScoreKind.SUFFIX_LOGPROB:
            self.wanted = targets.target.to(device)[:, None]  # (n, 1)
        else:
            self.wanted = torch.tensor(score.token_ids, dtype=torch.long, device=device).expand(n, -1)
        self.picked = torch.zeros(self.wanted.shape, device=device)  # (n, k) the wanted ids' logits
        self.parts: list[torch.Tensor] = []  # next_token_probs: each step's logits, the output's columns

    def add(self, first: int, end: int, head_logits) -> None:
        """The logits of vocabulary rows first..end-1 (head_logits: (m, d) → float32 (m, end - first))."""
        n = self.normed.shape[0]
        rows_per_call = max(1, _LOGIT_ELEMENTS // (end - first))
        parts = []
        for start in range(0, n, rows_per_call):
            part = slice(start, start + rows_per_call)
            logits = head_logits(self.normed[part])  # (m, rows)
            if self.score.kind in (ScoreKind.NEXT_TOKEN_PROBS, ScoreKind.GENERATE):
                parts.append(logits)
            else:
                self._reduce(part, first, logits)
        if parts:
            self.parts.append(torch.cat(parts))

    def _reduce(self, part: slice, first: int, logits: torch.Tensor) -> None:
        top_id = logits.argmax(-1)  # the first of equal logits
        top = logits.gather(1, top_id[:, None])[:, 0]
        better = top > self.best[part]  # strict: an equal logit of an earlier step keeps its lower id
        self.best[part] = torch.where(better, top, self.best[part])
        self.best_id[part] = torch.where(better, top_id + first, self.best_id[part])
        new_max = torch.maximum(self.max[part], top)
        rescale = torch.exp((self.max[part] - new_max).double())
        exps = torch.exp(logits - new_max[:, None]).sum(-1, dtype=torch.float64)
        self.sum_exp[part] = self.sum_exp[part] * rescale + exps
        self.max[part] = new_max
        wanted = self.wanted[part]
        inside = (wanted >= first) & (wanted < first + logits.shape[1])
        columns = (wanted - first).clamp(0, logits.shape[1] - 1)
        self.picked[part] = torch.where(inside, logits.gather(1, columns), self.picked[part])

    def finish(self) -> StepResult:
        if self.score.kind is ScoreKind.GENERATE:  # a sampled id needs the whole row of logits
            logits = torch.cat(self.parts, dim=1)  # (n, vocab)
            self.parts.clear()
            ids, chosen = choose(logits, self.targets.seeds, self.score.sampling)
            return StepResult(chosen, None, ids)
        if self.score.kind is ScoreKind.NEXT_TOKEN_PROBS:
            logits = torch.cat(self.parts, dim=1)  # (n, vocab)
            self.parts.clear()  # two (n, vocab) copies at once, as the whole head's logits and softmax
            return StepResult(torch.softmax(logits, -1).cpu(), None, logits.argmax(-1).cpu())
        logsumexp = self.max.double() + torch.log(self.sum_exp)  # (n,)
        logprobs = self.picked.double() - logsumexp[:, None]  # (n, k)
        if self.score.kind is ScoreKind.TOKEN_PROBS:
            return StepResult(torch.exp(logprobs).float().cpu(), None, self.best_id.cpu())
        hits = self.best_id == self.wanted[:, 0]
        return _summed(logprobs[:, 0].cpu(), hits.cpu(), self.targets)
