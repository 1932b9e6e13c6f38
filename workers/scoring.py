"""Which positions of a packed batch are scored, and the scores computed from their logits.

The lm head runs only on those positions: the last token of each suffix for next-token scores;
for suffix_logprob, the last prefix token and every suffix token but the last (each predicts the
next suffix token). Scores are float32 from the head's logits, log-probs summed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexorch.contract.protocol import ScoreKind, ScoreSpec

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
class BatchScores:
    """Scores of one batch, per suffix (numbered over the batch)."""

    values: torch.Tensor  # next_token_probs: (n_suffixes, vocab); token_probs: (n_suffixes, k);
    #                       suffix_logprob: (n_suffixes,) float64 log-probs
    is_greedy: torch.Tensor | None  # suffix_logprob: (n_suffixes,) bool
    next_ids: torch.Tensor | None  # next-token kinds: (n_suffixes,) argmax ids, for generation


def compute_scores(hidden: torch.Tensor, targets: ScoreTargets, logits_fn, score: ScoreSpec,
                   vocab_size: int) -> BatchScores:
    """hidden: (rows, L, d_model) after the last decoder layer; logits_fn: (n, d) → float32 (n, vocab)."""
    selected = hidden[targets.row.to(hidden.device), targets.col.to(hidden.device)]  # (n, d_model)
    n = selected.shape[0]
    if n == 0:  # only empty suffixes under suffix_logprob
        zeros = torch.zeros(targets.n_suffixes, dtype=torch.float64)
        return BatchScores(zeros, torch.ones(targets.n_suffixes, dtype=torch.bool), None)
    rows_per_call = max(1, _LOGIT_ELEMENTS // vocab_size)
    outputs, greedy = [], []
    for start in range(0, n, rows_per_call):
        logits = logits_fn(selected[start:start + rows_per_call])  # (m, vocab) float32
        if not score.kind.generates:  # suffix_logprob
            target = targets.target[start:start + rows_per_call].to(logits.device)
            logprobs = torch.log_softmax(logits, dim=-1)
            outputs.append(logprobs.gather(1, target[:, None])[:, 0].double().cpu())
            greedy.append((logits.argmax(-1) == target).cpu())
        else:
            probs = torch.softmax(logits, dim=-1)
            if score.kind is ScoreKind.TOKEN_PROBS:
                probs = probs[:, list(score.token_ids)]
            outputs.append(probs.cpu())
            greedy.append(logits.argmax(-1).cpu())
    values, flags = torch.cat(outputs), torch.cat(greedy)
    if score.kind.generates:
        return BatchScores(values, None, flags)
    logprob = torch.zeros(targets.n_suffixes, dtype=torch.float64).index_add_(0, targets.owner, values)
    misses = torch.zeros(targets.n_suffixes, dtype=torch.long).index_add_(0, targets.owner, (~flags).long())
    return BatchScores(logprob, misses == 0, None)
