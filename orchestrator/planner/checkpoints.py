"""How often a round in progress is checkpointed (workers/checkpoint.py): a pure function of the
round's predicted shard times, the checkpoint's size and the disk's rate.

A round is the resume unit, and one round of a big model can be a pass of hours; the job's
`checkpoint_interval` bounds what a crash may lose. The engine checkpoints every N complete shards
(embedding, decoder groups, head; a streamed MoE layer counts once, at its end). N is the largest
whose slowest window of N consecutive shards stays within the bound: the fewest checkpoints that
keep the promise. Each writes the batches' activations (and the KV cache when generating) unless
they wait on the disk already (`storage: disk`: hard links, nothing written). Their cost is held
to CHECKPOINT_COST_SHARE of the job's time; where the bound needs more, the bound wins and the plan
says so: it is the job's stated promise, and a longer interval is the user's way to pay less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from flexorch.orchestrator.hardware import format_bytes
from flexorch.orchestrator.durations import format_seconds

# Checkpoints may cost at most this share of the job's predicted time: a crash is rare, so insurance
# against it should stay within the run-to-run spread of a job's time (3-5%).
CHECKPOINT_COST_SHARE = 0.05

PIPELINE_REASON = ("checkpoints: none in pipeline mode (a batch's activations are spread over the stages and "
                   "the queues between them, so no stage holds a state to resume from): a crash loses the round "
                   "in progress")


@dataclass(frozen=True)
class CheckpointChoice:
    every: int  # complete shards between checkpoints (EngineSettings.checkpoint_shards); 0: none
    seconds: float  # predicted time writing them over the job
    reason: str


def choose_checkpoints(bound: float | None, shard_seconds: Sequence[float], rounds: int, job_seconds: float,
                       written: int, linked: int, write_rate: float, rate_source: str) -> CheckpointChoice:
    """`shard_seconds`: the longest round's shards in schedule order (every generation step's);
    per checkpoint, at most `written` bytes written and `linked` bytes hard-linked (the disk tier's)."""
    round_seconds = sum(shard_seconds)
    if bound is None:
        return CheckpointChoice(0, 0.0, f"checkpoints: off (checkpoint_interval: off): a crash loses the round in "
                                        f"progress, up to {format_seconds(round_seconds)}")
    if round_seconds <= bound:
        return CheckpointChoice(0, 0.0, f"checkpoints: none needed: a round (about {format_seconds(round_seconds)}) "
                                        f"is within checkpoint_interval {format_seconds(bound)}, what a crash may lose")
    every = _largest_window(shard_seconds, bound)
    per_round = (len(shard_seconds) - 1) // every
    seconds = rounds * per_round * written / write_rate
    share = seconds / job_seconds if job_seconds > 0 else 0.0
    what = f"{format_bytes(written)} each written at {format_bytes(write_rate)}/s ({rate_source})"
    if linked:
        what += f", {format_bytes(linked)} linked where it waits on the disk already"
    reason = (f"checkpoints: every {every} shard(s), {per_round} per round ({what}): a crash loses at most "
              f"{format_seconds(_worst_window(shard_seconds, every))} of work, within checkpoint_interval "
              f"{format_seconds(bound)}; they cost {format_seconds(seconds)}, {share:.1%} of the job")
    if share > CHECKPOINT_COST_SHARE:
        reason += (f", above {CHECKPOINT_COST_SHARE:.0%}: the bound wins (it is what the job promises a crash "
                   "may lose); a longer checkpoint_interval costs less")
    return CheckpointChoice(every, seconds, reason)


def _worst_window(seconds: Sequence[float], n: int) -> float:
    """The longest time of n consecutive shards (fewer at the end: a checkpoint's work is lost only
    up to the round's commit)."""
    sums = [0.0]
    for s in seconds:
        sums.append(sums[-1] + s)
    n = min(n, len(seconds))
    return max(sums[i + n] - sums[i] for i in range(len(seconds) - n + 1))


def _largest_window(seconds: Sequence[float], bound: float) -> int:
    """The largest n (>= 1) whose every window of n consecutive shards takes at most `bound`: a
    single shard longer than the bound is checkpointed after each shard, the best there is."""
    low, high = 1, len(seconds)
    while low < high:  # windows only grow with n: bisect
        mid = (low + high + 1) // 2
        if _worst_window(seconds, mid) <= bound:
            low = mid
        else:
            high = mid - 1
    return low
