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
  stored — or one, where only that fits or it costs little time (each read then waits for the
  compute before it: EngineSettings.double_buffer) — and, where the compute dtype differs from the checkpoint's, the converted copies of
  both (workers/prefetch.py). Resident (the whole model kept for the job): every shard in the
  compute dtype, no slots. A shard is layers_per_shard x the largest decoder layer: the edges do
  not size it (contract/shards.py). The embedding is read per pass as the rows of the pass's
  tokens, which the slot holds (beyond it, in a buffer of their own: counted); a head larger than a
  decoder shard (a 128k-vocab 70B's is 2.1 GB in fp16, a layer 1.7 GB) comes in steps of vocabulary
  rows that fit one. Only an edge that cannot be cut (an embedding or head with more than its one
  weight) still counts whole.
  A MoE model whose layers do not fit whole streams its experts (one layer per shard): the slot
  unit is then the largest of a MoE layer's dense part, experts_per_group experts and a dense
  layer, and a streamed layer keeps per token its output, its experts' input and k routes between
  its steps, with the activations (`_Model.streamed`).
* On CUDA, weights reach the device through pinned host staging (RAM) of one stored shard.
* Batch in flight: its input and output hidden states, 2 x batch_tokens x hidden x dtype bytes,
  on the compute device whatever the storage.
* Working memory of one forward of `batch_tokens` padded tokens, rows at most L (the longest
  prompt) long: MLP intermediates 3 x intermediate x tokens; q, k, v, attention output, residual,
  normed input 6 x hidden x tokens; attention scores tokens x L x heads x (dtype + 4) bytes (eager
  attention materialises them and softmaxes in float32; on a GPU sdpa's memory-efficient kernel
  does not); the 4D mask tokens x L x dtype bytes.
  The head shard instead holds float32 logits and their softmax for the scored positions: of a
  step's rows when the head comes in steps (of the whole vocabulary for next_token_probs, whose
  output is that row), and between its steps every batch of the round keeps its scored positions'
  final-norm outputs (and, for next_token_probs, their logits so far). The larger of the two counts
  (and of a gathered embedding's rows beyond a slot).
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
* Layouts: each batch's additive mask, kept for the pass up to LAYOUT_CACHE_BYTES (engine.py).
* Process baseline: Python + torch (+ the CUDA runtime on a GPU) in RAM; the CUDA context on the GPU
  (figures.py: measured by calibration, else assumed).

Pipeline stages (parallel: pipeline; workers/pipeline.py) are sized as a data worker running the
whole prompt set, with three differences. Activations wait in RAM (storage cpu): they arrive from
the previous stage over a channel. A stage's inbox counts a whole round's activations, not a 1/n
share: a batch lives in one place at a time, but a slow stage can have every batch of the round
waiting at its door while it streams its shard. And each stage's channel holds up to
PIPELINE_CHANNEL_BATCHES batches in flight (reserved at the device's largest batch, then counted at
the chosen one). Its two shard slots are sized by the largest shard of the model (it may own it).

A worker fits when each peak <= its budget less the safety margin (figures.SAFETY_FRACTION: 5% when
the worker's fixed memory is measured, 10% when assumed). Budgets: GPU = min(free memory,
limits.gpu_memory); RAM = min(available, limits.ram) split evenly between the workers; disk = free
space at the probed disk path, split evenly between the workers.

Decisions: parallel, dtype, devices and the prompt slices (contiguous, balanced by tokens weighted
by device throughput) for the job; then per worker an objective, not a fill rule: every combination
of batch_tokens (powers of two up to the device's cap, and the longest prompt), storage,
layers_per_shard (powers of two and all), one or two shard slots and, where layers_per_shard is auto, keeping the whole
model resident, is sized (rounds: consecutive prompts, the resume unit, of about
ROUND_TARGET_SECONDS of compute that fit in memory) and timed. The fastest wins, except that among
the combinations within TIME_TOLERANCE of it, those within MEMORY_TOLERANCE of the least memory are
preferred (the fastest of them). So layers per shard grow only where that buys time (fewer
activation round trips), and a model that fits stays resident only where re-reading it would cost
time (several rounds or generation steps that reading dominates).

Time model (seconds; rates from figures.py: measured by calibration, else assumed):
start-up + per round: the first shard's read, then per shard of each pass the longer of computing it
and reading the next (two slots: the loader is at most one shard ahead; the last shard of a
generation step overlaps the next step's first read). Reads: a shard's stored bytes / read rate (the
disk's, through the page cache or, for a model larger than the RAM read by one worker per file,
around it: `_with_reads`; or the PCIe link's if slower; a worker's first pass also hashes the files not verified yet,
beside the read or taking turns with it where no core is spare); resident: the first pass only. Compute: FLOPs / throughput at
the tokens each forward carries (a batch's share of the round; the head's scored rows; a later
step's one token per suffix) for layers of the model's FLOPs per token (a narrow layer runs far
below a wide one's rate: figures.py prices a forward as a fixed cost plus a cost per FLOP): a
decoder group 2 x its params per token plus attention's 4 x row length x hidden per token (one row
per prompt; a later generation step computes one token per suffix against the cached row), the lm
head on the scored positions, the embedding a lookup; on a GPU each layer forward also costs the
engine a fixed time beyond the calibrated layer's (figures.GPU_FORWARD_SECONDS, so larger batches
run faster there, as measured); each shard boundary also moves every batch's
activations over the host-device link where they wait off the GPU, and through files with the disk
store. Reported apart: reading and computing totals, and the fill (what the overlap does not hide).
A pipeline stage reads and computes 1/n of each shard (the fill and drain of each step, and the
channel copies, are not counted).

A MoE model whose layers do not fit whole streams its experts (one layer per shard, planned
at one expert per group, then experts_per_group grows into the memory left beside the chosen
batch and rounds); a MoE layer's compute counts only the num_experts_per_tok experts a token
is routed to.

parallel auto: one device is data. Otherwise both are planned; when data mode's slowest worker is
predicted to spend longer reading weights than computing (few prompts, slow disk: every worker
streams the whole model), the stages' split reading wins and pipeline is chosen; when compute
dominates, data (it divides compute as well, without the hand-offs). The plan keeps both predictions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

from flexorch.orchestrator.figures import GPU_FORWARD_SECONDS, Figures, figures_of
from flexorch.orchestrator.hardware import Hardware, Node, format_bytes
from flexorch.contract.errors import UserError
from flexorch.contract.manifest import DECODER, DTYPE_BYTES, EMBED, LM_HEAD, NORM, Manifest
from flexorch.contract.protocol import HEAP_SLACK, LAYOUT_CACHE_BYTES, STORAGES, EngineSettings
from flexorch.contract.shards import (decoder_groups, gathered, head_row_bytes, head_rows, head_step_rows, owner,
                                      shard_bytes)

MiB, GiB = 1 << 20, 1 << 30

# -- memory constants ----------------------------------------------------------------------------
# The worker's fixed RAM, the CUDA context and the safety margin are figures (orchestrator/figures.py):
# measured by calibration where it ran, else assumed there.
# The loader reads into one pinned staging buffer and waits for its copy before reusing it
# (workers/prefetch.py), so one stored shard of pinned RAM per CUDA worker.
STAGING_BUFFERS = 1
# Before the storage is chosen: round activations are counted nowhere (only the batch in flight).
NO_STORAGE = "none"
# Shard slots: the shard computing and the one prefetching (the double buffer); one where only that
# fits (EngineSettings.double_buffer off: a shard less memory, every read waited for).
DOUBLE_BUFFER, SINGLE_BUFFER = 2, 1
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

# -- the objective -------------------------------------------------------------------------------
# Settings predicted within this share of the fastest count as equally fast, and the one needing the
# least memory wins: 3% is about the run-to-run spread of one setting on a quiet machine
# (bench_limit's repeats), so a smaller predicted gain is not one a user could see.
TIME_TOLERANCE = 0.03
# ... and of those, peaks within this share of the least count as equally small: the memory model
# is held to 10% of measured peaks (bench_autotune), so a smaller saving is not one to trade speed for.
MEMORY_TOLERANCE = 0.10
# The disk store serializes each batch to a file and parses it back on the worker's CPU (about four
# memory copies per byte written and read, ~8 GB/s each): work the compute waits for or shares cores
# with, whatever the disk's speed. Assumed, not measured.
DISK_STORE_COPY_BYTES_PER_S = 2e9


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
    predicted_fill_seconds: float = 0.0  # reading no compute hides: each round's first shards
    predicted_start_seconds: float = 0.0  # process start to the first forward
    predicted_pass_shares: tuple[float, ...] = ()  # each shard's share of a pass's time (progress); () equal

    @property
    def predicted_seconds(self) -> float:
        """Reading and computing overlap (double buffer): the slower one sets the pace, after the
        start-up and the reads that nothing hides."""
        return (self.predicted_start_seconds + self.predicted_fill_seconds
                + max(self.predicted_read_seconds, self.predicted_compute_seconds))


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
    figures: tuple[str, ...] = ()  # the rates and fixed costs predicted with, each measured or assumed

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
                "predicted_pass_shares": tuple(w.get("predicted_pass_shares", ())),
            })
            for w in data["workers"]
        )
        predictions = tuple(ModePrediction(**p) for p in data.get("predictions", ()))
        return cls(parallel=data["parallel"], dtype=data["dtype"], workers=workers, reasons=tuple(data["reasons"]),
                   predictions=predictions, figures=tuple(data.get("figures", ())))


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
    edge: int  # the larger edge that is read whole (an embedding or head that cannot be cut; else 0), compute dtype
    stored_layer: int  # the same two, as stored in the files (what the slots and staging hold)
    stored_edge: int
    converted: bool  # compute dtype differs from the checkpoint's: the loader makes a converted copy
    bytes_per_pass: int  # bytes read by one pass over the model
    stored_shards: tuple[int, ...]  # as stored: the embedding, each decoder layer, norm + head (plan_shards)
    decoder_params: int
    head_params: int
    total: int  # every shard, compute dtype: a resident model
    moe: _Experts | None = None  # the MoE layers' sizes (None: a dense model)
    experts_per_group: int = 0  # > 0: MoE layers stream their experts this many at a time
    pending_per_token: int = 0  # bytes a streamed MoE layer keeps per token between its steps
    stored_tail: int = 0  # norm + head as stored (a tied head: the embedding's bytes)
    stored_norm: int = 0
    stored_row: int = 0  # one row of the head's weight as stored; 0: the head cannot come in steps
    embed_row: int = 0  # one row of a gathered embedding, compute dtype; 0: read whole
    eager_attention: bool = False  # attention sdpa cannot express (soft-capped logits): scores materialised

    def streamed(self, group: int) -> "_Model":
        """This model with its MoE layers run as steps (contract/shards.py): the unit a slot holds is
        the largest of a dense decoder layer, a MoE layer's dense part and `group` experts. Between
        its steps a streamed layer keeps every token's output and experts' input (2 x hidden) and its
        k routes (an int64 id and a float32 weight each)."""
        e = self.moe
        stored = max(e.stored_dense_layer, e.stored_dense_part, group * e.stored_expert)
        return replace(self, experts_per_group=group, stored_layer=stored,
                       layer=math.ceil(stored * self.layer / self.stored_layer),
                       pending_per_token=2 * self.hidden * self.dtype_bytes + e.per_token * (8 + 4))

    def stage_bytes(self, lps: int, stages: int, embed: float | None = None) -> float:
        """Bytes per pass read by the busiest pipeline stage (shard s on stage s % stages); `embed`:
        what the embedding's stage reads of the table (its gathered rows), else all of it."""
        edge_in, *decoders, edge_out = self.stored_shards
        shards = shard_bytes(edge_in if embed is None else embed, decoders, edge_out, lps)
        return max(sum(b for s, b in enumerate(shards) if owner(s, stages) == stage) for stage in range(stages))

    def embed_read(self, tokens: float, resident: bool = False) -> float:
        """Stored bytes of the embedding one pass over `tokens` padded tokens reads: the rows of its
        tokens where it is gathered (at most one per token), else (or resident) the whole table."""
        if resident or not self.embed_row:
            return self.stored_shards[0]
        return self.stored_shards[0] * min(1.0, tokens / self.vocab)

    def head_split(self, lps: int) -> bool:
        """Whether norm + head come in vocabulary steps (contract/shards.py): larger than a decoder shard."""
        return bool(self.stored_row) and self.stored_tail > lps * self.stored_layer

    def head_columns(self, lps: int) -> int:
        """Logit columns of one head call: a step's rows, or the whole vocabulary."""
        if not self.head_split(lps):
            return self.vocab
        return min(self.vocab, head_step_rows(lps * self.stored_layer, self.stored_norm, self.stored_row))

    def shard(self, lps: int) -> int:
        return max(self.edge, lps * self.layer)

    def stored_shard(self, lps: int) -> int:
        return max(self.stored_edge, lps * self.stored_layer)

    def resident_weights(self, lps: int, resident: bool = False, slots: int = DOUBLE_BUFFER) -> int:
        """Device bytes of the shard slots (plus their converted copies); resident: every shard in
        the compute dtype, and the one being read as stored while it is converted."""
        if resident:
            return self.total + (self.stored_shard(1) if self.converted else 0)
        return slots * (self.stored_shard(lps) + (self.shard(lps) if self.converted else 0))


@dataclass(frozen=True)
class _Experts:
    """The sizes of a MoE model's layers, as stored (manifest: experts, expert_bytes)."""

    experts: int  # per MoE layer (the most of any layer)
    per_token: int  # num_experts_per_tok: the experts each token is routed to
    stored_expert: int  # one expert's bytes across its fused tensors
    stored_dense_part: int  # a MoE layer without its experts: attention, router, norms, shared expert
    stored_dense_layer: int  # the largest decoder layer without experts (0: none)


@dataclass(slots=True)  # not frozen: built ~10^6 times on big jobs, and frozen init is 3x slower; never mutated
class _Load:
    """Additive cost of some prompts (one prompt, a round, a slice)."""

    act_tokens: float = 0.0  # padded tokens waiting between shards (the first step's: the most)
    result_bytes: int = 0  # scores held in RAM until the round is committed
    layer_flops: float = 0.0  # every decoder layer together, first generation step
    head_flops: float = 0.0  # the lm head on the scored positions, first step
    later_layer_flops: float = 0.0  # each later generation step (against the KV cache), per step
    later_head_flops: float = 0.0
    cache_tokens: float = 0.0  # padded tokens whose keys and values the KV cache keeps (per layer)
    scored: float = 0.0  # positions the head scores at the first step
    suffixes: float = 0.0  # a later step's tokens (one per suffix), each also scored

    def __add__(self, other: "_Load") -> "_Load":
        return _Load(*(getattr(self, f) + getattr(other, f) for f in _Load.__dataclass_fields__))

    def flops(self, steps: int) -> float:
        """Over `steps` generation steps."""
        return self.layer_flops + self.head_flops + (steps - 1) * (self.later_layer_flops + self.later_head_flops)


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
    figures: Figures  # the machine's rates and fixed costs, measured or assumed
    token_flops: float  # one decoder layer's FLOPs per token, first step, over the job's prompts
    token_attention: float  # of those, attention's
    unverified_share: float = 0.0  # of the stored bytes, those hashed on their first read (make_plan)
    direct_reads: bool = False  # layer files read around the page cache (_with_reads)


@dataclass(frozen=True)
class _Setup:
    device: str
    lps: int
    batch: int
    storage: str
    resident: bool = False  # the whole model kept on the device for the job, read once
    slots: int = DOUBLE_BUFFER  # shard slots when streaming


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
              suffix_counts: Sequence[int] | None = None, scored_counts: Sequence[int] | None = None,
              unverified_bytes: int = 0) -> Plan:
    """Decide everything about running `spec` on `hardware`. `prompt_tokens[i]`: prompt i's packed
    tokens (prefix + all suffixes); `suffix_counts[i]`: its number of suffixes (sizes the scores and
    the tokens added per generation step; default DEFAULT_SUFFIXES_PER_PROMPT); `scored_counts[i]`:
    the positions the head scores (ScoreKind.positions; default: every token for suffix_logprob, one
    per suffix otherwise), which size the head's logits; `unverified_bytes`: of the layer files, the
    bytes not marked verified (contract/verified.py), which each worker hashes as it first reads them."""
    reasons: list[str] = []
    if not prompt_tokens:
        raise _error(spec, "prompts", "no prompts to score")
    dtype = _resolve_dtype(spec, manifest, reasons)
    if manifest.compression:
        reasons.append(f"weights {manifest.compression} (flexorch prepare --compress): decoder projections "
                       f"dequantised per shard into {dtype}; scores are approximate")
    job = _describe_job(hardware, manifest, spec, dtype, prompt_tokens, suffix_counts, scored_counts, unverified_bytes)
    if unverified_bytes:
        sha = job.figures.sha256
        reasons.append(f"checksums: {format_bytes(unverified_bytes)} of layer files not verified since `flexorch "
                       f"prepare` (copied, moved, changed, or in a read-only dir): each worker's first pass hashes "
                       f"them as it reads them (sha256 {format_bytes(sha.value)}/s, {sha.source})")
    devices = _resolve_devices(spec, hardware, reasons)
    if spec.parallel != "data" and len(devices) == 1:
        reasons.append(f"parallel data ({'auto' if spec.parallel == 'auto' else 'from pipeline'}): one device, "
                       "and a one-stage pipeline is data mode")
    figures = tuple(job.figures.describe(devices, dtype))
    if spec.parallel == "data" or len(devices) == 1:
        data_reasons, data = _plan_data(job, hardware, devices)
        return Plan("data", dtype, data, tuple(reasons + data_reasons), (_prediction("data", data),), figures)
    pipeline = _plan_pipeline(job, hardware, devices)
    if spec.parallel == "pipeline":
        reasons.append(f"parallel pipeline (from the job): {len(devices)} stages, shard s on stage s % "
                       f"{len(devices)}, each reading only its shards")
        return Plan("pipeline", dtype, pipeline, tuple(reasons), (_prediction("pipeline", pipeline),), figures)
    data_reasons, data = _plan_data(job, hardware, devices)
    predictions = (_prediction("data", data), _prediction("pipeline", pipeline))
    parallel, why = _choose_parallel(*predictions)
    reasons.append(f"parallel {parallel} (auto): {why}")
    if parallel == "data":
        return Plan("data", dtype, data, tuple(reasons + data_reasons), predictions, figures)
    return Plan("pipeline", dtype, pipeline, tuple(reasons), predictions, figures)


def make_cluster_plan(nodes: Sequence[Node], manifest: Manifest, spec, prompt_tokens: Sequence[int], *,
                      suffix_counts: Sequence[int] | None = None, scored_counts: Sequence[int] | None = None) -> Plan:
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
    job = _describe_job(nodes[0].hardware, manifest, spec, dtype, prompt_tokens, suffix_counts, scored_counts)
    seats = _resolve_cluster_devices(spec, nodes, reasons)
    if len(seats) > len(job.tokens):
        reasons.append(f"{len(seats) - len(job.tokens)} device(s) left idle: only {len(job.tokens)} prompt(s)")
        seats = seats[:len(job.tokens)]
    threads = _cluster_threads(seats)
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
        budget = _Budget(_gpu_budget(hw, device, spec, safety),
                         _usable(_cap(hw.ram_available, spec.limits.ram), safety) // sharing,
                         _usable(hw.disk_free, safety) // sharing)
        plan = _plan_worker(on_node, f"worker{i}", device, indices, threads[i], budget)
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
    job, reads = _with_reads(job, hardware, len(devices))
    reasons.append(reads)
    threads = _threads(devices, hardware.cpu_count)
    rates = [_cap_rate(job, device, threads[i]) for i, device in enumerate(devices)]
    slices = _balanced_slices(job.tokens, rates)
    if len(devices) > 1:
        reasons.append(f"prompts split into {len(devices)} contiguous slices balanced by tokens, weighted by "
                       "each device's predicted throughput")
    safety = job.figures.safety
    ram_share = _usable(_cap(hardware.ram_available, job.spec.limits.ram), safety) // len(devices)
    disk_share = _usable(hardware.disk_free, safety) // len(devices)
    workers = tuple(
        _plan_worker(job, f"worker{i}", device, indices, threads[i],
                     _Budget(_gpu_budget(hardware, device, job.spec, safety), ram_share, disk_share))
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
    job, reads = _with_reads(job, hardware, 1)  # each stage reads only its own shards
    threads = _threads(devices, hardware.cpu_count)
    rates = [_cap_rate(job, d, threads[i]) for i, d in enumerate(devices)]
    slowest = min(range(n), key=lambda i: rates[i])
    m, kind = job.model, kinds.pop()
    reserve = PIPELINE_CHANNEL_BATCHES * BATCH_TOKENS_CAP[kind] * m.hidden * m.dtype_bytes
    safety = job.figures.safety
    gpu_budgets = [_gpu_budget(hardware, d, spec, safety) for d in devices]
    budget = _Budget(None if kind == "cpu" else min(gpu_budgets),
                     _usable(_cap(hardware.ram_available, spec.limits.ram), safety) // n - reserve,
                     _usable(hardware.disk_free, safety) // n)
    plan = _plan_worker(job, "worker0", devices[slowest], tuple(range(len(job.tokens))), threads[slowest], budget,
                        stages=n)
    channel = PIPELINE_CHANNEL_BATCHES * plan.settings.batch_tokens * m.hidden * m.dtype_bytes
    # Rounds were sized at 1/n of a pass; the busiest stage reads a little more (an edge, uneven groups).
    # The embedding's stage gathers the rows of each round's tokens, as a data worker does.
    tokens = [sum(job.loads[i].act_tokens for i in r) for r in plan.rounds]
    busiest = sum(m.stage_bytes(plan.settings.layers_per_shard, n, m.embed_read(t)) for t in tokens)
    read = spec.generate_tokens * busiest / _read_rate(job, devices[slowest])
    plan = replace(plan, predicted_read_seconds=read, reasons=plan.reasons + (reads,))
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
        storages=("cpu",) if stages > 1 else _storages(spec, device),
        lps=(1,) if streaming else _lps_candidates(job, floor, stages),
        resident=stages == 1 and spec.layers_per_shard is None and not streaming,
        slots=(DOUBLE_BUFFER,) if stages > 1 else (DOUBLE_BUFFER, SINGLE_BUFFER),
    )
    options = _search(job, device, indices, threads, budget, space, stages)
    if not options:
        raise _error(spec, "storage", _no_storage_message(job, device, indices, threads, space, budget, stages))
    best = _choose(options)
    reasons += _option_reasons(job, options, best, device, stages)
    setup, t, peaks = best.setup, best.time, best.peaks
    if streaming:  # searched at one expert per group; groups then grow into what is left
        job = _grow_expert_groups(job, setup, best.rounds, budget, reasons)
        peaks = _max_peaks(job, setup, best.rounds)
    if device == "cpu":
        reasons.append(f"threads {threads}: the machine's {job.figures.hardware.cpu_count} cores split between its "
                       "CPU workers")
    # free heap kept between shards sits beside the peak: no more than the budget leaves
    heap_slack = max(0, min(HEAP_SLACK, budget.ram - peaks.ram))
    if heap_slack < HEAP_SLACK:
        reasons.append(f"heap slack {format_bytes(heap_slack)}: free heap kept between shards, what the RAM budget "
                       f"leaves beside the predicted peak (else {format_bytes(HEAP_SLACK)})")
    settings = EngineSettings(
        device=device, dtype=job.dtype, layers_per_shard=setup.lps, storage=setup.storage, batch_tokens=setup.batch,
        disk_folder=_disk_folder(spec, name) if setup.storage == "disk" else None,
        threads=threads if device == "cpu" else 0, resident=setup.resident,
        experts_per_group=job.model.experts_per_group, allow_untested_models=spec.allow_untested_models,
        double_buffer=setup.slots == DOUBLE_BUFFER, heap_slack=heap_slack, direct_reads=job.direct_reads,
    )
    return WorkerPlan(
        name=name, device=device, settings=settings, prompt_indices=indices, rounds=best.rounds,
        predicted_peak_device_memory=peaks.device, predicted_peak_ram=peaks.ram,
        predicted_read_seconds=t.read, predicted_compute_seconds=t.compute, reasons=tuple(reasons),
        predicted_fill_seconds=t.fill, predicted_start_seconds=t.start,
        predicted_pass_shares=_pass_shares(job, setup, indices, threads) if stages == 1 else (),
    )


# -- the search ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Space:
    """The values each setting may take (one value where the job fixes it)."""

    batches: tuple[int, ...]  # largest first
    storages: tuple[str, ...]
    lps: tuple[int, ...]  # increasing
    resident: bool  # also try keeping the whole model on the device
    slots: tuple[int, ...] = (DOUBLE_BUFFER,)  # shard slots to try when streaming (DOUBLE_BUFFER, SINGLE_BUFFER)


@dataclass(frozen=True)
class _Time:
    """A worker's predicted seconds."""

    read: float  # weight bytes from the disk, plus disk activations (they share it)
    compute: float  # FLOPs at the batch's throughput, plus activation copies between host and device
    fill: float  # reading nothing hides: each round's first shards, before the double buffer runs
    start: float  # the worker's start-up

    @property
    def total(self) -> float:
        return self.start + self.fill + max(self.read, self.compute)


@dataclass(frozen=True)
class _Option:
    """One combination of settings, with the rounds it allows, its peaks and its time."""

    setup: _Setup
    rounds: tuple[tuple[int, ...], ...]
    peaks: _Peaks
    time: _Time


def _search(job: _Job, device: str, indices: tuple[int, ...], threads: int, budget: _Budget, space: _Space,
            stages: int) -> list[_Option]:
    options = []
    for batch in space.batches:
        for storage in space.storages:
            for resident in (False, True) if space.resident else (False,):
                for slots in (DOUBLE_BUFFER,) if resident else space.slots:
                    for lps in space.lps[:1] if resident else space.lps:
                        setup = _Setup(device, lps, batch, storage, resident, slots)
                        rounds = _rounds_for(job, setup, indices, threads, budget, stages)
                        if rounds is None:
                            break  # a longer shard needs more memory still
                        time = _time(job, setup, indices, rounds, threads, stages)
                        options.append(_Option(setup, rounds, _max_peaks(job, setup, rounds), time))
    return options


def _rounds_for(job: _Job, setup: _Setup, indices: tuple[int, ...], threads: int, budget: _Budget,
                stages: int) -> tuple[tuple[int, ...], ...] | None:
    """Rounds of about ROUND_TARGET_SECONDS of compute that fit, or None when this setup cannot
    hold the smallest useful rounds (compute >= ROUND_MIN_COMPUTE_OVER_READ x the weights' read;
    a resident model is read once, so any round is useful)."""
    rate = _rate(job, setup.device, threads, setup.batch) * stages
    read_per_round = 0.0 if setup.resident else (
        job.model.bytes_per_pass * job.spec.generate_tokens / _read_rate(job, setup.device) / stages)
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
    steps = job.spec.generate_tokens
    flops = [job.loads[i].flops(steps) for i in indices]
    even = _split_rounds(job, indices, sum(flops) / len(rounds) + max(flops), fits)
    return even if even is not None and len(even) == len(rounds) else rounds


def _time(job: _Job, setup: _Setup, indices: tuple[int, ...], rounds, threads: int, stages: int) -> _Time:
    """See the module docstring's time model: per round, the first shard's read, then each shard of
    each pass as `_per_shard` counts it."""
    steps, stream, read, compute = job.spec.generate_tokens, 0.0, 0.0, 0.0
    hashing = _verifying_read_factor(job, setup.device, threads)
    for r, indices_r in enumerate(rounds):
        costs = _shard_costs(job, setup, sum((job.loads[i] for i in indices_r), _Load()), threads, stages,
                             read=not setup.resident or r == 0)
        first, later = costs.compute(first_step=True), costs.compute(first_step=False)
        # a worker hashes the files not verified yet during its first pass; later ones read them plain
        reads = tuple(x * hashing for x in costs.reads) if r == 0 else costs.reads
        # the resident model is read during the round's first step; streamed, every step reads it
        again = [0.0] * len(costs.reads) if setup.resident else costs.reads

        def one_pass(compute, reads, after_last) -> float:
            return sum(_per_shard(compute, reads, after_last, setup.slots))

        stream += reads[0] + one_pass(first, reads, again[0] if steps > 1 else 0.0)
        if steps > 1:
            stream += (steps - 2) * one_pass(later, again, again[0]) + one_pass(later, again, 0.0)
        read += sum(reads) + (steps - 1) * sum(again)
        compute += sum(first) + (steps - 1) * sum(later)
    return _Time(read=read, compute=compute, fill=stream - max(read, compute), start=job.figures.worker_start.value)


def _verifying_read_factor(job: _Job, device: str, threads: int) -> float:
    """How much longer a worker's first pass reads, for the share of the files it hashes as it goes.
    The hash runs on a thread of its own beside the read (workers/layerfile.py): with a core to spare
    beside the compute threads and the loader the slower of the two sets the rate; without one, the
    two take turns on the cores and their times add (a 2-core VM measured between the two: 0.90 GB/s
    hashing at 1.8 GB/s beside a 1.29 GB/s read, where the first rule says 1.29 and this one 0.75)."""
    if not job.unverified_share:
        return 1.0
    read, sha = _read_rate(job, device), job.figures.sha256.value
    busy = (threads if device == "cpu" else 1) + 2  # compute, loader, hash
    verifying = min(read, sha) if job.figures.hardware.cpu_count >= busy else 1.0 / (1.0 / read + 1.0 / sha)
    return 1.0 + job.unverified_share * (read / verifying - 1.0)


@dataclass(frozen=True)
class _ShardCosts:
    """One pass of a round, per shard (embedding, decoder groups, norm + head): seconds to read it
    and to compute it at the first generation step and at each later one."""

    reads: tuple[float, ...]
    first_step: tuple[float, ...]
    later_step: tuple[float, ...]

    def compute(self, first_step: bool) -> tuple[float, ...]:
        return self.first_step if first_step else self.later_step


def _shard_costs(job: _Job, setup: _Setup, load: _Load, threads: int, stages: int, read: bool = True) -> _ShardCosts:
    """Decoder groups carry their layers' share of the FLOPs, the head its own, the embedding is a
    lookup. Each runs at the rate of the tokens one forward carries: a first step's batch, a later
    step's one token per suffix of it, the head's scored positions of it (a matmul of a few rows runs
    far below a full batch's rate). Every shard boundary also moves each batch's activations: over
    the host-device link where they wait off the GPU, and through files with the disk store (an
    upper bound for later steps, which carry one token per suffix). A pipeline stage reads and
    computes 1/stages."""
    m = job.model
    batches = max(1.0, math.ceil(load.act_tokens / setup.batch))

    def rate(tokens: float) -> float:  # FLOP/s of forwards of `tokens` each, summed over the stages
        return _rate(job, setup.device, threads, max(1, round(tokens / batches))) * stages

    groups = decoder_groups(m.num_layers, setup.lps)
    stored = shard_bytes(m.embed_read(load.act_tokens, setup.resident), m.stored_shards[1:-1], m.stored_shards[-1],
                         setup.lps)
    read_rate = _read_rate(job, setup.device)
    reads = tuple(b / read_rate / stages if read else 0.0 for b in stored)
    boundary = 2 * load.act_tokens * m.hidden * m.dtype_bytes / stages
    move = boundary / DISK_STORE_COPY_BYTES_PER_S if setup.storage == "disk" else 0.0
    if setup.device != "cpu" and setup.storage != "gpu":
        move += boundary / job.figures.host_to_device(setup.device).value

    # each layer forward's fixed cost on a GPU, once per batch (figures.GPU_FORWARD_SECONDS); on a CPU
    # the calibrated forwards carry theirs
    forwards = batches * (GPU_FORWARD_SECONDS if setup.device != "cpu" else 0.0) / stages

    def per_shard(layers: float, head: float) -> tuple[float, ...]:
        decoders = [len(g) / m.num_layers * layers + len(g) * forwards + move for g in groups]
        return (move, *decoders, head)

    return _ShardCosts(reads, per_shard(load.layer_flops / rate(load.act_tokens), load.head_flops / rate(load.scored)),
                       per_shard(load.later_layer_flops / rate(load.suffixes),
                                 load.later_head_flops / rate(load.suffixes)))


def _per_shard(compute: Sequence[float], reads: Sequence[float], after_last: float, slots: int) -> list[float]:
    """Each shard's time in a pass whose first shard is loaded: with two slots shard k computes while
    shard k+1 is read (the last while `after_last` is: the next pass's first shard, or nothing), the
    longer counts; with one slot each read waits for the compute before it, both count."""
    nexts = list(reads[1:]) + [after_last]
    join = max if slots == DOUBLE_BUFFER else (lambda c, r: c + r)
    return [join(c, r) for c, r in zip(compute, nexts)]


def _rate(job: _Job, device: str, threads: int, batch: int) -> float:
    """FLOP/s through this model's layers (their FLOPs per token, or else their width) at `batch`
    tokens per forward."""
    return job.figures.flops(device, job.dtype, threads, batch, job.model.hidden, job.token_flops,
                             job.token_attention)


def _choose(options: Sequence[_Option]) -> _Option:
    """Among the options within TIME_TOLERANCE of the fastest, those within MEMORY_TOLERANCE of the
    least memory (device + RAM), and of those the fastest: neither a gain too small to see in time
    nor one too small to matter in memory decides alone."""
    fastest = min(o.time.total for o in options)
    near = [o for o in options if o.time.total <= fastest * (1 + TIME_TOLERANCE)]
    least = min(_memory(o) for o in near)
    small = [o for o in near if _memory(o) <= least * (1 + MEMORY_TOLERANCE)]
    # equal times (reading dominates every option): activations nearest the compute, the simplest store
    return min(small, key=lambda o: (o.time.total, STORAGES.index(o.setup.storage), _memory(o)))


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
            largest = _largest_fitting(range(longest, max(requested, BATCH_TOKENS_CAP[_kind(device)]) + 1), fits)
            raise _error(job.spec, "batch_tokens", f"{requested} does not fit on {device} with {lps} layer(s) per "
                         f"shard: at most {largest} fits")
        return (requested,)
    # A batch never holds more than the worker's whole slice, so neither does the memory estimate.
    slice_tokens = sum(job.lengths[i] for i in indices)
    cap = min(BATCH_TOKENS_CAP[_kind(device)], 1 << max(slice_tokens - 1, 0).bit_length())
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


def _pass_shares(job: _Job, setup: _Setup, indices: tuple[int, ...], threads: int) -> tuple[float, ...]:
    """Each shard's share of one pass's predicted time, for progress (the first step's, as `_time`
    counts it: `_per_shard`); the first shard also its own read."""
    costs = _shard_costs(job, setup, sum((job.loads[i] for i in indices), _Load()), threads, 1,
                         read=not setup.resident)
    shares = _per_shard(costs.first_step, costs.reads, 0.0, setup.slots)
    shares[0] += costs.reads[0]
    total = sum(shares) or 1.0
    return tuple(c / total for c in shares)


def _option_reasons(job: _Job, options: Sequence[_Option], best: _Option, device: str, stages: int) -> list[str]:
    """Why `best`: the search, then per setting the best option differing only in it."""
    fastest = min(o.time.total for o in options)
    reasons = [f"settings (auto): {len(options)} combination(s) of batch_tokens, storage, layers_per_shard and shard "
               "slots fit; "
               f"the fastest is predicted {_seconds(fastest)}; of those within {TIME_TOLERANCE:.0%} of it, and "
               f"within {MEMORY_TOLERANCE:.0%} of the least memory (GPU + RAM), this one is the fastest" if len(options) > 1 else "settings: the only combination that fits"]
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
        rounds, steps = len(best.rounds), spec.generate_tokens
        reasons.append(f"resident (auto): the whole model fits on {device} beside its batches, so it is read once for "
                       f"the job instead of {rounds * steps} time(s) ({rounds} round(s) x {steps} step(s))")
    if stages > 1:
        reasons.append("storage cpu: pipeline activations arrive from the previous stage and wait in RAM (a whole "
                       "round at a slow stage)")
    reasons.append(f"{len(best.rounds)} round(s) (the resume unit) of about {ROUND_TARGET_SECONDS:.0f} s of compute at "
                   "most, each long enough that reading the weights stays a small share, and fitting in memory")
    return reasons


def _describe_option(option: _Option, device: str) -> str:
    peak = option.peaks.device if device != "cpu" else option.peaks.ram
    return f"{_seconds(option.time.total)}, {format_bytes(peak)}"


def _no_storage_message(job: _Job, device: str, indices: tuple[int, ...], threads: int, space: _Space,
                        budget: _Budget, stages: int) -> str:
    batch, lps = space.batches[-1], space.lps[0]
    rate = _rate(job, device, threads, batch) * stages
    read = job.model.bytes_per_pass * job.spec.generate_tokens / _read_rate(job, device) / stages
    smallest = _split_rounds(job, indices, ROUND_MIN_COMPUTE_OVER_READ * read * rate, lambda load, longest: True)
    biggest = max(smallest, key=lambda r: sum(job.loads[i].act_tokens for i in r))
    load, longest = sum((job.loads[i] for i in biggest), _Load()), _round_longest(job, biggest)
    peaks = {s: _peaks(job, _Setup(device, lps, batch, s, slots=space.slots[-1]), load, longest)
             for s in space.storages}
    needs = "; ".join(f"{s} {_shortfall(p, budget, device)}" for s, p in peaks.items())
    what = f"{space.storages[0]} does not hold" if job.spec.storage else "no activation storage holds"
    return (f"{what} the smallest useful round on {device} ({len(biggest)} prompt(s), compute >= "
            f"{ROUND_MIN_COMPUTE_OVER_READ:.0f}x the time to read the weights): {needs}; "
            "raise limits.ram, free disk space or set disk_folder elsewhere")


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
                  suffix_counts: Sequence[int] | None, scored_counts: Sequence[int] | None = None,
                  unverified_bytes: int = 0) -> _Job:
    model = _describe_model(manifest, dtype)
    suffixes = [min(n, DEFAULT_SUFFIXES_PER_PROMPT) for n in prompt_tokens] if suffix_counts is None else suffix_counts
    tokens = tuple(int(n) for n in prompt_tokens)
    lengths = tokens  # the KV cache keeps later steps to one token per suffix: rows never grow
    scored = scored_counts or [n if spec.score.kind == "suffix_logprob" else s for n, s in zip(tokens, suffixes)]
    loads = tuple(_prompt_load(model, spec, n, s, c) for n, s, c in zip(tokens, suffixes, scored))
    token_flops = sum(load.layer_flops for load in loads) / max(1, sum(tokens)) / model.num_layers
    return _Job(
        spec=spec, model=model, dtype=dtype, tokens=tokens, lengths=lengths, loads=loads,
        scored_ratio=max(c / max(n, 1) for n, c in zip(tokens, scored)),
        figures=figures_of(hardware),
        token_flops=token_flops, token_attention=token_flops - 2.0 * model.decoder_params / model.num_layers,
        unverified_share=min(1.0, unverified_bytes / max(1, sum(e.bytes for e in manifest.layers))),
    )


def _describe_model(manifest: Manifest, dtype: str) -> _Model:
    stored_dtype = DTYPE_BYTES.get(manifest.dtype, DTYPE_BYTES[dtype])
    scale = DTYPE_BYTES[dtype] / stored_dtype
    by_kind = {kind: [e for e in manifest.layers if e.kind == kind] for kind in (EMBED, DECODER)}
    tail = [e for e in manifest.layers if e.kind not in (EMBED, DECODER)]  # norm + lm head: one shard
    stored_layer = max(manifest.stored_bytes(e) for e in by_kind[DECODER])
    stored_tail = sum(manifest.stored_bytes(e) for e in tail)
    split = head_rows(manifest) > 0 and [e.kind for e in tail] == [NORM, LM_HEAD]
    embed_gathered = all(gathered(e) for e in by_kind[EMBED])
    # what the slots still hold whole: only an edge that cannot be cut (contract/shards.py)
    stored_edge = max(0 if embed_gathered else sum(manifest.stored_bytes(e) for e in by_kind[EMBED]),
                      0 if split else stored_tail)
    heads = [manifest.entry(e.tied_to) if e.tied_to else e for e in manifest.layers if e.kind == LM_HEAD]
    config = manifest.config
    # 64 is the smallest common head dim, so hidden // 64 heads overestimates the scores.
    attention_heads = int(config.get("num_attention_heads") or max(1, manifest.hidden_size // 64))
    head_dim = int(config.get("head_dim") or manifest.hidden_size // attention_heads)
    kv_heads = int(config.get("num_key_value_heads") or attention_heads)
    return _Model(
        num_layers=manifest.num_layers, hidden=manifest.hidden_size,
        intermediate=_intermediate(manifest, config),
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
        decoder_params=sum(_active_params(e, config) for e in by_kind[DECODER]),
        head_params=sum(e.params for e in heads), moe=_describe_experts(by_kind[DECODER], config),
        total=math.ceil(sum(manifest.stored_bytes(e) for e in manifest.layers) * scale),
        stored_tail=stored_tail, stored_norm=sum(e.bytes for e in tail if e.kind == NORM),
        stored_row=head_row_bytes(manifest) if split else 0,
        embed_row=manifest.hidden_size * DTYPE_BYTES[dtype] if embed_gathered else 0,
        eager_attention=bool(config.get("attn_logit_softcapping")),
    )


def _intermediate(manifest: Manifest, config: dict) -> int:
    """The widest MLP intermediate a forward holds per token. GPT-style MLPs are 4x hidden (a config
    without the key is assumed to be one). In a MoE layer a token's k routes are k rows of the expert
    width (moe_intermediate_size, or intermediate_size where the experts use it: Mixtral), all alive
    at once in transformers' grouped_mm experts: whichever experts the router picks, a batch's expert
    rows are at most k x its tokens."""
    dense = int(config.get("intermediate_size") or 4 * manifest.hidden_size)
    if not any(entry.experts for entry in manifest.layers):
        return dense
    expert_width = int(config.get("moe_intermediate_size") or dense)
    return max(dense, int(config.get("num_experts_per_tok") or 1) * expert_width)


def _describe_experts(decoders, config: dict) -> _Experts | None:
    moe = [e for e in decoders if e.experts]
    if not moe:
        return None
    return _Experts(experts=max(e.experts for e in moe), per_token=int(config.get("num_experts_per_tok") or 1),
                    stored_expert=max(e.expert_bytes for e in moe),
                    stored_dense_part=max(e.bytes - e.experts * e.expert_bytes for e in moe),
                    stored_dense_layer=max((e.bytes for e in decoders if not e.experts), default=0))


def _active_params(entry, config: dict) -> int:
    """Parameters a token goes through in a decoder layer: in a MoE layer, only the experts its router
    picks (num_experts_per_tok of `experts`), not all of them (Qwen3-30B-A3B: ~3 of 30 B)."""
    if not entry.experts:
        return entry.params
    per_token = config.get("num_experts_per_tok") or entry.experts
    expert_params = entry.expert_bytes * entry.experts // DTYPE_BYTES.get(entry.dtype, 2)
    return entry.params - expert_params + expert_params * per_token // entry.experts


def _prompt_load(model: _Model, spec, tokens: int, suffixes: int, scored: int) -> _Load:
    """A prompt is one packed row: every layer's weights see each of its tokens once (2 FLOPs per
    weight), and attention 4 x row length x hidden per token (workers/calibrate.layer_flops, which
    the throughput was measured with). A later generation step computes the newest token of each
    suffix against the cached row, one scored position per suffix."""
    steps = spec.generate_tokens
    attention = 4.0 * model.num_layers * model.hidden
    keys = tokens + steps / 2 * suffixes  # a later step's row, on average over the steps
    cached = tokens + (steps - 2) * suffixes if steps > 1 else 0  # the last step's keys are never kept
    return _Load(act_tokens=tokens * PADDING_ALLOWANCE, result_bytes=_result_bytes(model, spec, suffixes),
                 layer_flops=2.0 * model.decoder_params * tokens + attention * tokens * tokens,
                 head_flops=2.0 * model.head_params * scored,
                 later_layer_flops=2.0 * model.decoder_params * suffixes + attention * suffixes * keys,
                 later_head_flops=2.0 * model.head_params * suffixes, cache_tokens=cached * PADDING_ALLOWANCE,
                 scored=scored, suffixes=suffixes)


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


def _gpu_budget(hardware: Hardware, device: str, spec, safety: float) -> int | None:
    if device == "cpu":
        return None
    return _usable(_cap(_gpu(hardware, device).free_memory, spec.limits.gpu_memory), safety)


def _cap(available: int, limit: int | None) -> int:
    return available if limit is None else min(available, limit)


def _usable(budget: int, safety: float) -> int:
    return int(budget * (1 - safety))


def _threads(devices: Sequence[str], cpu_count: int) -> list[int]:
    """CPU workers share the cores evenly; each GPU worker keeps one core busy (Python driving the
    GPU and the loader thread), so those are not handed out."""
    n_cpu = sum(d == "cpu" for d in devices)
    share = max(1, (cpu_count - (len(devices) - n_cpu)) // max(n_cpu, 1))
    return [share if d == "cpu" else 0 for d in devices]


def _cap_rate(job: _Job, device: str, threads: int) -> float:
    """FLOP/s at the device's largest batch: how devices compare when prompts are split."""
    return _rate(job, device, threads, BATCH_TOKENS_CAP[_kind(device)])


def _with_reads(job: _Job, hardware: Hardware, readers: int) -> tuple[_Job, str]:
    """Whether layer files are read around the page cache (EngineSettings.direct_reads,
    workers/fileread.py), and why: where caching them cannot pay. A model larger than the RAM
    available leaves the cache before the next pass (or job) comes back to it, so every pass reads
    it from the disk anyway; read direct, the disk writes into the slot: no cache pages to allocate,
    no copy, and the cache's other contents kept. A model that fits is read through the cache, so
    later passes and jobs read it from memory; so are files that `readers` > 1 workers of one
    machine read in step (one read from the disk serves them all)."""
    direct, size, room = job.figures.direct_read, job.model.bytes_per_pass, hardware.ram_available
    if size <= room:
        why = f"the model ({format_bytes(size)}) fits in the RAM available ({format_bytes(room)}): later passes " \
              "and jobs read it from memory"
    elif readers > 1:
        why = f"{readers} workers read every layer file in step, one read from the disk serving them all"
    elif direct is None:
        why = "the filesystem refuses direct reads (calibration)"
    else:
        why = ""
    if why:
        return job, f"reads: through the page cache: {why}"
    cached = job.figures.disk_read
    return replace(job, direct_reads=True), (
        f"reads: direct (O_DIRECT): the model ({format_bytes(size)}) is larger than the RAM available "
        f"({format_bytes(room)}), so each pass reads it from the disk anyway; direct, the disk writes into the "
        f"shard slot, nothing is copied ({format_bytes(direct.value)}/s, {direct.source}; through the cache "
        f"{format_bytes(cached.value)}/s, {cached.source})")


def _read_rate(job: _Job, device: str) -> float:
    """Weights come from the disk, then on a GPU over its PCIe link: the slower one sets the rate."""
    disk = (job.figures.direct_read if job.direct_reads else job.figures.disk_read).value
    return disk if device == "cpu" else min(disk, job.figures.host_to_device(device).value)


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
def _working_bytes(model: _Model, batch: int, longest: int, scored_ratio: float, columns: int,
                   edges: "_Edges") -> int:
    """Peak temporaries of one forward of `batch` padded tokens in rows of at most `longest`; the head
    computes `columns` logits per scored position at once. The edges' bytes beside the slots live
    only while their shard runs, so they count with its phase, not on top of a decoder layer's. sdpa
    never holds the attention scores whole: on a GPU its memory-efficient kernel (measured on an H100:
    each 8192 tokens more of a 13B shape's batch added 0.84 GB, against 1.18 GB of intermediates
    without the scores and 1.83 GB with them), on a CPU its flash kernel, which takes the additive
    mask too (torch 2.13: 1024 tokens x 16 heads with a 1024-wide float mask peaked 8 MB above the
    inputs in fp32, bf16 and fp16, against 137 MB computed eagerly; the planner charged the scores
    and over-predicted bench_autotune's wide shape at 1024 tokens by 8-12%). Eager attention
    (soft-capped logits) holds them."""
    d, row = model.dtype_bytes, min(longest, batch)
    scores = batch * row * model.heads * (d + SCORE_EXTRA_BYTES) if model.eager_attention else 0
    decoder = ((MLP_INTERMEDIATES * model.intermediate + HIDDEN_COPIES * model.hidden) * batch * d
               + scores  # attention scores
               + batch * row * d)  # 4D additive mask
    scored = min(batch, math.ceil(batch * scored_ratio))
    head = LOGIT_COPIES * scored * columns * 4
    return max(decoder, head + edges.head_held, edges.gathered)


def _peaks(job: _Job, setup: _Setup, load: _Load, longest: int) -> _Peaks:
    """Peak device memory, RAM and disk of a worker running a round costing `load` whose longest
    row is `longest` tokens."""
    m, cuda = job.model, setup.device != "cpu"
    per_token = m.hidden * m.dtype_bytes
    kv_per_token = m.num_layers * m.kv_bytes if load.cache_tokens else 0  # no cache: one step
    # a streamed MoE layer's batches wait with the activations (on the device only with storage gpu)
    activations = math.ceil(load.act_tokens * per_token)
    pending = math.ceil(load.act_tokens * m.pending_per_token)
    cache = math.ceil(load.cache_tokens * kv_per_token)
    in_flight = 2 * setup.batch * per_token + (2 * setup.batch * m.kv_bytes if cache else 0)
    cache_read_ahead = setup.lps * setup.batch * m.kv_bytes if cache else 0  # disk: the next batch's
    # every batch's additive mask (rows x L x L ~ its padded tokens x L), kept for the pass while it fits
    layouts = min(LAYOUT_CACHE_BYTES, math.ceil(load.act_tokens * min(longest, setup.batch or longest) * m.dtype_bytes))
    next_token = job.spec.score.kind == "next_token_probs"  # its output is the vocabulary-wide row
    columns = m.vocab if next_token else m.head_columns(setup.lps)
    compute = (m.resident_weights(setup.lps, setup.resident, setup.slots) + in_flight + layouts
               + (_working_bytes(m, setup.batch, longest, job.scored_ratio, columns, _edges(m, setup, load, job))
                  if setup.batch else 0))
    ram = int(job.figures.base_ram[_kind(setup.device)].value) + load.result_bytes
    ram += STAGING_BUFFERS * _pinned(m.stored_shard(setup.lps)) if cuda else compute
    held = activations + cache  # in RAM with storage cpu: on a GPU worker, pinned batch by batch
    if cuda and setup.storage == "cpu" and setup.batch:
        batches = math.ceil(load.act_tokens / setup.batch)
        block = setup.batch * m.kv_bytes  # a batch's keys and values in one layer: the cache's unit
        held = batches * _pinned(setup.batch * per_token) + (math.ceil(cache * _pinned(block) / block) if cache else 0)
    ram += (held if setup.storage == "cpu" else in_flight + cache_read_ahead if setup.storage == "disk" else 0)
    ram += pending if setup.storage != "gpu" else 0
    device = (int(job.figures.cuda_context.value) + compute
              + (activations + pending + cache if setup.storage == "gpu" else 0) if cuda else 0)
    disk = DISK_COPIES * activations + cache if setup.storage == "disk" else 0
    return _Peaks(device=device, ram=ram, disk=disk)


def _pinned(size: int) -> int:
    """Host bytes that pinning `size` takes: torch's pinned-memory allocator rounds every block up
    to a power of two (a 1.71 GB staging buffer pins 2 GiB)."""
    return 1 << max(size - 1, 0).bit_length() if size > 0 else 0


@dataclass(frozen=True)
class _Edges:
    """Compute-device bytes of the edges beside the slots, each while its shard runs."""

    head_held: int = 0  # between a head's vocabulary steps: the round's scored positions' state
    gathered: int = 0  # a pass's gathered embedding rows where they outgrow a slot


def _edges(m: _Model, setup: _Setup, load: _Load, job: _Job) -> _Edges:
    """Between a head's vocabulary steps, the round's scored positions' final-norm outputs (and for
    next_token_probs their logits so far); a pass's gathered embedding rows beyond a slot (one per
    distinct token at most)."""
    held = gathered = 0
    if m.head_split(setup.lps):
        scored = load.act_tokens * job.scored_ratio
        held = math.ceil(scored * (m.hidden * m.dtype_bytes
                                   + (m.vocab * 4 if job.spec.score.kind == "next_token_probs" else 0)))
    if m.embed_row and not setup.resident:
        gathered = max(0, math.ceil(min(m.vocab, load.act_tokens)) * m.embed_row - m.stored_shard(setup.lps))
    return _Edges(held, gathered)


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
    margin = "after the safety margin"
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


def _minimum_fits(job: _Job, device: str, lps: int, longest_index: int, budget: _Budget, slots: int) -> bool:
    load = job.loads[longest_index]
    longest = job.lengths[longest_index]
    return _fits(_peaks(job, _Setup(device, lps, longest, NO_STORAGE, slots=slots), load, longest), budget)


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


def _split_rounds(job: _Job, indices: Sequence[int], target_flops: float,
                  fits: Callable[[_Load, int], bool]) -> tuple[tuple[int, ...], ...] | None:
    """Consecutive rounds of about `target_flops` each that fit; None if one prompt alone does not."""
    rounds: list[tuple[int, ...]] = []
    current: list[int] = []
    load, longest = _Load(), 0
    for i in indices:
        grown, grown_longest = load + job.loads[i], max(longest, job.lengths[i])
        if current and (grown.flops(job.spec.generate_tokens) > target_flops or not fits(grown, grown_longest)):
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
            w.name, w.device + (f"×{s.threads}" if s.threads else ""),
            f"{s.layers_per_shard} res" if s.resident else str(s.layers_per_shard), s.storage,
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
    for figure in plan.figures:
        console.print(f"- figure: {figure}")
    for w in plan.workers:
        console.print(f"- {w.name}: predicted {_seconds(w.predicted_read_seconds)} reading weights, "
                      f"{_seconds(w.predicted_compute_seconds)} computing")
        for reason in w.reasons:
            console.print(f"- {w.name}: {reason}")
