"""The planner: one pure function from (hardware, model manifest, job spec, prompt sizes) to a Plan.

`make_plan` is the only place placement is decided. It resolves every `auto` of the job with a
reason string, checks every explicit value against the budgets (a value that cannot fit is a
`UserError` before any work starts, saying what fits), and predicts each worker's peak memory and
time. No I/O, no torch: tests describe machines and models with plain numbers.

Memory model (per worker; sizes from the manifest, converted from the checkpoint dtype to the
compute dtype where the engine converts)
-------------------------------------------------------------------------------------------------
A pass streams the model shard by shard: the embedding alone, then `layers_per_shard` decoder
layers at a time, then norm + lm head (flexorch/contract/shards.py). Every batch of the round
goes through a shard before the next one comes; hidden states wait in the activation store.

* Weights: two shard slots (the one computing + the one prefetching) of the largest shard as
  stored, and, where the compute dtype differs from the checkpoint's, the converted copies of
  both (workers/prefetch.py). A shard is max(embed, norm + head, layers_per_shard x largest
  decoder layer): the edges can outweigh a decoder layer (a 128k-vocab 70B head is 2 GB in fp16).
* On CUDA, weights reach the device through pinned host staging (RAM) of one stored shard.
* Batch in flight: its input and output hidden states, 2 x batch_tokens x hidden x dtype bytes,
  on the compute device whatever the storage.
* Working memory of one forward of `batch_tokens` padded tokens, rows at most L (the longest
  prompt) long: MLP intermediates 3 x intermediate x tokens; q, k, v, attention output, residual,
  normed input 6 x hidden x tokens; attention scores tokens x L x heads x (dtype + 4) bytes (eager
  attention materialises them and softmaxes in float32); the 4D mask tokens x L x dtype bytes.
  The head shard instead holds float32 logits and their softmax for the scored positions. The
  larger of the two counts.
* Round activations: hidden x dtype bytes per padded token of the worker's current round at the
  first generation step (later steps, against the KV cache, carry one token per suffix). storage gpu:
  on the device; cpu: in RAM; disk: two copies on disk, and in RAM only the batch in flight.
* KV cache (generate_tokens > 1): every decoder layer's keys and values of every token of the
  round but the last step's, 2 x layers x kv_heads x head_dim x dtype bytes per padded token, in
  the activations' tier (gpu: device; cpu: RAM; disk: disk). The batch in flight also holds one
  layer's cache of its batch twice (read, and joined with the new token's) on the compute device;
  on disk, RAM holds the next batch's cache of a shard's layers (read ahead). A pipeline stage
  keeps only its own layers' cache: counting all of them is conservative.
* Round results: the scores of the round's prompts, held in RAM until the round is committed.
* Process baseline: Python + torch (+ the CUDA runtime on a GPU) in RAM; the CUDA context on the GPU.

Pipeline stages (parallel: pipeline; workers/pipeline.py) are sized as a data worker running the
whole prompt set, with three differences. Activations wait in RAM (storage cpu): they arrive from
the previous stage over a channel. A stage's inbox counts a whole round's activations, not a 1/n
share: a batch lives in one place at a time, but a slow stage can have every batch of the round
waiting at its door while it streams its shard. And each stage's channel holds up to
PIPELINE_CHANNEL_BATCHES batches in flight (reserved at the device's largest batch, then counted at
the chosen one). Its two shard slots are sized by the largest shard of the model (it may own it).

A worker fits when each peak <= its budget less SAFETY_FRACTION. Budgets: GPU = min(free memory,
limits.gpu_memory); RAM = min(available, limits.ram) split evenly between the workers; disk = free
space at the probed disk path, split evenly between the workers.

Decisions, in order: parallel, dtype, devices and the prompt slices (contiguous, balanced by
tokens weighted by device throughput) for the job; then per worker: batch_tokens (the largest
power of two up to a cap that fits at the smallest shard, never below the longest prompt), the
activation storage and the rounds (consecutive prompts, the resume unit, sized by time and memory),
and last layers_per_shard, which grows into the memory left.

Time model: read seconds = bytes of one pass x passes (generate_tokens) x rounds / read rate (the
disk's, or the PCIe link's if slower); compute seconds = 2 x FLOPs-bearing params x tokens / device
throughput (decoder layers on every token of the first step and one token per suffix of each later
step, the lm head on the scored positions only; the embedding is a lookup; attention over the
cache is not counted). With the double buffer reading and computing overlap, so a
worker takes about the larger of the two. The throughput constants are rough defaults, to be
replaced by calibration. A pipeline stage reads 1/n of each pass and computes 1/n of every token's
layers, all stages at once: the job's read and compute split n ways (the fill and drain of each
step, and the channel copies, are not counted).

parallel auto: one device is data. Otherwise both are planned; when data mode's slowest worker is
predicted to spend longer reading weights than computing (few prompts, slow disk: every worker
streams the whole model), the stages' split reading wins and pipeline is chosen; when compute
dominates, data (it divides compute as well, without the hand-offs). The plan keeps both predictions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

from flexorch.orchestrator.hardware import Hardware, Node, format_bytes
from flexorch.contract.errors import UserError
from flexorch.contract.manifest import DECODER, EMBED, LM_HEAD, Manifest
from flexorch.contract.protocol import EngineSettings
from flexorch.contract.shards import owner, shard_bytes

MiB, GiB = 1 << 20, 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

# -- memory constants ----------------------------------------------------------------------------
# Allocator caching/fragmentation and whatever the estimate misses: keep 10% of each budget free.
SAFETY_FRACTION = 0.10
# The CUDA context (driver state, module images, cuBLAS workspace) lives outside torch's allocator:
# 300-500 MB depending on driver and GPU; take the high end.
CUDA_CONTEXT_BYTES = 500 * MiB
# RSS of a worker before any weight: Python + torch + transformers measured at ~350 MB on CPU
# (torch 2.x); the CUDA runtime and cuBLAS/cuDNN images add several hundred MB on a GPU worker.
WORKER_BASE_RAM = {"cpu": 512 * MiB, "cuda": 1 * GiB}
# The loader reads into one pinned staging buffer and waits for its copy before reusing it
# (workers/prefetch.py), so one stored shard of pinned RAM per CUDA worker.
STAGING_BUFFERS = 1
# Before the storage is chosen: round activations are counted nowhere (only the batch in flight).
NO_STORAGE = "none"
# Shard slots: the shard computing and the one prefetching (the double buffer).
RESIDENT_SHARDS = 2
# MLP intermediates alive at once: gate, up and their product (SwiGLU).
MLP_INTERMEDIATES = 3
# Hidden-sized tensors of one decoder forward: q, k, v, attention output, residual, normed input
# (k and v are smaller with grouped-query attention: counting them full is conservative).
HIDDEN_COPIES = 6
# Attention scores are softmaxed in float32 beside their compute-dtype copy.
SCORE_EXTRA_BYTES = 4
# The head holds float32 logits and their softmax for every scored position.
LOGIT_COPIES = 2
# Batches are sorted by length (engine.make_batches), so padding is small for similar prompts;
# 25% more tokens covers mixed lengths.
PADDING_ALLOWANCE = 1.25
# The disk store overwrites each batch's file in place (one copy); counting two leaves room for the
# file being rewritten, filesystem slack, and a crash-safe write-then-rename store later.
DISK_COPIES = 2
# When the caller does not pass suffix counts: the multiple-choice case flexorch targets (4 options).
DEFAULT_SUFFIXES_PER_PROMPT = 4
# Activation batches a pipeline channel holds before its sender blocks: one being received while the
# next is computed keeps the receiver busy; more would only add memory (the controller makes the
# channels with this capacity).
PIPELINE_CHANNEL_BATCHES = 2
# Auto layers_per_shard of a pipeline leaves each stage at least this many decoder groups: shards
# are dealt out in turn, so with few big shards one stage would read most of the model (2 stages,
# all layers in one shard: stage 1 reads every decoder layer); with 4 each, stages' reads differ by
# at most a group and an edge.
PIPELINE_GROUPS_PER_STAGE = 4
# Bytes kept per suffix and step by suffix_logprob: logprob float64, is_greedy bool, n_tokens int64.
LOGPROB_RESULT_BYTES = 17

# -- batch and round constants -------------------------------------------------------------------
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

# -- throughput constants (rough defaults; calibration will replace them) -------------------------
# A typical NVMe SSD's sequential read (SATA SSDs do ~0.5 GB/s, fast PCIe 4 NVMe 5-7 GB/s);
# Hardware.disk_read_bytes_per_s overrides it when measured.
DEFAULT_DISK_READ_BYTES_PER_S = 2e9
# Usable bytes/s per PCIe lane by generation, after protocol overhead (~80% of the raw rate).
PCIE_LANE_BYTES_PER_S = {1: 0.2e9, 2: 0.4e9, 3: 0.79e9, 4: 1.58e9, 5: 3.15e9}
DEFAULT_PCIE = (3, 16)  # links NVML cannot describe: a common gen3 x16 slot
# fp32 GEMM per core, sustained through whole decoder layers: measured 93 GFLOP/s per core on a
# 2.8 GHz AVX-512 Xeon (16 x 1024 Llama, batch 1024); AVX2-only cores reach about half. 80 errs
# slightly slow on the first and leaves the second within ~2x.
CPU_FLOPS_PER_CORE = 80e9
# Most CPUs have no native half-precision matmul (no AMX/AVX512-FP16) and upcast: about 2x slower.
CPU_HALF_SLOWDOWN = 2.0
# Sustained fp16/bf16 dense matmul FLOP/s, about 60% of the datasheet tensor peak. First match of a
# substring of the NVML name wins, so longer names come before their prefixes ("A100" before "A10").
GPU_HALF_FLOPS = (
    ("H200", 600e12), ("H100", 500e12), ("A100", 180e12), ("L40S", 200e12), ("L40", 110e12),
    ("A10", 75e12), ("L4", 70e12), ("4090", 100e12), ("3090", 45e12), ("V100", 70e12), ("T4", 35e12),
)
# An unknown card: assume a modest consumer GPU so predictions err on the slow side.
DEFAULT_GPU_HALF_FLOPS = 20e12
# fp32 runs on CUDA cores, not tensor cores (torch leaves TF32 matmul off): 2x-15x slower across
# cards; 8x is the middle.
GPU_FP32_SLOWDOWN = 8.0


# -- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerPlan:
    name: str  # "worker0", ...
    device: str  # "cpu" | "cuda:N"
    settings: EngineSettings
    prompt_indices: tuple[int, ...]  # this worker's contiguous slice of the job's prompts
    rounds: tuple[tuple[int, ...], ...]  # consecutive groups of prompt_indices: one engine call each
    predicted_peak_device_memory: int  # bytes; 0 on CPU
    predicted_peak_ram: int  # bytes
    predicted_read_seconds: float
    predicted_compute_seconds: float
    reasons: tuple[str, ...]
    node: str = ""  # executor ray: its node ("node1"; `device` is then "node1:cuda:0"); "": this machine

    @property
    def predicted_seconds(self) -> float:
        """Reading and computing overlap (double buffer): the slower one sets the pace."""
        return max(self.predicted_read_seconds, self.predicted_compute_seconds)


@dataclass(frozen=True)
class ModePrediction:
    """One parallel mode's predicted time: its slowest worker's reading and computing."""

    parallel: str  # "data" | "pipeline"
    workers: int
    read_seconds: float
    compute_seconds: float

    @property
    def seconds(self) -> float:
        return max(self.read_seconds, self.compute_seconds)

    def describe(self) -> str:
        what = "stages" if self.parallel == "pipeline" else "workers"
        return (f"{self.parallel} ({self.workers} {what}): {_seconds(self.seconds)} ({_seconds(self.read_seconds)} "
                f"reading weights, {_seconds(self.compute_seconds)} computing per worker)")


@dataclass(frozen=True)
class Plan:
    parallel: str  # "data" | "pipeline" (every worker is a stage, in ring order)
    dtype: str  # compute dtype of every worker
    workers: tuple[WorkerPlan, ...]
    reasons: tuple[str, ...]
    predictions: tuple[ModePrediction, ...] = ()  # the modes considered (both under parallel: auto)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        workers = tuple(
            WorkerPlan(**{
                **w,
                "settings": EngineSettings(**w["settings"]),
                "prompt_indices": tuple(w["prompt_indices"]),
                "rounds": tuple(tuple(r) for r in w["rounds"]),
                "reasons": tuple(w["reasons"]),
            })
            for w in data["workers"]
        )
        predictions = tuple(ModePrediction(**p) for p in data.get("predictions", ()))
        return cls(parallel=data["parallel"], dtype=data["dtype"], workers=workers, reasons=tuple(data["reasons"]),
                   predictions=predictions)


# -- internal descriptions -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Model:
    """What the planner needs of a manifest, weights in bytes of the compute dtype."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    dtype_bytes: int  # compute dtype
    kv_bytes: int  # keys + values of one token in one decoder layer, compute dtype (the KV cache)
    layer: int  # largest decoder layer, compute dtype
    edge: int  # larger of the embedding shard and the norm + head shard, compute dtype
    stored_layer: int  # the same two, as stored in the files (what the slots and staging hold)
    stored_edge: int
    converted: bool  # compute dtype differs from the checkpoint's: the loader makes a converted copy
    bytes_per_pass: int  # bytes read by one pass over the model
    stored_shards: tuple[int, ...]  # as stored: the embedding, each decoder layer, norm + head (plan_shards)
    decoder_params: int
    head_params: int

    def stage_bytes(self, lps: int, stages: int) -> int:
        """Bytes per pass read by the busiest pipeline stage (shard s on stage s % stages)."""
        edge_in, *decoders, edge_out = self.stored_shards
        shards = shard_bytes(edge_in, decoders, edge_out, lps)
        return max(sum(b for s, b in enumerate(shards) if owner(s, stages) == stage) for stage in range(stages))

    def shard(self, lps: int) -> int:
        return max(self.edge, lps * self.layer)

    def stored_shard(self, lps: int) -> int:
        return max(self.stored_edge, lps * self.stored_layer)

    def resident_weights(self, lps: int) -> int:
        """Device bytes of the double-buffered shards (plus their converted copies)."""
        return RESIDENT_SHARDS * (self.stored_shard(lps) + (self.shard(lps) if self.converted else 0))


@dataclass(slots=True)  # not frozen: built ~10^6 times on big jobs, and frozen init is 3x slower; never mutated
class _Load:
    """Additive cost of some prompts (one prompt, a round, a slice)."""

    act_tokens: float = 0.0  # padded tokens waiting between shards (the first step's: the most)
    result_bytes: int = 0  # scores held in RAM until the round is committed
    flops: float = 0.0  # all generation steps
    cache_tokens: float = 0.0  # padded tokens whose keys and values the KV cache keeps (per layer)

    def __add__(self, other: "_Load") -> "_Load":
        return _Load(self.act_tokens + other.act_tokens, self.result_bytes + other.result_bytes,
                     self.flops + other.flops, self.cache_tokens + other.cache_tokens)


@dataclass(frozen=True)
class _Job:
    """The job-wide facts the per-worker decisions read."""

    spec: object  # the JobSpec (only read)
    model: _Model
    dtype: str
    tokens: tuple[int, ...]  # packed tokens per prompt, first step
    lengths: tuple[int, ...]  # the forward's row length per prompt: the first step's (later ones: the KV cache)
    loads: tuple[_Load, ...]
    scored_ratio: float  # max over prompts of scored positions / tokens (head working memory)
    read_rate: float  # disk bytes/s


@dataclass(frozen=True)
class _Setup:
    device: str
    lps: int
    batch: int
    storage: str


@dataclass(frozen=True)
class _Budget:
    device: int | None  # bytes; None on CPU
    ram: int
    disk: int


@dataclass(slots=True)  # as _Load: many, never mutated
class _Peaks:
    device: int
    ram: int
    disk: int


# -- make_plan -----------------------------------------------------------------------------------
def make_plan(hardware: Hardware, manifest: Manifest, spec, prompt_tokens: Sequence[int], *,
              suffix_counts: Sequence[int] | None = None) -> Plan:
    """Decide everything about running `spec` on `hardware`. `prompt_tokens[i]`: prompt i's packed
    tokens (prefix + all suffixes); `suffix_counts[i]`: its number of suffixes (sizes the scores and
    the tokens added per generation step; default DEFAULT_SUFFIXES_PER_PROMPT)."""
    reasons: list[str] = []
    if not prompt_tokens:
        raise _error(spec, "prompts", "no prompts to score")
    dtype = _resolve_dtype(spec, manifest, reasons)
    if manifest.compression:
        reasons.append(f"weights {manifest.compression} (flexorch prepare --compress): decoder projections "
                       f"dequantised per shard into {dtype}; scores are approximate")
    job = _describe_job(hardware, manifest, spec, dtype, prompt_tokens, suffix_counts)
    devices = _resolve_devices(spec, hardware, reasons)
    if spec.parallel != "data" and len(devices) == 1:
        reasons.append(f"parallel data ({'auto' if spec.parallel == 'auto' else 'from pipeline'}): one device, "
                       "and a one-stage pipeline is data mode")
    if spec.parallel == "data" or len(devices) == 1:
        data_reasons, data = _plan_data(job, hardware, devices)
        return Plan("data", dtype, data, tuple(reasons + data_reasons), (_prediction("data", data),))
    pipeline = _plan_pipeline(job, hardware, devices)
    if spec.parallel == "pipeline":
        reasons.append(f"parallel pipeline (from the job): {len(devices)} stages, shard s on stage s % "
                       f"{len(devices)}, each reading only its shards")
        return Plan("pipeline", dtype, pipeline, tuple(reasons), (_prediction("pipeline", pipeline),))
    data_reasons, data = _plan_data(job, hardware, devices)
    predictions = (_prediction("data", data), _prediction("pipeline", pipeline))
    parallel, why = _choose_parallel(*predictions)
    reasons.append(f"parallel {parallel} (auto): {why}")
    if parallel == "data":
        return Plan("data", dtype, data, tuple(reasons + data_reasons), predictions)
    return Plan("pipeline", dtype, pipeline, tuple(reasons), predictions)


def make_cluster_plan(nodes: Sequence[Node], manifest: Manifest, spec, prompt_tokens: Sequence[int], *,
                      suffix_counts: Sequence[int] | None = None) -> Plan:
    """make_plan for a Ray cluster (executor: ray): data mode over devices of several machines,
    named "node1:cuda:0". Each worker is sized by its own node's hardware; the workers of one node
    share its RAM, disk and cores. Pipeline mode is refused by the spec (docs/design.md says why)."""
    reasons: list[str] = [_describe_nodes(nodes)]
    if not prompt_tokens:
        raise _error(spec, "prompts", "no prompts to score")
    dtype = _resolve_dtype(spec, manifest, reasons)
    if spec.parallel == "pipeline":  # load_job refuses it; a spec built another way is refused here too
        raise _error(spec, "parallel", "pipeline is refused with executor: ray (see README, Several machines)")
    if spec.parallel == "auto":
        reasons.append("parallel data (auto): executor ray runs data mode only (pipeline stages would hand "
                       "activations on over the network at every shard)")
    job = _describe_job(nodes[0].hardware, manifest, spec, dtype, prompt_tokens, suffix_counts)
    seats = _resolve_cluster_devices(spec, nodes, reasons)
    if len(seats) > len(job.tokens):
        reasons.append(f"{len(seats) - len(job.tokens)} device(s) left idle: only {len(job.tokens)} prompt(s)")
        seats = seats[:len(job.tokens)]
    threads = _cluster_threads(seats)
    rates = [_flops_rate(device, node.hardware, dtype, threads[i]) for i, (node, device) in enumerate(seats)]
    slices = _balanced_slices(job.tokens, rates)
    if len(seats) > 1:
        reasons.append(f"prompts split into {len(seats)} contiguous slices balanced by tokens, weighted by "
                       "each device's predicted throughput")
    workers = []
    for i, ((node, device), indices) in enumerate(zip(seats, slices)):
        hw, sharing = node.hardware, sum(n is node for n, _ in seats)
        budget = _Budget(_gpu_budget(hw, device, spec), _usable(_cap(hw.ram_available, spec.limits.ram)) // sharing,
                         _usable(hw.disk_free) // sharing)
        on_node = replace(job, read_rate=hw.disk_read_bytes_per_s or DEFAULT_DISK_READ_BYTES_PER_S)
        plan = _plan_worker(on_node, hw, f"worker{i}", device, indices, threads[i], rates[i], budget)
        workers.append(replace(plan, device=f"{node.name}:{device}", node=node.name))
    return Plan("data", dtype, tuple(workers), tuple(reasons), (_prediction("data", workers),))


def _describe_nodes(nodes: Sequence[Node]) -> str:
    listed = "; ".join(f"{n.name} {n.address} ({len(n.hardware.gpus)} GPU, {n.hardware.cpu_count} cores, "
                       f"{format_bytes(n.hardware.ram_available)} RAM)" for n in nodes)
    return f"Ray cluster of {len(nodes)} node(s): {listed}"


def _resolve_cluster_devices(spec, nodes: Sequence[Node], reasons: list[str]) -> list[tuple[Node, str]]:
    """(node, device as its worker sees it) per worker, in the order of the job's devices."""
    if spec.devices == "auto":
        seats = [(n, f"cuda:{gpu.index}") for n in nodes for gpu in n.hardware.gpus]
        why = "every GPU of the cluster"
        if not seats:
            seats, why = [(n, "cpu") for n in nodes], "no GPU in the cluster: one CPU worker per node"
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
        if device != "cpu" and device not in present:
            raise _error(spec, "devices", f"{entry} not present ({name}'s GPUs Ray may use: "
                                          f"{', '.join(present) or 'none'})")
        seats.append((node, device))
    return seats


def _cluster_threads(seats: Sequence[tuple[Node, str]]) -> list[int]:
    """_threads per node: each node's cores are split between its own CPU workers."""
    threads = [0] * len(seats)
    for node in {id(n): n for n, _ in seats}.values():
        mine = [i for i, (n, _) in enumerate(seats) if n is node]
        for i, t in zip(mine, _threads([seats[i][1] for i in mine], node.hardware.cpu_count)):
            threads[i] = t
    return threads


def _plan_data(job: _Job, hardware: Hardware, devices: tuple[str, ...]) -> tuple[list[str], tuple[WorkerPlan, ...]]:
    """Data mode: each device streams the whole model over its contiguous slice of the prompts."""
    reasons: list[str] = []
    n_prompts = len(job.tokens)
    if len(devices) > n_prompts:
        reasons.append(f"{len(devices) - n_prompts} device(s) left idle: only {n_prompts} prompt(s)")
        devices = devices[:n_prompts]
    threads = _threads(devices, hardware.cpu_count)
    rates = [_flops_rate(device, hardware, job.dtype, threads[i]) for i, device in enumerate(devices)]
    slices = _balanced_slices(job.tokens, rates)
    if len(devices) > 1:
        reasons.append(f"prompts split into {len(devices)} contiguous slices balanced by tokens, weighted by "
                       "each device's predicted throughput")
    ram_share = _usable(_cap(hardware.ram_available, job.spec.limits.ram)) // len(devices)
    disk_share = _usable(hardware.disk_free) // len(devices)
    workers = tuple(
        _plan_worker(job, hardware, f"worker{i}", device, indices, threads[i], rates[i],
                     _Budget(_gpu_budget(hardware, device, job.spec), ram_share, disk_share))
        for i, (device, indices) in enumerate(zip(devices, slices))
    )
    return reasons, workers


def _plan_pipeline(job: _Job, hardware: Hardware, devices: tuple[str, ...]) -> tuple[WorkerPlan, ...]:
    """Pipeline: every device a stage over all prompts, with the same shards, batches and rounds
    (so every stage builds the same batches); planned once for the tightest budget and the slowest
    device, then placed on each."""
    spec, n = job.spec, len(devices)
    kinds = {_kind(d) for d in devices}
    if len(kinds) > 1:
        raise _error(spec, "devices", f"parallel: pipeline needs devices of one kind, got {', '.join(devices)}")
    if spec.storage not in (None, "cpu"):
        raise _error(spec, "storage", f"{spec.storage} is not supported with parallel: pipeline (activations "
                     "arrive from the previous stage and wait in RAM: use cpu or auto)")
    threads = _threads(devices, hardware.cpu_count)
    rates = [_flops_rate(d, hardware, job.dtype, threads[i]) for i, d in enumerate(devices)]
    slowest = min(range(n), key=lambda i: rates[i])
    m, kind = job.model, kinds.pop()
    reserve = PIPELINE_CHANNEL_BATCHES * BATCH_TOKENS_CAP[kind] * m.hidden * m.dtype_bytes
    gpu_budgets = [_gpu_budget(hardware, d, spec) for d in devices]
    budget = _Budget(None if kind == "cpu" else min(gpu_budgets),
                     _usable(_cap(hardware.ram_available, spec.limits.ram)) // n - reserve,
                     _usable(hardware.disk_free) // n)
    plan = _plan_worker(job, hardware, "worker0", devices[slowest], tuple(range(len(job.tokens))),
                        threads[slowest], rates[slowest], budget, stages=n)
    channel = PIPELINE_CHANNEL_BATCHES * plan.settings.batch_tokens * m.hidden * m.dtype_bytes
    # Rounds were sized at 1/n of a pass; the busiest stage reads a little more (an edge, uneven groups).
    busiest = m.stage_bytes(plan.settings.layers_per_shard, n)
    read = (len(plan.rounds) * spec.generate_tokens * busiest / _read_rate(job, hardware, devices[slowest]))
    plan = replace(plan, predicted_read_seconds=read)
    in_channel = f"up to {PIPELINE_CHANNEL_BATCHES} batches ({format_bytes(channel)}) wait in its outbound channel"
    return tuple(
        replace(plan, name=f"worker{i}", device=d, predicted_peak_ram=plan.predicted_peak_ram + channel,
                settings=replace(plan.settings, device=d, threads=threads[i] if kind == "cpu" else 0),
                reasons=plan.reasons + (f"stage {i} of {n}: owns shards s with s % {n} == {i}; {in_channel}",))
        for i, d in enumerate(devices)
    )


def _prediction(parallel: str, workers: Sequence[WorkerPlan]) -> ModePrediction:
    slowest = max(workers, key=lambda w: w.predicted_seconds)
    return ModePrediction(parallel, len(workers), slowest.predicted_read_seconds, slowest.predicted_compute_seconds)


def _choose_parallel(data: ModePrediction, pipeline: ModePrediction) -> tuple[str, str]:
    """Pipeline when data mode would wait on weight reading (see the module docstring)."""
    both = f"predicted {data.describe()}; {pipeline.describe()}"
    if data.read_seconds > data.compute_seconds:
        return "pipeline", (f"reading weights dominates data mode (every worker streams the whole model), and "
                            f"pipeline stages read 1/{pipeline.workers} each: {both}")
    return "data", f"computing dominates, and data mode splits it without hand-offs between stages: {both}"


def _plan_worker(job: _Job, hardware: Hardware, name: str, device: str, indices: tuple[int, ...],
                 threads: int, rate: float, budget: _Budget, stages: int = 1) -> WorkerPlan:
    """Per worker, in order: batch_tokens, storage and rounds (at the smallest shard), then
    layers_per_shard grows into what is left. `stages` > 1: one stage of a pipeline, which reads
    and computes 1/stages of every pass over `indices`."""
    spec, reasons = job.spec, []
    kind = _kind(device)
    storages = ("cpu",) if stages > 1 else _storages(spec, device)
    floor = _lps_floor(job, reasons)
    longest_index = max(indices, key=lambda i: (job.lengths[i], -i))
    _check_minimum(job, device, floor, longest_index, budget)
    batch = _choose_batch(job, device, indices, floor, longest_index, budget, reasons)
    read_per_round = job.model.bytes_per_pass * spec.generate_tokens / _read_rate(job, hardware, device) / stages
    rate = rate * stages  # FLOPs of the job per second: each stage computes 1/stages of them
    min_flops = ROUND_MIN_COMPUTE_OVER_READ * read_per_round * rate
    target_flops = max(ROUND_TARGET_SECONDS * rate, min_flops)
    storage, rounds = _choose_storage(job, _Setup(device, floor, batch, NO_STORAGE), indices, storages, budget,
                                      min_flops, target_flops, reasons, pipeline=stages > 1)
    most = max(floor, job.model.num_layers // (PIPELINE_GROUPS_PER_STAGE * stages)) if stages > 1 else None
    lps = _choose_lps(job, _Setup(device, floor, batch, storage), rounds, budget, reasons, most)
    setup = _Setup(device, lps, batch, storage)
    peaks = _max_peaks(job, setup, rounds)
    if kind == "cpu":
        reasons.append(f"threads {threads}: the machine's {hardware.cpu_count} cores split between its CPU workers")
    settings = EngineSettings(
        device=device, dtype=job.dtype, layers_per_shard=lps, storage=storage, batch_tokens=batch,
        disk_folder=_disk_folder(spec, name) if storage == "disk" else None,
        threads=threads if kind == "cpu" else 0,
    )
    slice_load = sum((job.loads[i] for i in indices), _Load())
    return WorkerPlan(
        name=name, device=device, settings=settings, prompt_indices=indices, rounds=rounds,
        predicted_peak_device_memory=peaks.device, predicted_peak_ram=peaks.ram,
        predicted_read_seconds=len(rounds) * read_per_round,
        predicted_compute_seconds=slice_load.flops / rate, reasons=tuple(reasons),
    )


# -- job-wide resolutions ------------------------------------------------------------------------
def _resolve_dtype(spec, manifest: Manifest, reasons: list[str]) -> str:
    if spec.dtype is not None:
        reasons.append(f"dtype {spec.dtype} (from the job; the checkpoint is {manifest.dtype})")
        return spec.dtype
    if manifest.dtype in ("float32", "float16", "bfloat16"):
        reasons.append(f"dtype {manifest.dtype} (auto): the checkpoint's, so scores match the model as published")
        return manifest.dtype
    reasons.append(f"dtype float32 (auto): the checkpoint's {manifest.dtype} is not a compute dtype")
    return "float32"


def _resolve_devices(spec, hardware: Hardware, reasons: list[str]) -> tuple[str, ...]:
    present = [f"cuda:{gpu.index}" for gpu in hardware.gpus]
    if spec.devices == "auto":
        devices = tuple(present) or ("cpu",)
        why = "every visible GPU" if present else "no GPU visible"
        reasons.append(f"devices {', '.join(devices)} (auto): {why}")
    else:
        devices = tuple(spec.devices)
        missing = [d for d in devices if d != "cpu" and d not in present]
        if missing:
            seen = ", ".join(present) or "none"
            raise _error(spec, "devices", f"{', '.join(missing)} not present (visible GPUs: {seen})")
    return devices


def _describe_job(hardware: Hardware, manifest: Manifest, spec, dtype: str, prompt_tokens: Sequence[int],
                  suffix_counts: Sequence[int] | None) -> _Job:
    model = _describe_model(manifest, dtype)
    suffixes = [min(n, DEFAULT_SUFFIXES_PER_PROMPT) for n in prompt_tokens] if suffix_counts is None else suffix_counts
    tokens = tuple(int(n) for n in prompt_tokens)
    lengths = tokens  # the KV cache keeps later steps to one token per suffix: rows never grow
    scored = [n if spec.score.kind == "suffix_logprob" else s for n, s in zip(tokens, suffixes)]
    loads = tuple(_prompt_load(model, spec, n, s, c) for n, s, c in zip(tokens, suffixes, scored))
    return _Job(
        spec=spec, model=model, dtype=dtype, tokens=tokens, lengths=lengths, loads=loads,
        scored_ratio=max(c / max(n, 1) for n, c in zip(tokens, scored)),
        read_rate=hardware.disk_read_bytes_per_s or DEFAULT_DISK_READ_BYTES_PER_S,
    )


def _describe_model(manifest: Manifest, dtype: str) -> _Model:
    stored_dtype = DTYPE_BYTES.get(manifest.dtype, DTYPE_BYTES[dtype])
    scale = DTYPE_BYTES[dtype] / stored_dtype
    by_kind = {kind: [e for e in manifest.layers if e.kind == kind] for kind in (EMBED, DECODER)}
    tail = [e for e in manifest.layers if e.kind not in (EMBED, DECODER)]  # norm + lm head: one shard
    stored_layer = max(manifest.stored_bytes(e) for e in by_kind[DECODER])
    stored_edge = max(sum(manifest.stored_bytes(e) for e in by_kind[EMBED]),
                      sum(manifest.stored_bytes(e) for e in tail))
    heads = [manifest.entry(e.tied_to) if e.tied_to else e for e in manifest.layers if e.kind == LM_HEAD]
    config = manifest.config
    # 64 is the smallest common head dim, so hidden // 64 heads overestimates the scores.
    attention_heads = int(config.get("num_attention_heads") or max(1, manifest.hidden_size // 64))
    head_dim = int(config.get("head_dim") or manifest.hidden_size // attention_heads)
    kv_heads = int(config.get("num_key_value_heads") or attention_heads)
    return _Model(
        num_layers=manifest.num_layers, hidden=manifest.hidden_size,
        # GPT-style MLPs are 4x hidden; a config without the key is assumed to be one.
        intermediate=int(config.get("intermediate_size") or 4 * manifest.hidden_size),
        heads=attention_heads, vocab=manifest.vocab_size, dtype_bytes=DTYPE_BYTES[dtype],
        kv_bytes=2 * kv_heads * head_dim * DTYPE_BYTES[dtype],
        # compressed decoder layers are dequantised per shard: a full copy in the compute dtype
        layer=(max(e.params for e in by_kind[DECODER]) * DTYPE_BYTES[dtype] if manifest.compression
               else math.ceil(stored_layer * scale)),
        edge=math.ceil(stored_edge * scale),
        stored_layer=stored_layer, stored_edge=stored_edge,
        converted=manifest.dtype != dtype or manifest.compression is not None,
        bytes_per_pass=sum(manifest.stored_bytes(e) for e in manifest.layers),
        stored_shards=(sum(manifest.stored_bytes(e) for e in by_kind[EMBED]),
                       *(manifest.stored_bytes(e) for e in by_kind[DECODER]),
                       sum(manifest.stored_bytes(e) for e in tail)),
        decoder_params=sum(e.params for e in by_kind[DECODER]), head_params=sum(e.params for e in heads),
    )


def _prompt_load(model: _Model, spec, tokens: int, suffixes: int, scored: int) -> _Load:
    steps = spec.generate_tokens
    step_tokens = [tokens] + [suffixes] * (steps - 1)  # later steps: the newest token of each suffix
    flops = sum(2.0 * (model.decoder_params * n + model.head_params * scored) for n in step_tokens)
    cached = tokens + (steps - 2) * suffixes if steps > 1 else 0  # the last step's keys are never kept
    return _Load(act_tokens=tokens * PADDING_ALLOWANCE, result_bytes=_result_bytes(model, spec, suffixes),
                 flops=flops, cache_tokens=cached * PADDING_ALLOWANCE)


def _result_bytes(model: _Model, spec, suffixes: int) -> int:
    kind, steps = spec.score.kind, spec.generate_tokens
    if kind == "suffix_logprob":
        return suffixes * LOGPROB_RESULT_BYTES
    per_step = model.vocab if kind == "next_token_probs" else len(spec.score.tokens)
    return suffixes * steps * per_step * 4  # float32


# -- devices, budgets, throughput ----------------------------------------------------------------
def _kind(device: str) -> str:
    return "cpu" if device == "cpu" else "cuda"


def _gpu(hardware: Hardware, device: str):
    return next(gpu for gpu in hardware.gpus if f"cuda:{gpu.index}" == device)


def _gpu_budget(hardware: Hardware, device: str, spec) -> int | None:
    if device == "cpu":
        return None
    return _usable(_cap(_gpu(hardware, device).free_memory, spec.limits.gpu_memory))


def _cap(available: int, limit: int | None) -> int:
    return available if limit is None else min(available, limit)


def _usable(budget: int) -> int:
    return int(budget * (1 - SAFETY_FRACTION))


def _threads(devices: Sequence[str], cpu_count: int) -> list[int]:
    """CPU workers share the cores evenly; each GPU worker keeps one core busy (Python driving the
    GPU and the loader thread), so those are not handed out."""
    n_cpu = sum(d == "cpu" for d in devices)
    share = max(1, (cpu_count - (len(devices) - n_cpu)) // max(n_cpu, 1))
    return [share if d == "cpu" else 0 for d in devices]


def _flops_rate(device: str, hardware: Hardware, dtype: str, threads: int) -> float:
    if device == "cpu":
        return threads * CPU_FLOPS_PER_CORE / (1.0 if dtype == "float32" else CPU_HALF_SLOWDOWN)
    name = _gpu(hardware, device).name
    half = next((flops for key, flops in GPU_HALF_FLOPS if key in name), DEFAULT_GPU_HALF_FLOPS)
    return half / GPU_FP32_SLOWDOWN if dtype == "float32" else half


def _read_rate(job: _Job, hardware: Hardware, device: str) -> float:
    """Weights come from the disk, then on a GPU over its PCIe link: the slower one sets the rate."""
    if device == "cpu":
        return job.read_rate
    gpu = _gpu(hardware, device)
    gen, width = (gpu.pcie_gen, gpu.pcie_width) if gpu.pcie_gen and gpu.pcie_width else DEFAULT_PCIE
    pcie = PCIE_LANE_BYTES_PER_S.get(gen, PCIE_LANE_BYTES_PER_S[max(PCIE_LANE_BYTES_PER_S)]) * width
    return min(job.read_rate, pcie)


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


# -- memory --------------------------------------------------------------------------------------
def _working_bytes(model: _Model, batch: int, longest: int, scored_ratio: float) -> int:
    """Peak temporaries of one forward of `batch` padded tokens in rows of at most `longest`."""
    d, row = model.dtype_bytes, min(longest, batch)
    decoder = ((MLP_INTERMEDIATES * model.intermediate + HIDDEN_COPIES * model.hidden) * batch * d
               + batch * row * model.heads * (d + SCORE_EXTRA_BYTES)  # attention scores
               + batch * row * d)  # 4D additive mask
    scored = min(batch, math.ceil(batch * scored_ratio))
    head = LOGIT_COPIES * scored * model.vocab * 4
    return max(decoder, head)


def _peaks(job: _Job, setup: _Setup, load: _Load, longest: int) -> _Peaks:
    """Peak device memory, RAM and disk of a worker running a round costing `load` whose longest
    row is `longest` tokens."""
    m, cuda = job.model, setup.device != "cpu"
    per_token = m.hidden * m.dtype_bytes
    kv_per_token = m.num_layers * m.kv_bytes if load.cache_tokens else 0  # no cache: one step
    activations = math.ceil(load.act_tokens * per_token)
    cache = math.ceil(load.cache_tokens * kv_per_token)
    in_flight = 2 * setup.batch * per_token + (2 * setup.batch * m.kv_bytes if cache else 0)
    cache_read_ahead = setup.lps * setup.batch * m.kv_bytes if cache else 0  # disk: the next batch's
    compute = (m.resident_weights(setup.lps) + in_flight
               + (_working_bytes(m, setup.batch, longest, job.scored_ratio) if setup.batch else 0))
    ram = WORKER_BASE_RAM[_kind(setup.device)] + load.result_bytes
    ram += STAGING_BUFFERS * m.stored_shard(setup.lps) if cuda else compute
    ram += (activations + cache if setup.storage == "cpu"
            else in_flight + cache_read_ahead if setup.storage == "disk" else 0)
    device = CUDA_CONTEXT_BYTES + compute + (activations + cache if setup.storage == "gpu" else 0) if cuda else 0
    disk = DISK_COPIES * activations + cache if setup.storage == "disk" else 0
    return _Peaks(device=device, ram=ram, disk=disk)


def _fits(peaks: _Peaks, budget: _Budget) -> bool:
    return ((budget.device is None or peaks.device <= budget.device)
            and peaks.ram <= budget.ram and peaks.disk <= budget.disk)


def _round_longest(job: _Job, indices: Sequence[int]) -> int:
    return max(job.lengths[i] for i in indices)


def _max_peaks(job: _Job, setup: _Setup, rounds: Sequence[Sequence[int]]) -> _Peaks:
    all_peaks = [_peaks(job, setup, sum((job.loads[i] for i in r), _Load()), _round_longest(job, r))
                 for r in rounds]
    return _Peaks(*(max(getattr(p, f) for p in all_peaks) for f in ("device", "ram", "disk")))


def _shortfall(peaks: _Peaks, budget: _Budget, device: str) -> str:
    """The resources `peaks` overflows: 'needs X of RAM (budget Y)'."""
    margin = f"after the {SAFETY_FRACTION:.0%} margin"
    parts = []
    if budget.device is not None and peaks.device > budget.device:
        parts.append(f"{format_bytes(peaks.device)} of {device} memory (budget {format_bytes(budget.device)} {margin})")
    if peaks.ram > budget.ram:
        parts.append(f"{format_bytes(peaks.ram)} of RAM (this worker's share {format_bytes(budget.ram)} {margin})")
    if peaks.disk > budget.disk:
        parts.append(f"{format_bytes(peaks.disk)} of disk (this worker's share {format_bytes(budget.disk)} {margin})")
    return "needs " + " and ".join(parts) if parts else "fits"


# -- per-worker decisions ------------------------------------------------------------------------
def _storages(spec, device: str) -> tuple[str, ...]:
    """Storages to try, best first: on the device, then RAM, then disk."""
    if spec.storage == "gpu" and device == "cpu":
        raise _error(spec, "storage", "gpu needs a GPU device, but this worker runs on cpu")
    if spec.storage is not None:
        return (spec.storage,)
    return ("cpu", "disk") if device == "cpu" else ("gpu", "cpu", "disk")


def _lps_floor(job: _Job, reasons: list[str]) -> int:
    requested = job.spec.layers_per_shard
    if requested is None:
        return 1
    if requested > job.model.num_layers:
        reasons.append(f"layers_per_shard {requested} capped at the model's {job.model.num_layers} decoder layers")
        return job.model.num_layers
    return requested


def _check_minimum(job: _Job, device: str, lps: int, longest_index: int, budget: _Budget) -> None:
    """The smallest step this worker must take: its shards double-buffered and its longest prompt
    as one forward (activations between shards not counted yet: the storage comes later)."""
    longest = job.lengths[longest_index]
    load = job.loads[longest_index]

    def peaks_at(n: int, batch: int) -> _Peaks:
        return _peaks(job, _Setup(device, n, batch, NO_STORAGE), load if batch else _Load(), longest)

    peaks = peaks_at(lps, longest)
    if _fits(peaks, budget):
        return
    weights_only = peaks_at(1, 0)
    if not _fits(weights_only, budget):
        raise _error(job.spec, "model", f"does not fit on {device} even one layer at a time: two shards of "
                     f"{format_bytes(job.model.shard(1))} (the double buffer; the largest of embedding, one decoder "
                     f"layer, norm + head) {_shortfall(weights_only, budget, device)}; raise the limits or use a "
                     "device with more memory")
    if lps > 1 and _fits(peaks_at(1, longest), budget):
        at_most = _largest_fitting(range(1, lps), lambda n: _fits(peaks_at(n, longest), budget))
        raise _error(job.spec, "layers_per_shard", f"{lps} does not fit on {device}: "
                     f"{_shortfall(peaks, budget, device)}; at most {at_most} fit(s) beside prompt {longest_index}'s "
                     "forward")
    raise _error(job.spec, "prompts", f"prompt {longest_index} ({longest} tokens) is one forward pass and "
                 f"{_shortfall(peaks, budget, device)} on {device} with {lps} layer(s) per shard; shorten it or "
                 "raise the limits")


def _choose_batch(job: _Job, device: str, indices: tuple[int, ...], lps: int, longest_index: int,
                  budget: _Budget, reasons: list[str]) -> int:
    """Largest power of two <= the device's cap whose forward fits, but never below the longest
    prompt: a prompt is one row of one forward."""
    longest = job.lengths[longest_index]

    def fits(batch: int) -> bool:
        setup = _Setup(device, lps, batch, NO_STORAGE)
        return _fits(_peaks(job, setup, job.loads[longest_index], longest), budget)

    # A batch never holds more than the worker's whole slice, so neither does the memory estimate.
    slice_tokens = sum(job.lengths[i] for i in indices)
    cap = min(BATCH_TOKENS_CAP[_kind(device)], 1 << max(slice_tokens - 1, 0).bit_length())
    candidates = sorted({1 << k for k in range(cap.bit_length()) if longest <= 1 << k <= cap} | {longest},
                        reverse=True)
    best = next(b for b in candidates if fits(b))  # `longest` fits: _check_minimum passed
    requested = job.spec.batch_tokens
    if requested is None:
        reasons.append(f"batch_tokens {best} (auto): the largest power of two that fits, at most the slice's "
                       f"tokens and the {_kind(device)} cap of {BATCH_TOKENS_CAP[_kind(device)]} (larger batches add "
                       f"memory, not speed), at least the longest prompt ({longest} tokens, prompt {longest_index})")
        return best
    if requested < longest:
        raise _error(job.spec, "batch_tokens", f"{requested} is below prompt {longest_index}'s {longest} tokens "
                     "(a prompt is one forward pass)")
    if not fits(requested):
        device_cap = BATCH_TOKENS_CAP[_kind(device)]
        largest = _largest_fitting(range(longest, max(requested, device_cap) + 1), fits)
        raise _error(job.spec, "batch_tokens", f"{requested} does not fit on {device} with {lps} layer(s) per "
                     f"shard: at most {largest} fits")
    reasons.append(f"batch_tokens {requested} (from the job)")
    return requested


def _split_rounds(job: _Job, indices: Sequence[int], target_flops: float,
                  fits: Callable[[_Load, int], bool]) -> tuple[tuple[int, ...], ...] | None:
    """Consecutive rounds of about `target_flops` each that fit; None if one prompt alone does not."""
    rounds: list[tuple[int, ...]] = []
    current: list[int] = []
    load, longest = _Load(), 0
    for i in indices:
        grown, grown_longest = load + job.loads[i], max(longest, job.lengths[i])
        if current and (grown.flops > target_flops or not fits(grown, grown_longest)):
            rounds.append(tuple(current))
            current, grown, grown_longest = [], job.loads[i], job.lengths[i]
        if not current and not fits(grown, grown_longest):
            return None
        current.append(i)
        load, longest = grown, grown_longest
    rounds.append(tuple(current))
    return tuple(rounds)


def _choose_storage(job: _Job, setup: _Setup, indices: tuple[int, ...], storages: Sequence[str],
                    budget: _Budget, min_flops: float, target_flops: float, reasons: list[str],
                    pipeline: bool = False):
    """Where activations wait, and the rounds. Auto: the first of gpu, cpu, disk that holds the
    rounds the time target asks for; else the one giving the fewest rounds. A storage qualifies
    only if it holds rounds of at least `min_flops` (below that, re-reading the weights every
    round dominates). Returns (storage, rounds)."""
    def fits_in(storage: str) -> Callable[[_Load, int], bool]:
        at = _Setup(setup.device, setup.lps, setup.batch, storage)
        return lambda load, longest: _fits(_peaks(job, at, load, longest), budget)

    always = lambda load, longest: True  # noqa: E731
    by_time = _split_rounds(job, indices, target_flops, always)
    smallest = _split_rounds(job, indices, min_flops, always)
    viable = {s: _split_rounds(job, indices, target_flops, fits_in(s)) for s in storages
              if _holds(job, smallest, fits_in(s))}
    if not viable:
        raise _error(job.spec, "storage", _no_storage_message(job, setup, smallest, storages, budget))
    storage = next((s for s in viable if viable[s] == by_time), None)
    if storage is None:
        storage = min(viable, key=lambda s: len(viable[s]))  # ties: the first, dict order is best first
        why = f"no storage holds rounds of {ROUND_TARGET_SECONDS:.0f} s of compute; {storage} needs the fewest rounds"
    else:
        why = _STORAGE_WHY[storage if setup.device != "cpu" or storage == "disk" else "ram"]
    auto = job.spec.storage is None
    if pipeline:
        why = "pipeline: activations arrive from the previous stage and wait in RAM (a whole round at a slow stage)"
    reasons.append(f"storage {storage} (auto): {why}" if auto else f"storage {storage} (from the job)")
    reasons.append(_rounds_reason(viable[storage], by_time))
    return storage, viable[storage]


_STORAGE_WHY = {
    "gpu": "each round's activations fit on the device beside the shards",
    "cpu": "each round's activations do not fit on the device beside the shards but do in RAM",
    "disk": "each round's activations fit neither on the device nor in RAM",
    "ram": "activations stay in RAM beside the weights",
}


def _holds(job: _Job, rounds, fits: Callable[[_Load, int], bool]) -> bool:
    return all(fits(sum((job.loads[i] for i in r), _Load()), _round_longest(job, r)) for r in rounds)


def _no_storage_message(job: _Job, setup: _Setup, smallest, storages: Sequence[str], budget: _Budget) -> str:
    biggest = max(smallest, key=lambda r: sum(job.loads[i].act_tokens for i in r))
    load, longest = sum((job.loads[i] for i in biggest), _Load()), _round_longest(job, biggest)
    peaks = {s: _peaks(job, _Setup(setup.device, setup.lps, setup.batch, s), load, longest) for s in storages}
    needs = "; ".join(f"{s} {_shortfall(p, budget, setup.device)}" for s, p in peaks.items())
    what = f"{storages[0]} does not hold" if job.spec.storage else "no activation storage holds"
    return (f"{what} the smallest useful round on {setup.device} ({len(biggest)} prompt(s), compute >= "
            f"{ROUND_MIN_COMPUTE_OVER_READ:.0f}x the time to read the weights): {needs}; "
            "raise limits.ram, free disk space or set disk_folder elsewhere")


def _rounds_reason(rounds, by_time) -> str:
    if len(rounds) == 1:
        return "1 round: the whole slice (the resume unit)"
    sized_by = "memory" if rounds != by_time else (
        f"about {ROUND_TARGET_SECONDS:.0f} s of compute each, and at least {ROUND_MIN_COMPUTE_OVER_READ:.0f}x the "
        "time to read the weights")
    return f"{len(rounds)} rounds (the resume unit), sized by {sized_by}"


def _choose_lps(job: _Job, setup: _Setup, rounds, budget: _Budget, reasons: list[str],
                most: int | None = None) -> int:
    """As many decoder layers per shard as fit beside the chosen batch and rounds (at most `most`:
    a pipeline's stages each keep PIPELINE_GROUPS_PER_STAGE groups)."""
    if job.spec.layers_per_shard is not None:
        reasons.append(f"layers_per_shard {setup.lps} (from the job)")
        return setup.lps

    def fits(lps: int) -> bool:
        setup_n = _Setup(setup.device, lps, setup.batch, setup.storage)
        return _fits(_max_peaks(job, setup_n, rounds), budget)

    lps = _largest_fitting(range(setup.lps, (most or job.model.num_layers) + 1), fits) or setup.lps
    limit = "all decoder layers" if lps == job.model.num_layers else "as many as fit with the double buffer"
    if most is not None and lps == most:
        limit = f"the pipeline's stages keep {PIPELINE_GROUPS_PER_STAGE} decoder groups each"
    reasons.append(f"layers_per_shard {lps} (auto): {limit}")
    return lps


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


def _disk_folder(spec, name: str) -> str:
    base = spec.disk_folder if spec.disk_folder is not None else spec.job_dir / "activations"
    return str(base / name)


def _error(spec, key: str, message: str) -> UserError:
    where = f"{spec.path}: " if getattr(spec, "path", None) else ""
    return UserError(f"{where}{key}: {message}")


# -- rendering -----------------------------------------------------------------------------------
def _seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def render_plan(plan: Plan, console) -> None:
    """Print a table of the workers, then why each choice was made."""
    from rich import box
    from rich.table import Table

    # Short headers, no padding beyond the box's one-space dividers: the table fits 80 columns.
    stages = f" ({len(plan.workers)} stages)" if plan.parallel == "pipeline" else ""
    table = Table(title=f"Plan: parallel {plan.parallel}{stages}, dtype {plan.dtype}", box=box.SIMPLE_HEAD,
                  padding=0, show_edge=False,
                  caption="layers: decoder layers per shard; batch: tokens per forward; GPU, RAM: predicted "
                          "peaks; time: predicted (reading and computing overlap)")
    for column in ("worker", "device", "layers", "storage", "batch", "prompts", "rounds", "GPU", "RAM", "time"):
        table.add_column(column, no_wrap=True,
                         justify="left" if column in ("worker", "device", "storage") else "right")
    for w in plan.workers:
        s = w.settings
        table.add_row(
            w.name, w.device + (f"×{s.threads}" if s.threads else ""), str(s.layers_per_shard), s.storage,
            str(s.batch_tokens), str(len(w.prompt_indices)), str(len(w.rounds)),
            f"{w.predicted_peak_device_memory / 1e9:.1f} GB" if w.device != "cpu" else "-",
            f"{w.predicted_peak_ram / 1e9:.1f} GB", _seconds(w.predicted_seconds),
        )
    console.print(table)
    for prediction in plan.predictions:
        chosen = " (chosen)" if prediction.parallel == plan.parallel and len(plan.predictions) > 1 else ""
        console.print(f"- predicted {prediction.describe()}{chosen}")
    for reason in plan.reasons:
        console.print(f"- {reason}")
    for w in plan.workers:
        console.print(f"- {w.name}: predicted {_seconds(w.predicted_read_seconds)} reading weights, "
                      f"{_seconds(w.predicted_compute_seconds)} computing")
        for reason in w.reasons:
            console.print(f"- {w.name}: {reason}")
