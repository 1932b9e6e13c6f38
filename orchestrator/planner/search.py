"""The search for one worker's settings (`_plan_worker`, which every mode calls per seat): an objective,
not a fill rule.

Every combination of batch_tokens (powers of two up to the device's cap, and the longest prompt),
storage, layers_per_shard (powers of two and all), one or two shard slots and, where
layers_per_shard is auto, keeping the whole model resident, is sized (rounds: consecutive prompts,
the resume unit, of about ROUND_TARGET_SECONDS of compute that fit in memory: memory.py) and timed
(timing.py). The fastest wins, except that among the combinations within TIME_TOLERANCE of it,
those within MEMORY_TOLERANCE of the least memory are preferred (the fastest of them). So layers per
shard grow only where that buys time (fewer activation round trips), and a model that fits stays
resident only where re-reading it would cost time (several rounds or generation steps that reading
dominates). An explicit value is checked against the budgets instead (a value that cannot fit is a
`UserError` before any work starts, saying what fits).

Generating with `kv_cache_compression: auto`, the search also tries the KV cache compressed (int8,
then int4): compression is lossy, so it is taken only where it is faster than the best
uncompressed setting by more than TIME_TOLERANCE, i.e. where the cache is what held the batch, the
tier or the rounds back (its memory, or its traffic to and from the tier): `_with_compression`.

A MoE model whose layers do not fit whole streams its experts (one layer per shard, planned
at one expert per group, then experts_per_group grows into the memory left beside the chosen
batch and rounds).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from flexorch.contract.choices import DeviceKind, KVCompression, Storage, on_cpu
from flexorch.contract.protocol import HEAP_SLACK, EngineSettings
from flexorch.orchestrator.hardware import format_bytes
from flexorch.orchestrator.planner.memory import (_Budget, _Peaks, _fits, _max_peaks, _peaks, _round_longest,
                                                  _shortfall)
from flexorch.orchestrator.planner.model import (DOUBLE_BUFFER, NO_STORAGE, SINGLE_BUFFER, _error, _Job, _Load,
                                                 _Setup)
from flexorch.orchestrator.planner.plan import WorkerPlan
from flexorch.orchestrator.planner.checkpoints import PIPELINE_REASON, CheckpointChoice, choose_checkpoints
from flexorch.orchestrator.planner.timing import _pass_shares, _per_shard, _rate, _read_rate, _shard_costs, _time, _Time
from flexorch.orchestrator.durations import format_seconds
from flexorch.orchestrator.spec import JobSpec

# Largest batch tried. GPU: ~16k tokens fill an H100's matmul units for hidden sizes >= 4096;
# beyond that working memory grows and speed does not. CPU: GEMM throughput saturates at a few
# hundred rows, and bigger batches fall out of cache: on a 2-core Xeon, 16 x 1024 fp32 Llama, 32
# prompts, 1024 tokens ran in 33.5 s at 756 MB peak RSS, 4096 in 39.1 s at 962 MB, 512 in 36.6 s.
BATCH_TOKENS_CAP = {"cuda": 16384, "cpu": 1024}

# A round is the resume unit: a crash loses at most about this much compute.
ROUND_TARGET_SECONDS = 300.0

# ... but every round re-reads all the weights: keep its compute >= 4x that read so reading
# stays a small share of the time (unless the whole slice is smaller).
ROUND_MIN_COMPUTE_OVER_READ = 4.0

# Settings predicted within this share of the fastest count as equally fast, and the one needing the
# least memory wins: 3% is about the run-to-run spread of one setting on a quiet machine
# (bench_limit's repeats), so a smaller predicted gain is not one a user could see.
TIME_TOLERANCE = 0.03

# ... and of those, peaks within this share of the least count as equally small: the memory model
# is held to 10% of measured peaks (bench_autotune), so a smaller saving is not one to trade speed for.
MEMORY_TOLERANCE = 0.10

# Auto layers_per_shard of a pipeline leaves each stage at least this many decoder groups: shards
# are dealt out in turn, so with few big shards one stage would read most of the model (2 stages,
# all layers in one shard: stage 1 reads every decoder layer); with 4 each, stages' reads differ by
# at most a group and an edge.
PIPELINE_GROUPS_PER_STAGE = 4


@dataclass(frozen=True)
class _Space:
    """The values each setting may take (one value where the job fixes it)."""

    batches: tuple[int, ...]  # largest first
    storages: tuple[Storage, ...]
    lps: tuple[int, ...]  # increasing
    resident: bool  # also try keeping the whole model on the device
    slots: tuple[int, ...] = (DOUBLE_BUFFER,)  # shard slots to try when streaming (DOUBLE_BUFFER, SINGLE_BUFFER)
    compressions: tuple[KVCompression, ...] = (KVCompression.NONE,)  # the KV cache's, least lossy first


@dataclass(frozen=True)
class _Option:
    """One combination of settings, with the rounds it allows, its peaks and its time."""

    setup: _Setup
    rounds: tuple[tuple[int, ...], ...]
    peaks: _Peaks
    time: _Time


def _plan_worker(job: _Job, name: str, device: str, indices: tuple[int, ...], threads: int, budget: _Budget,
                 stages: int = 1) -> WorkerPlan:
    """Per worker: every combination of batch_tokens, storage, layers_per_shard (and keeping the
    whole model resident) that fits is predicted; the fastest wins, and among those within
    TIME_TOLERANCE of it the one with the least peak memory. `stages` > 1: one stage of a pipeline,
    which reads and computes 1/stages of every pass over `indices`."""
    spec, reasons = job.spec, []
    floor = _lps_floor(job, reasons)
    longest_index = max(indices, key=lambda i: (job.lengths[i], -i))
    job = _stream_experts_if_needed(job, device, floor, longest_index, budget)
    if job.model.experts_per_group:
        floor = 1
    _check_minimum(job, device, floor, longest_index, budget)
    streaming = bool(job.model.experts_per_group)  # expert streaming runs one layer per shard
    space = _Space(
        batches=_batch_candidates(job, device, indices, floor, longest_index, budget),
        storages=(Storage.CPU,) if stages > 1 else _storages(spec, device),
        lps=(1,) if streaming else _lps_candidates(job, floor, stages),
        resident=stages == 1 and spec.layers_per_shard is None and not streaming,
        slots=(DOUBLE_BUFFER,) if stages > 1 else (DOUBLE_BUFFER, SINGLE_BUFFER),
        compressions=_compressions(job),
    )
    options = _search(job, device, indices, threads, budget, space, stages)
    if not options:
        raise _error(spec, "storage", _no_storage_message(job, device, indices, threads, space, budget, stages))
    best, why = _with_compression(options, space.compressions)
    reasons += _option_reasons(job, [o for o in options if o.setup.kv_compression is best.setup.kv_compression],
                               best, device, stages)
    if why:
        reasons.append(why)
    setup, t, peaks = best.setup, best.time, best.peaks
    if streaming:  # searched at one expert per group; groups then grow into what is left
        job = _grow_expert_groups(job, setup, best.rounds, budget, reasons)
        peaks = _max_peaks(job, setup, best.rounds)
    if on_cpu(device):
        reasons.append(f"threads {threads}: the machine's {job.figures.hardware.cpu_count} cores split between its "
                       "CPU workers")
    # free heap kept between shards sits beside the peak: no more than the budget leaves
    heap_slack = max(0, min(HEAP_SLACK, budget.ram - peaks.ram))
    if heap_slack < HEAP_SLACK:
        reasons.append(f"heap slack {format_bytes(heap_slack)}: free heap kept between shards, what the RAM budget "
                       f"leaves beside the predicted peak (else {format_bytes(HEAP_SLACK)})")
    checkpoints = _checkpoints(job, setup, best.rounds, t, threads, stages)
    reasons.append(checkpoints.reason)
    settings = EngineSettings(
        checkpoint_shards=checkpoints.every,
        device=device, dtype=job.dtype, layers_per_shard=setup.lps, storage=setup.storage, batch_tokens=setup.batch,
        disk_folder=_disk_folder(spec, name) if setup.storage.on_disk else None,
        threads=threads if on_cpu(device) else 0, resident=setup.resident,
        experts_per_group=job.model.experts_per_group, allow_untested_models=spec.allow_untested_models,
        double_buffer=setup.slots == DOUBLE_BUFFER, heap_slack=heap_slack, direct_reads=job.direct_reads,
        kv_cache_compression=setup.kv_compression,
    )
    return WorkerPlan(
        name=name, device=device, settings=settings, prompt_indices=indices, rounds=best.rounds,
        predicted_peak_device_memory=peaks.device, predicted_peak_ram=peaks.ram,
        predicted_read_seconds=t.read, predicted_compute_seconds=t.compute, reasons=tuple(reasons),
        predicted_fill_seconds=t.fill, predicted_start_seconds=t.start,
        predicted_checkpoint_seconds=checkpoints.seconds,
        predicted_pass_shares=_pass_shares(job, setup, indices, threads) if stages == 1 else (),
    )


def _checkpoints(job: _Job, setup: _Setup, rounds, t: _Time, threads: int, stages: int) -> CheckpointChoice:
    """How often the rounds are checkpointed (planner/checkpoints.py), priced on the longest round:
    its shards' times, its activations (what waits between shards) and KV cache, and its scores."""
    if stages > 1:
        return CheckpointChoice(0, 0.0, PIPELINE_REASON)
    longest = max(rounds, key=lambda r: sum(job.tokens[i] for i in r))
    load = sum((job.loads[i] for i in longest), _Load())
    costs = _shard_costs(job, setup, load, threads, stages, read=not setup.resident)
    steps, m = job.steps, job.model  # generate: the round's longest limit
    shards = _per_shard(costs.first_step, costs.reads, 0.0, setup.slots)
    shards += (steps - 1) * _per_shard(costs.later_step, costs.reads, 0.0, setup.slots)
    kept = m.kv_token_bytes(setup.kv_compression)
    tiered = load.act_tokens * m.hidden * m.dtype_bytes + (load.cache_peak * kept * m.num_layers
                                                           if steps > 1 else 0)
    disk = setup.storage.on_disk
    rate = job.figures.disk_read
    return choose_checkpoints(job.spec.checkpoint_interval, shards, len(rounds), t.total,
                              written=int(load.result_bytes + (0 if disk else tiered)),
                              linked=int(tiered if disk else 0),
                              write_rate=rate.value, rate_source=f"no write rate is measured: the disk's read rate, "
                                                                f"{rate.source}")


def _search(job: _Job, device: str, indices: tuple[int, ...], threads: int, budget: _Budget, space: _Space,
            stages: int) -> list[_Option]:
    options = []
    for compression, batch, storage, resident, slots in _tried(space):
        for lps in space.lps[:1] if resident else space.lps:
            setup = _Setup(device, lps, batch, storage, resident, slots, compression)
            rounds = _rounds_for(job, setup, indices, threads, budget, stages)
            if rounds is None:
                break  # a longer shard needs more memory still
            time = _time(job, setup, indices, rounds, threads, stages)
            options.append(_Option(setup, rounds, _max_peaks(job, setup, rounds), time))
    return options


def _tried(space: _Space):
    """Every (compression, batch, storage, resident, slots) the search tries, in its order; each is then
    tried at increasing layers per shard (one, resident: the whole model is one load)."""
    for compression, batch, storage in itertools.product(space.compressions, space.batches, space.storages):
        for resident in (False, True) if space.resident else (False,):
            for slots in (DOUBLE_BUFFER,) if resident else space.slots:
                yield compression, batch, storage, resident, slots


def _compressions(job: _Job) -> tuple[KVCompression, ...]:
    """The job's KV cache compression; auto: every scheme where a cache is kept (else none)."""
    if job.spec.kv_cache_compression is not None:
        return (job.spec.kv_cache_compression,)
    return tuple(KVCompression) if job.steps > 1 else (KVCompression.NONE,)


def _with_compression(options: Sequence[_Option], compressions: Sequence[KVCompression]) -> tuple[_Option, str]:
    """The chosen option and, where the compression was the planner's, why. Compression changes the
    scores, so a scheme is taken only where it is faster than the best of the less lossy ones by more
    than TIME_TOLERANCE (or only it fits): where the cache held the batch, the tier or the rounds back."""
    best = {c: _choose(ours) for c in compressions if (ours := [o for o in options if o.setup.kv_compression is c])}
    if len(compressions) == 1:
        return best[compressions[0]], ""
    chosen = None
    for c in compressions:  # least lossy first
        if c in best and (chosen is None or best[c].time.total < chosen.time.total * (1 - TIME_TOLERANCE)):
            chosen = best[c]
    c = chosen.setup.kv_compression
    found = "; ".join(f"{k} {_describe_setup(o)}" for k, o in best.items())
    if c is KVCompression.NONE:
        return chosen, (f"kv_cache_compression none (auto): compressing the KV cache (lossy) would not be faster by more "
                        f"than {TIME_TOLERANCE:.0%}: the cache does not limit the batch ({found})")
    gain = (f"compressed it is more than {TIME_TOLERANCE:.0%} faster than less lossy" if KVCompression.NONE in best
            else "uncompressed it fits nowhere")
    return chosen, (f"kv_cache_compression {c} (auto): the KV cache limits the batch: {gain} ({found}); keys and "
                    f"values then come back within half a step of their group of up to 64 values (README: KV cache "
                    f"compression)")


def _describe_setup(option: _Option) -> str:
    s = option.setup
    return (f"{format_seconds(option.time.total)} at batch_tokens {s.batch}, storage {s.storage}, "
            f"{len(option.rounds)} round(s)")


def _rounds_for(job: _Job, setup: _Setup, indices: tuple[int, ...], threads: int, budget: _Budget,
                stages: int) -> tuple[tuple[int, ...], ...] | None:
    """Rounds of about ROUND_TARGET_SECONDS of compute that fit, or None when this setup cannot
    hold the smallest useful rounds (compute >= ROUND_MIN_COMPUTE_OVER_READ x the weights' read;
    a resident model is read once, so any round is useful)."""
    rate = _rate(job, setup.device, threads, setup.batch) * stages
    read_per_round = 0.0 if setup.resident else (
        job.model.bytes_per_pass * job.steps / _read_rate(job, setup.device) / stages)
    min_flops = ROUND_MIN_COMPUTE_OVER_READ * read_per_round * rate
    target_flops = max(ROUND_TARGET_SECONDS * rate, min_flops)

    def fits(load: _Load, longest: int) -> bool:
        return _fits(_peaks(job, setup, load, longest), budget)

    if min_flops > 0 and not _holds(job, _split_rounds(job, indices, min_flops, lambda load, longest: True), fits):
        return None
    rounds = _split_rounds(job, indices, target_flops, fits)
    if rounds is None or len(rounds) < 2:
        return rounds
    # As many rounds, evened out: a short last round would read the whole model for a few prompts. Each
    # round closed above the mean, so no more rounds than before (unless memory cuts one short).
    steps = job.steps
    flops = [job.loads[i].flops(steps) for i in indices]
    even = _split_rounds(job, indices, sum(flops) / len(rounds) + max(flops), fits)
    return even if even is not None and len(even) == len(rounds) else rounds


def _split_rounds(job: _Job, indices: Sequence[int], target_flops: float,
                  fits: Callable[[_Load, int], bool]) -> tuple[tuple[int, ...], ...] | None:
    """Consecutive rounds of about `target_flops` each that fit; None if one prompt alone does not."""
    rounds: list[tuple[int, ...]] = []
    current: list[int] = []
    load, longest = _Load(), 0
    for i in indices:
        grown, grown_longest = load + job.loads[i], max(longest, job.lengths[i])
        if current and (grown.flops(job.steps) > target_flops or not fits(grown, grown_longest)):
            rounds.append(tuple(current))
            current, grown, grown_longest = [], job.loads[i], job.lengths[i]
        if not current and not fits(grown, grown_longest):
            return None
        current.append(i)
        load, longest = grown, grown_longest
    rounds.append(tuple(current))
    return tuple(rounds)


def _holds(job: _Job, rounds, fits: Callable[[_Load, int], bool]) -> bool:
    return all(fits(sum((job.loads[i] for i in r), _Load()), _round_longest(job, r)) for r in rounds)


def _choose(options: Sequence[_Option]) -> _Option:
    """Among the options within TIME_TOLERANCE of the fastest, those within MEMORY_TOLERANCE of the
    least memory (device + RAM), and of those the fastest: neither a gain too small to see in time
    nor one too small to matter in memory decides alone."""
    fastest = min(o.time.total for o in options)
    near = [o for o in options if o.time.total <= fastest * (1 + TIME_TOLERANCE)]
    least = min(_memory(o) for o in near)
    small = [o for o in near if _memory(o) <= least * (1 + MEMORY_TOLERANCE)]
    # equal times (reading dominates every option): activations nearest the compute, the simplest store
    return min(small, key=lambda o: (o.time.total, list(Storage).index(o.setup.storage), _memory(o)))


def _memory(option: _Option) -> int:
    return option.peaks.device + option.peaks.ram


def _batch_candidates(job: _Job, device: str, indices: tuple[int, ...], lps: int, longest_index: int,
                      budget: _Budget) -> tuple[int, ...]:
    """Auto: powers of two up to the device's cap whose forward fits, and the longest prompt (a
    prompt is one row of one forward), largest first. Explicit: that value, checked."""
    longest = job.lengths[longest_index]

    def fits(batch: int) -> bool:
        setup = _Setup(device, lps, batch, NO_STORAGE, slots=SINGLE_BUFFER)
        return _fits(_peaks(job, setup, job.loads[longest_index], longest), budget)

    requested = job.spec.batch_tokens
    if requested is not None:
        if requested < longest:
            raise _error(job.spec, "batch_tokens", f"{requested} is below prompt {longest_index}'s {longest} tokens "
                         "(a prompt is one forward pass)")
        if not fits(requested):
            largest = _largest_fitting(range(longest, max(requested, BATCH_TOKENS_CAP[DeviceKind.of(device)]) + 1), fits)
            raise _error(job.spec, "batch_tokens", f"{requested} does not fit on {device} with {lps} layer(s) per "
                         f"shard: at most {largest} fits")
        return (requested,)
    # A batch never holds more than the worker's whole slice, so neither does the memory estimate.
    slice_tokens = sum(job.lengths[i] for i in indices)
    cap = min(BATCH_TOKENS_CAP[DeviceKind.of(device)], 1 << max(slice_tokens - 1, 0).bit_length())
    candidates = sorted({1 << k for k in range(cap.bit_length()) if longest <= 1 << k <= cap} | {longest},
                        reverse=True)
    return tuple(b for b in candidates if fits(b))  # `longest` fits: _check_minimum passed


def _lps_candidates(job: _Job, floor: int, stages: int) -> tuple[int, ...]:
    """Auto: powers of two and every decoder layer (at most a pipeline stage's share)."""
    if job.spec.layers_per_shard is not None:
        return (floor,)
    n = job.model.num_layers
    most = max(floor, n // (PIPELINE_GROUPS_PER_STAGE * stages)) if stages > 1 else n
    return tuple(sorted({floor, most} | {1 << k for k in range(most.bit_length()) if floor <= 1 << k <= most}))


def _storages(spec: JobSpec, device: str) -> tuple[Storage, ...]:
    """Storages to try, best first: on the device, then RAM, then disk."""
    if spec.storage is Storage.GPU and on_cpu(device):
        raise _error(spec, "storage", "gpu needs a GPU device, but this worker runs on cpu")
    if spec.storage is not None:
        return (spec.storage,)
    return tuple(s for s in Storage if not (s.on_device and on_cpu(device)))


def _lps_floor(job: _Job, reasons: list[str]) -> int:
    requested = job.spec.layers_per_shard
    if requested is None:
        return 1
    if requested > job.model.num_layers:
        reasons.append(f"layers_per_shard {requested} capped at the model's {job.model.num_layers} decoder layers")
        return job.model.num_layers
    return requested


def _minimum_fits(job: _Job, device: str, lps: int, longest_index: int, budget: _Budget, slots: int) -> bool:
    load = job.loads[longest_index]
    longest = job.lengths[longest_index]
    return _fits(_peaks(job, _Setup(device, lps, longest, NO_STORAGE, slots=slots), load, longest), budget)


def _check_minimum(job: _Job, device: str, lps: int, longest_index: int, budget: _Budget) -> None:
    """The smallest step this worker must take: one shard slot and its longest prompt as one forward
    (activations between shards not counted yet: the storage comes later)."""
    longest = job.lengths[longest_index]
    load = job.loads[longest_index]

    def peaks_at(n: int, batch: int) -> _Peaks:
        return _peaks(job, _Setup(device, n, batch, NO_STORAGE, slots=SINGLE_BUFFER), load if batch else _Load(),
                      longest)

    peaks = peaks_at(lps, longest)
    if _fits(peaks, budget):
        return
    weights_only = peaks_at(1, 0)
    if not _fits(weights_only, budget):
        raise _error(job.spec, "model", f"does not fit on {device} even one layer at a time: a shard of "
                     f"{format_bytes(job.model.shard(1))} (the largest of embedding, one decoder layer, norm + head) "
                     f"{_shortfall(weights_only, budget, device)}; raise the limits or use a device with more memory")
    if lps > 1 and _fits(peaks_at(1, longest), budget):
        at_most = _largest_fitting(range(1, lps), lambda n: _fits(peaks_at(n, longest), budget))
        raise _error(job.spec, "layers_per_shard", f"{lps} does not fit on {device}: "
                     f"{_shortfall(peaks, budget, device)}; at most {at_most} fit(s) beside prompt {longest_index}'s "
                     "forward")
    raise _error(job.spec, "prompts", f"prompt {longest_index} ({longest} tokens) is one forward pass and "
                 f"{_shortfall(peaks, budget, device)} on {device} with {lps} layer(s) per shard; shorten it or "
                 "raise the limits")


def _stream_experts_if_needed(job: _Job, device: str, lps: int, longest_index: int, budget: _Budget) -> _Job:
    """A MoE model whose layers do not fit whole streams its experts, one layer per shard: planned
    first with one expert per group (the least weight memory, leaving the most for the batch and the
    rounds), then `_grow_expert_groups` fills what is left. Decided at two slots: streaming the
    experts keeps the reads overlapped, where whole layers in one slot would wait for every read."""
    m = job.model
    if m.moe is None or job.spec.layers_per_shard not in (None, 1) or _minimum_fits(
            job, device, lps, longest_index, budget, DOUBLE_BUFFER):
        return job
    return replace(job, model=m.streamed(1))


def _grow_expert_groups(job: _Job, setup: _Setup, rounds, budget: _Budget, reasons: list[str]) -> _Job:
    """As many experts per group as fit beside the chosen batch and rounds (fewer, larger reads).

    How many tokens a group gets is data-dependent (the router decides), so memory is sized for the
    worst case: each token goes to num_experts_per_tok experts, so a batch's expert rows are at most
    batch_tokens x k whichever group they fall into, and the working memory counts that many
    (`_intermediate`). What a layer keeps between its steps is per token, not per expert: fixed by
    the round's tokens (`_Model.streamed`)."""
    m = job.model
    moe = m.moe
    group = _largest_fitting(range(1, moe.experts + 1),
                             lambda g: _fits(_max_peaks(replace(job, model=m.streamed(g)), setup, rounds), budget))
    whole = moe.stored_dense_part + moe.experts * moe.stored_expert
    reasons.append(f"experts_per_group {group} (auto): a whole MoE layer ({format_bytes(whole)}, double-buffered) "
                   f"does not fit on {setup.device}; each MoE layer streams as its dense part "
                   f"({format_bytes(moe.stored_dense_part)}) then its {moe.experts} experts {group} at a time "
                   f"({format_bytes(group * moe.stored_expert)}), the next step prefetched, one layer per shard; "
                   "as many per group as fit beside the batch and rounds")
    return replace(job, model=m.streamed(group or 1))


def _largest_fitting(candidates: range, fits: Callable[[int], bool]) -> int | None:
    """The largest n of an increasing range with fits(n), given fits is monotone (binary search)."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _option_reasons(job: _Job, options: Sequence[_Option], best: _Option, device: str, stages: int) -> list[str]:
    """Why `best`: the search, then per setting the best option differing only in it."""
    fastest = min(o.time.total for o in options)
    if len(options) > 1:
        reasons = [f"settings (auto): {len(options)} combination(s) of batch_tokens, storage, layers_per_shard and "
                   f"shard slots fit; the fastest is predicted {format_seconds(fastest)}; of those within "
                   f"{TIME_TOLERANCE:.0%} of it, and within {MEMORY_TOLERANCE:.0%} of the least memory (GPU + RAM), "
                   "this one is the fastest"]
    else:
        reasons = ["settings: the only combination that fits"]
    s, spec = best.setup, job.spec
    fields = (("batch_tokens", "batch", spec.batch_tokens), ("storage", "storage", spec.storage),
              ("layers_per_shard", "lps", spec.layers_per_shard), ("shard slots", "slots", None))
    for key, attr, given in fields:
        if given is not None:
            reasons.append(f"{key} {getattr(s, attr)} (from the job)")
            continue
        others = [o for o in options if getattr(o.setup, attr) != getattr(s, attr) and o.setup.resident == s.resident
                  and all(getattr(o.setup, a) == getattr(s, a) for _, a, _ in fields if a != attr)]
        value = f"{getattr(s, attr)}" + (" (all, resident)" if attr == "lps" and s.resident else "")
        reasons.append(f"{key} {value} (auto): {_describe_option(best, device)}"
                       + "".join(f"; {getattr(o.setup, attr)}: {_describe_option(o, device)}" for o in others[:4]))
    if s.resident:
        rounds, steps = len(best.rounds), job.steps
        reasons.append(f"resident (auto): the whole model fits on {device} beside its batches, so it is read once for "
                       f"the job instead of {rounds * steps} time(s) ({rounds} round(s) x {steps} step(s))")
    if stages > 1:
        reasons.append("storage cpu: pipeline activations arrive from the previous stage and wait in RAM (a whole "
                       "round at a slow stage)")
    reasons.append(f"{len(best.rounds)} round(s) (the resume unit) of about {ROUND_TARGET_SECONDS:.0f} s of compute at "
                   "most, each long enough that reading the weights stays a small share, and fitting in memory")
    return reasons


def _describe_option(option: _Option, device: str) -> str:
    peak = option.peaks.ram if on_cpu(device) else option.peaks.device
    return f"{format_seconds(option.time.total)}, {format_bytes(peak)}"


def _no_storage_message(job: _Job, device: str, indices: tuple[int, ...], threads: int, space: _Space,
                        budget: _Budget, stages: int) -> str:
    batch, lps = space.batches[-1], space.lps[0]
    rate = _rate(job, device, threads, batch) * stages
    read = job.model.bytes_per_pass * job.steps / _read_rate(job, device) / stages
    smallest = _split_rounds(job, indices, ROUND_MIN_COMPUTE_OVER_READ * read * rate, lambda load, longest: True)
    biggest = max(smallest, key=lambda r: sum(job.loads[i].act_tokens for i in r))
    load, longest = sum((job.loads[i] for i in biggest), _Load()), _round_longest(job, biggest)
    peaks = {s: _peaks(job, _Setup(device, lps, batch, s, slots=space.slots[-1],
                                   kv_compression=space.compressions[-1]), load, longest)
             for s in space.storages}
    needs = "; ".join(f"{s} {_shortfall(p, budget, device)}" for s, p in peaks.items())
    what = f"{space.storages[0]} does not hold" if job.spec.storage else "no activation storage holds"
    return (f"{what} the smallest useful round on {device} ({len(biggest)} prompt(s), compute >= "
            f"{ROUND_MIN_COMPUTE_OVER_READ:.0f}x the time to read the weights): {needs}; "
            "raise limits.ram, free disk space or set disk_folder elsewhere"
            + ("; or let the KV cache be compressed (kv_cache_compression: auto, int8 or int4)"
               if job.steps > 1 and job.spec.kv_cache_compression is KVCompression.NONE else ""))


def _disk_folder(spec: JobSpec, name: str) -> str:
    base = spec.disk_folder if spec.disk_folder is not None else spec.job_dir / "activations"
    return str(base / name)
