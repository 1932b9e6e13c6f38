"""The memory model: a worker's peak device memory, RAM and disk for one setup and round (`_peaks`),
and its budgets.

Per worker (sizes from `_Model`, in the compute dtype unless said "stored"):

* Weights: two shard slots (the one computing + the one prefetching) of the largest shard as
  stored — or one, where only that fits or it costs little time (each read then waits for the
  compute before it: EngineSettings.double_buffer) — and, where the compute dtype differs from the
  checkpoint's, the converted copies of both (workers/prefetch.py). Resident (the whole model kept
  for the job): every shard in the compute dtype, no slots. The embedding's gathered rows are held
  by the slot (beyond it, in a buffer of their own: counted).
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
* KV cache (generating): every decoder layer's keys and values of every token of the round but the
  last step's, at its largest over the steps (`_Load.cache_peak`): each prompt's grows to its own
  limit (EOS is not predicted) and leaves then, so a round's peaks just before some prompts leave
  (model.py `_cache_profile`); 2 x layers x kv_heads x head_dim x dtype bytes per padded token
  (MLA: the latent and rotary key, model.py), in the
  activations' tier (gpu: device; cpu: RAM, pinned block by block on a GPU worker; disk: disk);
  compressed (int8 / int4), the codes and each group's minimum and step instead
  (contract/choices.KVCompression). The batch in flight also holds one layer's cache of its batch
  twice (read, and joined with the new token's) on the compute device, compressed also the codes
  read and a float32 copy that quantising and restoring go through; on disk, RAM holds the next
  batch's cache of a shard's layers (read ahead). A pipeline stage keeps only its own layers'
  cache: counting all of them is conservative.
* Round results: held in RAM until the round is committed.
* Layouts: each batch's additive mask, kept for the pass up to LAYOUT_CACHE_BYTES (engine.py).
* Process baseline: Python + torch (+ the CUDA runtime on a GPU) in RAM; the CUDA context on the GPU
  (figures.py: measured by calibration, else assumed).

A worker fits when each peak <= its budget less the safety margin (figures.SAFETY_FRACTION: 5% when
the worker's fixed memory is measured, 10% when assumed). Budgets: GPU = min(free memory,
limits.gpu_memory); RAM = min(available, limits.ram) split evenly between the workers; disk = free
space at the probed disk path, split evenly between the workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from flexorch.contract.choices import DeviceKind, KVCompression, Storage, on_cpu
from flexorch.contract.protocol import LAYOUT_CACHE_BYTES, ScoreKind
from flexorch.orchestrator.hardware import Hardware, format_bytes
from flexorch.orchestrator.planner.model import _Job, _Load, _Model, _Setup
from flexorch.orchestrator.spec import JobSpec

# The worker's fixed RAM, the CUDA context and the safety margin are figures (orchestrator/figures.py):
# measured by calibration where it ran, else assumed there.
# The loader reads into one pinned staging buffer and waits for its copy before reusing it
# (workers/prefetch.py), so one stored shard of pinned RAM per CUDA worker.
STAGING_BUFFERS = 1

# MLP intermediates alive at once: gate, up and their product (SwiGLU).
MLP_INTERMEDIATES = 3

# Hidden-sized tensors of one decoder forward: q, k, v, attention output, residual, normed input
# (k and v are smaller with grouped-query attention: counting them full is conservative).
HIDDEN_COPIES = 6

# Attention scores are softmaxed in float32 beside their compute-dtype copy.
SCORE_EXTRA_BYTES = 4

# The head holds float32 logits and their softmax for every scored position.
LOGIT_COPIES = 2

# The disk store overwrites each batch's file in place (one copy); counting two leaves room for the
# file being rewritten, filesystem slack, and a crash-safe write-then-rename store later.
DISK_COPIES = 2


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


def _peaks(job: _Job, setup: _Setup, load: _Load, longest: int) -> _Peaks:
    """Peak device memory, RAM and disk of a worker running a round costing `load` whose longest
    row is `longest` tokens."""
    m, cuda = job.model, not on_cpu(setup.device)
    per_token = m.hidden * m.dtype_bytes
    kept = m.kv_token_bytes(setup.kv_compression)  # one token in one layer's cache, as its tier keeps it
    # a streamed MoE layer's batches wait with the activations (on the device only with storage gpu)
    activations = math.ceil(load.act_tokens * per_token)
    pending = math.ceil(load.act_tokens * m.pending_per_token)
    cache = math.ceil(load.cache_peak * m.num_layers * kept)  # 0: one step, no cache
    in_flight = 2 * setup.batch * per_token + (_cache_in_flight(m, setup) if cache else 0)
    cache_read_ahead = math.ceil(setup.lps * setup.batch * kept) if cache else 0  # disk: the next batch's
    # every batch's additive mask (rows x L x L ~ its padded tokens x L), kept for the pass while it fits
    layouts = min(LAYOUT_CACHE_BYTES, math.ceil(load.act_tokens * min(longest, setup.batch or longest) * m.dtype_bytes))
    next_token = job.spec.score.kind is ScoreKind.NEXT_TOKEN_PROBS  # its output is the vocabulary-wide row
    columns = m.vocab if next_token else m.head_columns(setup.lps)
    compute = (m.resident_weights(setup.lps, setup.resident, setup.slots) + in_flight + layouts
               + (_working_bytes(m, setup.batch, longest, job.scored_ratio, columns, _edges(m, setup, load, job))
                  if setup.batch else 0))
    ram = int(job.figures.base_ram[DeviceKind.of(setup.device)].value) + load.result_bytes
    ram += STAGING_BUFFERS * _pinned(m.stored_shard(setup.lps)) if cuda else compute
    held = activations + cache  # in RAM with storage cpu: on a GPU worker, pinned batch by batch
    if cuda and setup.storage is Storage.CPU and setup.batch:
        batches = math.ceil(load.act_tokens / setup.batch)
        # a batch's keys and values in one layer (compressed: its codes and ranges) are the cache's unit
        blocks = [math.ceil(setup.batch * part) for part in m.kv_parts(setup.kv_compression)]
        pinned = math.ceil(cache * sum(_pinned(b) for b in blocks) / sum(blocks)) if cache else 0
        held = batches * _pinned(setup.batch * per_token) + pinned
    # RAM of what waits between shards: all of it with storage cpu, with disk the batch in flight and the
    # next batch's cache; the MoE batches pending wait beside it unless on the device (NO_STORAGE: no tier)
    ram += {Storage.CPU: held, Storage.DISK: in_flight + cache_read_ahead}.get(setup.storage, 0)
    on_device = setup.storage is Storage.GPU
    ram += 0 if on_device else pending
    waiting = activations + pending + cache if on_device else 0
    device = int(job.figures.cuda_context.value) + compute + waiting if cuda else 0
    disk = DISK_COPIES * activations + cache if setup.storage is Storage.DISK else 0
    return _Peaks(device=device, ram=ram, disk=disk)


def _cache_in_flight(m: _Model, setup: _Setup) -> int:
    """Compute-device bytes of the cache of the batch in flight in one layer: read and joined with the
    new token's (2 copies in the compute dtype); compressed, also its codes as read and the float32
    copy quantising and restoring go through."""
    held = 2 * setup.batch * m.kv_bytes
    if setup.kv_compression is KVCompression.NONE:
        return held
    return held + math.ceil(setup.batch * (m.kv_token_bytes(setup.kv_compression) + m.kv_bytes * 4 / m.dtype_bytes))


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
                                   + (m.vocab * 4 if job.spec.score.kind is ScoreKind.NEXT_TOKEN_PROBS else 0)))
    if m.embed_row and not setup.resident:
        gathered = max(0, math.ceil(min(m.vocab, load.act_tokens)) * m.embed_row - m.stored_shard(setup.lps))
    return _Edges(held, gathered)


def _pinned(size: int) -> int:
    """Host bytes that pinning `size` takes: torch's pinned-memory allocator rounds every block up
    to a power of two (a 1.71 GB staging buffer pins 2 GiB)."""
    return 1 << max(size - 1, 0).bit_length() if size > 0 else 0


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


def _gpu(hardware: Hardware, device: str):
    return next(gpu for gpu in hardware.gpus if f"cuda:{gpu.index}" == device)


def _gpu_budget(hardware: Hardware, device: str, spec: JobSpec, safety: float) -> int | None:
    if on_cpu(device):
        return None
    return _usable(_cap(_gpu(hardware, device).free_memory, spec.limits.gpu_memory), safety)


def _cap(available: int, limit: int | None) -> int:
    return available if limit is None else min(available, limit)


def _usable(budget: int, safety: float) -> int:
    return int(budget * (1 - safety))
