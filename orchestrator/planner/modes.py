"""The modes: `make_plan` (data or pipeline on this machine) and `make_cluster_plan` (data over the
nodes of a Ray cluster), each placing workers on seats and sizing every seat with `_plan_worker`
(search.py).

Decisions for the job: parallel, dtype, devices and the prompt slices (contiguous, balanced by tokens
weighted by device throughput); then per worker its settings (search.py).

Pipeline stages (parallel: pipeline; workers/pipeline.py) are sized as a data worker running the
whole prompt set, with three differences. Activations wait in RAM (storage cpu): they arrive from
the previous stage over a channel. A stage's inbox counts a whole round's activations, not a 1/n
share: a batch lives in one place at a time, but a slow stage can have every batch of the round
waiting at its door while it streams its shard. And each stage's channel holds up to
PIPELINE_CHANNEL_BATCHES batches in flight (reserved at the device's largest batch, then counted at
the chosen one). Its two shard slots are sized by the largest shard of the model (it may own it).

parallel auto: one device is data. Otherwise both are planned; when data mode's slowest worker is
predicted to spend longer reading weights than computing (few prompts, slow disk: every worker
streams the whole model), the stages' split reading wins and pipeline is chosen; when compute
dominates, data (it divides compute as well, without the hand-offs). The plan keeps both predictions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from flexorch.contract.choices import DeviceKind, Parallel, Storage, on_cpu
from flexorch.contract.manifest import SHIPPED_SCHEMES, Manifest
from flexorch.orchestrator.figures import figures_of
from flexorch.orchestrator.hardware import Hardware, Node, format_bytes
from flexorch.orchestrator.planner.memory import _Budget, _cap, _gpu_budget, _usable
from flexorch.orchestrator.planner.model import _describe_job, _error, _Job
from flexorch.orchestrator.planner.plan import PIPELINE_CHANNEL_BATCHES, ModePrediction, Plan, WorkerPlan
from flexorch.orchestrator.planner.search import BATCH_TOKENS_CAP, _plan_worker
from flexorch.orchestrator.planner.timing import _rate, _read_rate, _with_reads
from flexorch.orchestrator.spec import JobSpec


def make_plan(hardware: Hardware, manifest: Manifest, spec: JobSpec, prompt_tokens: Sequence[int], *,
              suffix_counts: Sequence[int] | None = None, scored_counts: Sequence[int] | None = None,
              unverified_bytes: int = 0, new_tokens: Sequence[int] | None = None) -> Plan:
    """Decide everything about running `spec` on `hardware`. `prompt_tokens[i]`: prompt i's packed
    tokens (prefix + all suffixes); `suffix_counts[i]`: its number of suffixes (sizes the scores and
    the tokens added per generation step; default DEFAULT_SUFFIXES_PER_PROMPT); `scored_counts[i]`:
    the positions the head scores (ScoreKind.positions; default: every token for suffix_logprob, one
    per suffix otherwise), which size the head's logits; `unverified_bytes`: of the layer files, the
    bytes not marked verified (contract/verified.py), which each worker hashes as it first reads them;
    `new_tokens[i]` (score kind generate): prompt i's max_new_tokens."""
    reasons: list[str] = []
    if not prompt_tokens:
        raise _error(spec, "prompts", "no prompts to score")
    dtype = _resolve_dtype(spec, manifest, reasons)
    if manifest.compression in SHIPPED_SCHEMES:
        reasons.append(f"weights {manifest.compression} as the checkpoint ships them: dequantised per shard into "
                       f"{dtype}; scores are the dequantised model's")
    elif manifest.compression:
        reasons.append(f"weights {manifest.compression} (flexorch prepare --compress): decoder projections "
                       f"dequantised per shard into {dtype}; scores are approximate")
    job = _describe_job(hardware, manifest, spec, dtype, prompt_tokens, suffix_counts, scored_counts, unverified_bytes,
                        new_tokens)
    if unverified_bytes:
        sha = job.figures.sha256
        reasons.append(f"checksums: {format_bytes(unverified_bytes)} of layer files not verified since `flexorch "
                       f"prepare` (copied, moved, changed, or in a read-only dir): each worker's first pass hashes "
                       f"them as it reads them (sha256 {format_bytes(sha.value)}/s, {sha.source})")
    devices = _resolve_devices(spec, hardware, reasons)
    if spec.parallel is not Parallel.DATA and len(devices) == 1:
        reasons.append(f"parallel data ({'auto' if spec.parallel is Parallel.AUTO else 'from pipeline'}): one device, "
                       "and a one-stage pipeline is data mode")
    figures = tuple(job.figures.describe(devices, dtype))
    if spec.parallel is Parallel.DATA or len(devices) == 1:
        data_reasons, data = _plan_data(job, hardware, devices)
        return Plan(Parallel.DATA, dtype, data, tuple(reasons + data_reasons), (_prediction(Parallel.DATA, data),), figures)
    pipeline = _plan_pipeline(job, hardware, devices)
    if spec.parallel is Parallel.PIPELINE:
        reasons.append(f"parallel pipeline (from the job): {len(devices)} stages, shard s on stage s % "
                       f"{len(devices)}, each reading only its shards")
        return Plan(Parallel.PIPELINE, dtype, pipeline, tuple(reasons), (_prediction(Parallel.PIPELINE, pipeline),), figures,
                    PIPELINE_CHANNEL_BATCHES)
    data_reasons, data = _plan_data(job, hardware, devices)
    predictions = (_prediction(Parallel.DATA, data), _prediction(Parallel.PIPELINE, pipeline))
    parallel, why = _choose_parallel(*predictions)
    reasons.append(f"parallel {parallel} (auto): {why}")
    if parallel is Parallel.DATA:
        return Plan(Parallel.DATA, dtype, data, tuple(reasons + data_reasons), predictions, figures)
    return Plan(Parallel.PIPELINE, dtype, pipeline, tuple(reasons), predictions, figures, PIPELINE_CHANNEL_BATCHES)


def make_cluster_plan(nodes: Sequence[Node], manifest: Manifest, spec: JobSpec, prompt_tokens: Sequence[int], *,
                      suffix_counts: Sequence[int] | None = None, scored_counts: Sequence[int] | None = None,
                      new_tokens: Sequence[int] | None = None) -> Plan:
    """make_plan for a Ray cluster (executor: ray): data mode over devices of several machines,
    named "node1:cuda:0". Each worker is sized by its own node's hardware; the workers of one node
    share its RAM, disk and cores. Pipeline mode is refused by the spec (docs/design.md says why)."""
    reasons: list[str] = [_describe_nodes(nodes)]
    if not prompt_tokens:
        raise _error(spec, "prompts", "no prompts to score")
    dtype = _resolve_dtype(spec, manifest, reasons)
    if spec.parallel is Parallel.PIPELINE:  # load_job refuses it; a spec built another way is refused here too
        raise _error(spec, "parallel", "pipeline is refused with executor: ray (see README, Several machines)")
    if spec.parallel is Parallel.AUTO:
        reasons.append("parallel data (auto): executor ray runs data mode only (pipeline stages would hand "
                       "activations on over the network at every shard)")
    job = _describe_job(nodes[0].hardware, manifest, spec, dtype, prompt_tokens, suffix_counts, scored_counts,
                        new_tokens=new_tokens)
    seats = _trim_idle(_resolve_cluster_devices(spec, nodes, reasons), len(job.tokens), reasons)
    workers = _plan_seats(job, seats, reasons)
    return Plan(Parallel.DATA, dtype, workers, tuple(reasons), (_prediction(Parallel.DATA, workers),))


def _describe_nodes(nodes: Sequence[Node]) -> str:
    listed = "; ".join(f"{n.name} {n.address} ({len(n.hardware.gpus)} GPU, {n.hardware.cpu_count} cores, "
                       f"{format_bytes(n.hardware.ram_available)} RAM)" for n in nodes)
    return f"Ray cluster of {len(nodes)} node(s): {listed}"


def _resolve_cluster_devices(spec: JobSpec, nodes: Sequence[Node], reasons: list[str]) -> list[tuple[Node, str]]:
    """(node, device as its worker sees it) per worker, in the order of the job's devices."""
    if spec.devices == "auto":
        seats = [(n, f"cuda:{gpu.index}") for n in nodes for gpu in n.hardware.gpus]
        why = "every GPU of the cluster"
        if not seats:
            seats, why = [(n, DeviceKind.CPU.value) for n in nodes], "no GPU in the cluster: one CPU worker per node"
        reasons.append(f"devices {', '.join(f'{n.name}:{d}' for n, d in seats)} (auto): {why}")
        return seats
    by_name = {n.name: n for n in nodes}
    seats = []
    for entry in spec.devices:
        name, device = entry.split(":", 1)
        node = by_name.get(name)
        if node is None:
            raise _error(spec, "devices", f"{entry}: no node {name} in the cluster (nodes: {', '.join(by_name)})")
        present = [f"cuda:{gpu.index}" for gpu in node.hardware.gpus]
        if not on_cpu(device) and device not in present:
            raise _error(spec, "devices", f"{entry} not present ({name}'s GPUs Ray may use: "
                                          f"{', '.join(present) or 'none'})")
        seats.append((node, device))
    return seats


def _plan_data(job: _Job, hardware: Hardware, devices: tuple[str, ...]) -> tuple[list[str], tuple[WorkerPlan, ...]]:
    """Data mode on this machine: its devices as seats, read through the page cache or around it."""
    reasons: list[str] = []
    here = Node(name="", address="", node_id="", hardware=hardware)  # this machine: devices keep plain names
    seats = _trim_idle([(here, device) for device in devices], len(job.tokens), reasons)
    job, reads = _with_reads(job, hardware, len(seats))
    reasons.append(reads)
    return reasons, _plan_seats(job, seats, reasons)


def _trim_idle(seats: list[tuple[Node, str]], n_prompts: int, reasons: list[str]) -> list[tuple[Node, str]]:
    """At most one seat per prompt: a worker's slice is never empty."""
    if len(seats) > n_prompts:
        reasons.append(f"{len(seats) - n_prompts} device(s) left idle: only {n_prompts} prompt(s)")
    return seats[:n_prompts]


def _plan_seats(job: _Job, seats: Sequence[tuple[Node, str]], reasons: list[str]) -> tuple[WorkerPlan, ...]:
    """Data mode: each seat (a machine's device, as its worker names it) streams the whole model over
    its contiguous slice of the prompts. A worker is sized by its own machine's hardware and figures;
    the workers of one machine share its RAM, disk and cores. A seat on a named node (executor ray)
    gives its worker the device "node1:cuda:0"."""
    threads = _seat_threads(seats)
    on_nodes = {id(n): replace(job, figures=figures_of(n.hardware)) for n, _ in seats}  # each node's own figures
    rates = [_cap_rate(on_nodes[id(node)], device, threads[i]) for i, (node, device) in enumerate(seats)]
    slices = _balanced_slices(job.tokens, rates)
    if len(seats) > 1:
        reasons.append(f"prompts split into {len(seats)} contiguous slices balanced by tokens, weighted by "
                       "each device's predicted throughput")
    workers = []
    for i, ((node, device), indices) in enumerate(zip(seats, slices)):
        hw, sharing, on_node = node.hardware, sum(n is node for n, _ in seats), on_nodes[id(node)]
        safety = on_node.figures.safety
        budget = _Budget(_gpu_budget(hw, device, job.spec, safety),
                         _usable(_cap(hw.ram_available, job.spec.limits.ram), safety) // sharing,
                         _usable(hw.disk_free, safety) // sharing)
        plan = _plan_worker(on_node, f"worker{i}", device, indices, threads[i], budget)
        workers.append(replace(plan, device=f"{node.name}:{device}", node=node.name) if node.name else plan)
    return tuple(workers)


def _seat_threads(seats: Sequence[tuple[Node, str]]) -> list[int]:
    """_threads per machine: each one's cores are split between its own CPU workers."""
    threads = [0] * len(seats)
    for node in {id(n): n for n, _ in seats}.values():
        mine = [i for i, (n, _) in enumerate(seats) if n is node]
        for i, t in zip(mine, _threads([seats[i][1] for i in mine], node.hardware.cpu_count)):
            threads[i] = t
    return threads


def _plan_pipeline(job: _Job, hardware: Hardware, devices: tuple[str, ...]) -> tuple[WorkerPlan, ...]:
    """Pipeline: every device a stage over all prompts, with the same shards, batches and rounds
    (so every stage builds the same batches); planned once for the tightest budget and the slowest
    device, then placed on each."""
    spec, n = job.spec, len(devices)
    kinds = {DeviceKind.of(d) for d in devices}
    if len(kinds) > 1:
        raise _error(spec, "devices", f"parallel: pipeline needs devices of one kind, got {', '.join(devices)}")
    if spec.storage not in (None, Storage.CPU):
        raise _error(spec, "storage", f"{spec.storage} is not supported with parallel: pipeline (activations "
                     "arrive from the previous stage and wait in RAM: use cpu or auto)")
    job, reads = _with_reads(job, hardware, 1)  # each stage reads only its own shards
    threads = _threads(devices, hardware.cpu_count)
    rates = [_cap_rate(job, d, threads[i]) for i, d in enumerate(devices)]
    slowest = min(range(n), key=lambda i: rates[i])
    m, kind = job.model, kinds.pop()
    reserve = PIPELINE_CHANNEL_BATCHES * BATCH_TOKENS_CAP[kind] * m.hidden * m.dtype_bytes
    safety = job.figures.safety
    gpu_budgets = [_gpu_budget(hardware, d, spec, safety) for d in devices]
    budget = _Budget(None if kind.is_cpu else min(gpu_budgets),
                     _usable(_cap(hardware.ram_available, spec.limits.ram), safety) // n - reserve,
                     _usable(hardware.disk_free, safety) // n)
    plan = _plan_worker(job, "worker0", devices[slowest], tuple(range(len(job.tokens))), threads[slowest], budget,
                        stages=n)
    channel = PIPELINE_CHANNEL_BATCHES * plan.settings.batch_tokens * m.hidden * m.dtype_bytes
    # Rounds were sized at 1/n of a pass; the busiest stage reads a little more (an edge, uneven groups).
    # The embedding's stage gathers the rows of each round's tokens, as a data worker does.
    tokens = [sum(job.loads[i].act_tokens for i in r) for r in plan.rounds]
    busiest = sum(m.stage_bytes(plan.settings.layers_per_shard, n, m.embed_read(t)) for t in tokens)
    read = job.steps * busiest / _read_rate(job, devices[slowest])
    plan = replace(plan, predicted_read_seconds=read, reasons=plan.reasons + (reads,))
    in_channel = f"up to {PIPELINE_CHANNEL_BATCHES} batches ({format_bytes(channel)}) wait in its outbound channel"
    return tuple(
        replace(plan, name=f"worker{i}", device=d, predicted_peak_ram=plan.predicted_peak_ram + channel,
                settings=replace(plan.settings, device=d, threads=threads[i] if kind.is_cpu else 0),
                reasons=plan.reasons + (f"stage {i} of {n}: owns shards s with s % {n} == {i}; {in_channel}",))
        for i, d in enumerate(devices)
    )


def _prediction(parallel: Parallel, workers: Sequence[WorkerPlan]) -> ModePrediction:
    slowest = max(workers, key=lambda w: w.predicted_seconds)
    return ModePrediction(parallel, len(workers), slowest.predicted_read_seconds, slowest.predicted_compute_seconds,
                          slowest.predicted_start_seconds, slowest.predicted_fill_seconds)


def _choose_parallel(data: ModePrediction, pipeline: ModePrediction) -> tuple[Parallel, str]:
    """Pipeline when data mode would wait on weight reading (see the module docstring)."""
    both = f"predicted {data.describe()}; {pipeline.describe()}"
    if data.read_seconds > data.compute_seconds:
        return Parallel.PIPELINE, (f"reading weights dominates data mode (every worker streams the whole model), and "
                                      f"pipeline stages read 1/{pipeline.workers} each: {both}")
    return Parallel.DATA, f"computing dominates, and data mode splits it without hand-offs between stages: {both}"


def _resolve_dtype(spec: JobSpec, manifest: Manifest, reasons: list[str]) -> str:
    if spec.dtype is not None:
        reasons.append(f"dtype {spec.dtype} (from the job; the checkpoint is {manifest.dtype})")
        return spec.dtype
    if manifest.dtype in ("float32", "float16", "bfloat16"):
        reasons.append(f"dtype {manifest.dtype} (auto): the checkpoint's, so scores match the model as published")
        return manifest.dtype
    reasons.append(f"dtype float32 (auto): the checkpoint's {manifest.dtype} is not a compute dtype")
    return "float32"


def _resolve_devices(spec: JobSpec, hardware: Hardware, reasons: list[str]) -> tuple[str, ...]:
    present = [f"cuda:{gpu.index}" for gpu in hardware.gpus]
    if spec.devices == "auto":
        devices = tuple(present) or (DeviceKind.CPU.value,)
        why = "every visible GPU" if present else "no GPU visible"
        reasons.append(f"devices {', '.join(devices)} (auto): {why}")
    else:
        devices = tuple(spec.devices)
        missing = [d for d in devices if not on_cpu(d) and d not in present]
        if missing:
            seen = ", ".join(present) or "none"
            raise _error(spec, "devices", f"{', '.join(missing)} not present (visible GPUs: {seen})")
    return devices


def _threads(devices: Sequence[str], cpu_count: int) -> list[int]:
    """CPU workers share the cores evenly; each GPU worker keeps one core busy (Python driving the
    GPU and the loader thread), so those are not handed out."""
    n_cpu = sum(on_cpu(d) for d in devices)
    share = max(1, (cpu_count - (len(devices) - n_cpu)) // max(n_cpu, 1))
    return [share if on_cpu(d) else 0 for d in devices]


def _cap_rate(job: _Job, device: str, threads: int) -> float:
    """FLOP/s at the device's largest batch: how devices compare when prompts are split."""
    return _rate(job, device, threads, BATCH_TOKENS_CAP[DeviceKind.of(device)])


def _balanced_slices(tokens: Sequence[int], rates: Sequence[float]) -> list[tuple[int, ...]]:
    """Contiguous, non-empty slices whose token counts are proportional to `rates` (equal tokens on
    equal devices): each cut goes at the prompt boundary nearest its target."""
    n, total = len(tokens), sum(tokens)
    cumulative = [0]
    for t in tokens:
        cumulative.append(cumulative[-1] + t)
    cuts, share = [0], 0.0
    for w, rate in enumerate(rates[:-1]):
        share += rate / sum(rates)
        target = total * share
        lo, hi = cuts[-1] + 1, n - (len(rates) - 1 - w)  # leave a prompt for every later worker
        cuts.append(min(range(lo, hi + 1), key=lambda c: (abs(cumulative[c] - target), c)))
    cuts.append(n)
    return [tuple(range(a, b)) for a, b in zip(cuts, cuts[1:])]
