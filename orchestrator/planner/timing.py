"""The time model: a worker's predicted seconds for one setup and its rounds (`_time`).

Seconds; rates from figures.py: measured by calibration, else assumed.
start-up + per round: the first shard's read, then per shard of each pass the longer of computing it
and reading the next (two slots: the loader is at most one shard ahead; the last shard of a
generation step overlaps the next step's first read). Reads: a shard's stored bytes / read rate (the
disk's, through the page cache or, for a model larger than the RAM read by one worker per file,
around it: `_with_reads`; or the PCIe link's if slower; a worker's first pass also hashes the files
not verified yet, beside the read or taking turns with it where no core is spare); resident: the
first pass only. Compute: FLOPs (model.py) / throughput at the tokens each forward carries (a
batch's share of the round; the head's scored rows; a later step's one token per suffix) for layers
of the model's FLOPs per token (a narrow layer runs far below a wide one's rate: figures.py prices a
forward as a fixed cost plus a cost per FLOP); on a GPU each layer forward also costs the engine a
fixed time beyond the calibrated layer's (figures.GPU_FORWARD_SECONDS, so larger batches run faster
there, as measured); each shard boundary also moves every batch's activations over the host-device
link where they wait off the GPU, and through files with the disk store; so does the KV cache each
later generation step reads and writes (`_Load.cache_traffic`, in the bytes its tier keeps), and a
compressed cache is quantised and restored on the way (KV_CODEC_BYTES_PER_S). Reported apart: reading and
computing totals, and the fill (what the overlap does not hide). A pipeline stage reads and computes
1/n of each shard (the fill and drain of each step, and the channel copies, are not counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from flexorch.contract.choices import DeviceKind, KVCompression, Storage, on_cpu
from flexorch.contract.shards import decoder_groups, shard_bytes
from flexorch.orchestrator.figures import GPU_FORWARD_SECONDS
from flexorch.orchestrator.hardware import Hardware, format_bytes
from flexorch.orchestrator.planner.model import DOUBLE_BUFFER, _Job, _Load, _Setup

# The disk store serializes each batch to a file and parses it back on the worker's CPU (about four
# memory copies per byte written and read, ~8 GB/s each): work the compute waits for or shares cores
# with, whatever the disk's speed. Assumed, not measured.
DISK_STORE_COPY_BYTES_PER_S = 2e9

# Quantising a compressed KV cache block as it is put and restoring it as it is read (workers/kvcache.py)
# are ~10 elementwise passes over its values, in bytes of the compute dtype per second. CPU, per thread:
# measured on a loaded 2-core EPYC on float32 (put + read) at 0.12 GB/s for int8 and 0.06 for int4 (its
# nibbles unpacked), bfloat16 slower still (0.03); the float32 figures are taken. GPU: assumed memory-bound,
# 100 GB/s (not measured).
KV_CODEC_BYTES_PER_S = {KVCompression.INT8: {DeviceKind.CPU: 0.12e9, DeviceKind.CUDA: 100e9},
                        KVCompression.INT4: {DeviceKind.CPU: 0.06e9, DeviceKind.CUDA: 100e9}}


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


def _time(job: _Job, setup: _Setup, indices: tuple[int, ...], rounds, threads: int, stages: int) -> _Time:
    """See the module docstring's time model: per round, the first shard's read, then each shard of
    each pass as `_per_shard` counts it."""
    steps, stream, read, compute = job.steps, 0.0, 0.0, 0.0
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
    busy = (threads if on_cpu(device) else 1) + 2  # compute, loader, hash
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
    per_byte = _move_seconds_per_byte(job, setup)
    move = 2 * load.act_tokens * m.hidden * m.dtype_bytes / stages * per_byte
    # a later step's cache per layer: moved in the bytes its tier keeps, quantised and restored on the way
    cache = load.cache_traffic / stages * (m.kv_token_bytes(setup.kv_compression) * per_byte
                                          + m.kv_bytes / _codec_rate(setup, threads))

    # each layer forward's fixed cost on a GPU, once per batch (figures.GPU_FORWARD_SECONDS); on a CPU
    # the calibrated forwards carry theirs
    forwards = batches * (0.0 if on_cpu(setup.device) else GPU_FORWARD_SECONDS) / stages

    def per_shard(layers: float, head: float, cached: float) -> tuple[float, ...]:
        decoders = [len(g) / m.num_layers * layers + len(g) * (forwards + cached) + move for g in groups]
        return (move, *decoders, head)

    return _ShardCosts(reads, per_shard(load.layer_flops / rate(load.act_tokens), load.head_flops / rate(load.scored),
                                        0.0),
                       per_shard(load.later_layer_flops / rate(load.suffixes),
                                 load.later_head_flops / rate(load.suffixes), cache))


def _move_seconds_per_byte(job: _Job, setup: _Setup) -> float:
    """What waits off the compute device crosses to it and back: through files with the disk store
    (serialised on the worker's CPU), over the host-device link from RAM or disk on a GPU."""
    seconds = 1.0 / DISK_STORE_COPY_BYTES_PER_S if setup.storage is Storage.DISK else 0.0
    if not on_cpu(setup.device) and setup.storage is not Storage.GPU:
        seconds += 1.0 / job.figures.host_to_device(setup.device).value
    return seconds


def _codec_rate(setup: _Setup, threads: int) -> float:
    """Bytes per second (compute dtype) a compressed cache is quantised and restored at; inf: uncompressed."""
    rates = KV_CODEC_BYTES_PER_S.get(setup.kv_compression)
    if rates is None:
        return math.inf
    kind = DeviceKind.of(setup.device)
    return rates[kind] * (max(1, threads) if kind.is_cpu else 1)


def _per_shard(compute: Sequence[float], reads: Sequence[float], after_last: float, slots: int) -> list[float]:
    """Each shard's time in a pass whose first shard is loaded: with two slots shard k computes while
    shard k+1 is read (the last while `after_last` is: the next pass's first shard, or nothing), the
    longer counts; with one slot each read waits for the compute before it, both count."""
    nexts = list(reads[1:]) + [after_last]
    join = max if slots == DOUBLE_BUFFER else (lambda c, r: c + r)
    return [join(c, r) for c, r in zip(compute, nexts)]


def _pass_shares(job: _Job, setup: _Setup, indices: tuple[int, ...], threads: int) -> tuple[float, ...]:
    """Each shard's share of one pass's predicted time, for progress (the first step's, as `_time`
    counts it: `_per_shard`); the first shard also its own read."""
    costs = _shard_costs(job, setup, sum((job.loads[i] for i in indices), _Load()), threads, 1,
                         read=not setup.resident)
    shares = _per_shard(costs.first_step, costs.reads, 0.0, setup.slots)
    shares[0] += costs.reads[0]
    total = sum(shares) or 1.0
    return tuple(c / total for c in shares)


def _rate(job: _Job, device: str, threads: int, batch: int) -> float:
    """FLOP/s through this model's layers (their FLOPs per token, or else their width) at `batch`
    tokens per forward."""
    return job.figures.flops(device, job.dtype, threads, batch, job.model.hidden, job.token_flops,
                             job.token_attention)


def _read_rate(job: _Job, device: str) -> float:
    """Weights come from the disk, then on a GPU over its PCIe link: the slower one sets the rate."""
    disk = (job.figures.direct_read if job.direct_reads else job.figures.disk_read).value
    return disk if on_cpu(device) else min(disk, job.figures.host_to_device(device).value)


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
