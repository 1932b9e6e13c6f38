"""Scores from a head in vocabulary steps (workers/scoring.py StepScores) against the whole head's
(compute_scores), on a hand-made head: rows duplicated across step boundaries make argmax ties."""

from __future__ import annotations

import pytest
import torch

from flexorch.contract.protocol import ScoreSpec
from flexorch.workers.scoring import StepScores, compute_scores, score_targets, scored_positions

VOCAB, HIDDEN = 1000, 16
ROWS = [((1, 2, 3, 4), ((5, 6, 7), (999,), ())), ((8, 9), ((10, 11, 12, 13), (998, 0)))]


def head() -> torch.Tensor:
    """(VOCAB, HIDDEN) weight whose rows 700 and 990 repeat rows 3 and 250: every logit of a repeated
    row ties with an earlier one in another step, and row 3 is the argmax for the first positions."""
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN)
    weight[3] = weight[3] * 0 + 4.0  # large: the argmax where the hidden state is positive
    weight[700], weight[990] = weight[3], weight[250]
    return weight


def stepped(hidden, targets, score, weight, step: int):
    running = StepScores(scored_positions(hidden, targets), targets, score)
    for first in range(0, VOCAB, step):
        end = min(first + step, VOCAB)
        running.add(first, end, lambda normed: normed @ weight[first:end].T)
    return running.finish()


@pytest.mark.parametrize("step", [1000, 333, 64, 7])
@pytest.mark.parametrize("score", [ScoreSpec("suffix_logprob"), ScoreSpec("next_token_probs"),
                                   ScoreSpec("token_probs", token_ids=(3, 700, 250, 999))], ids=str)
def test_steps_of_the_vocabulary_score_as_the_whole_head(score, step):
    weight = head()
    hidden = torch.randn(2, 9, HIDDEN).abs() / 4  # positive: row 3 (and its copy, 700) lead; logits ~ 10
    hidden[1, 3] = -hidden[1, 3]
    targets = score_targets(ROWS, score.kind)
    whole = compute_scores(hidden, targets, lambda h: h @ weight.T, score, VOCAB)
    parts = stepped(hidden, targets, score, weight, step)
    # float rounding: the whole head sums float32 log-softmax values, the steps reduce in float64
    torch.testing.assert_close(parts.values, whole.values, atol=1e-6 if score.kind.generates else 1e-5,
                               rtol=0)
    if score.kind.generates:
        assert torch.equal(parts.next_ids, whole.next_ids)  # ties: the first index, as torch.argmax
        assert set(parts.next_ids.tolist()) & {3, 700} == {3}
    else:
        assert torch.equal(parts.is_greedy, whole.is_greedy)


def test_a_batch_of_empty_suffixes_scores_zero_and_greedy():
    targets = score_targets([((1, 2), ((), ()))], ScoreSpec("suffix_logprob").kind)
    scores = stepped(torch.randn(1, 2, HIDDEN), targets, ScoreSpec("suffix_logprob"), head(), 100)
    assert scores.values.tolist() == [0.0, 0.0] and scores.is_greedy.tolist() == [True, True]
