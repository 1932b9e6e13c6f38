"""The planner's time model (orchestrator/planner/timing.py) on a hand-sized model: every rate and size
in a comment, every expected value exact.

The model, as stored: an embedding of 2 GB, 4 decoder layers of 1 GB, norm + head of 1.5 GB (float32,
8 wide). The machine: no calibration, a disk given at 1 GB/s, so each shard reads in its GB count of
seconds; one CPU thread computes 80 GFLOP/s at a batch of 1024 tokens (figures.CPU_FLOPS_PER_CORE, the
batch cap, where the assumed curve saturates). A round of 1024 tokens, all scored, is one batch: its
layers take 4 x 80 GFLOP (1 s per layer) and its head 40 GFLOP (0.5 s). Worker start-up 10 s (assumed).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from flexorch.contract.choices import KVCompression
from flexorch.orchestrator.figures import figures_of
from flexorch.orchestrator.hardware import Calibration, GpuInfo, Hardware
from flexorch.orchestrator.planner.model import _Job, _Load, _Model, _prompt_load, _Setup
from flexorch.orchestrator.planner.timing import (_per_shard, _read_rate, _shard_costs, _time, _verifying_read_factor,
                                                  _with_reads)
from flexorch.orchestrator.spec import JobSpec

GB = 10**9
RATE = 80e9  # FLOP/s of one CPU thread at 1024 tokens per forward
MODEL = _Model(num_layers=4, hidden=8, intermediate=16, heads=2, vocab=100, dtype_bytes=4, kv_bytes=64, layer=GB,
               edge=0, stored_layer=GB, stored_edge=0, converted=False, bytes_per_pass=7_500_000_000,
               stored_shards=(2 * GB, GB, GB, GB, GB, 1_500_000_000), decoder_params=0, head_params=0,
               total=7_500_000_000)
ROUND = _Load(act_tokens=1024, layer_flops=4 * RATE, head_flops=0.5 * RATE, scored=1024)
START = 10.0


def machine(ram: int = 64 * GB, cpus: int = 8, gpu: bool = False, calibration: Calibration | None = None) -> Hardware:
    gpus = (GpuInfo(index=0, name="NVIDIA GeForce RTX 2060", total_memory=6 * GB, free_memory=6 * GB, pcie_gen=3,
                    pcie_width=16),) if gpu else ()
    return Hardware(gpus=gpus, ram_total=ram, ram_available=ram, cpu_count=cpus, disk_path="/data",
                    disk_free=500 * GB, disk_read_bytes_per_s=1e9, calibration=calibration)


def job(loads=(ROUND,), steps: int = 1, hardware: Hardware | None = None, **fields) -> _Job:
    spec = JobSpec(path="job.yaml", model="m", prompts="p.jsonl", output="o.pkl", job_dir="o.job",
                   generate_tokens=steps)
    return _Job(spec=spec, model=MODEL, dtype="float32", tokens=(1024,) * len(loads), lengths=(1024,) * len(loads),
                loads=tuple(loads), scored_ratio=1.0, figures=figures_of(hardware or machine()), token_flops=0.0,
                token_attention=0.0, **fields)


def test_per_shard_overlaps_a_read_with_the_compute_before_it_only_with_two_slots():
    compute, reads = (1.0, 2.0, 3.0), (5.0, 1.0, 1.0)
    # shard k computes while shard k+1 is read; the last while `after_last` (0.5) is
    assert _per_shard(compute, reads, 0.5, slots=2) == [1.0, 2.0, 3.0]
    assert _per_shard((1.0, 0.5, 0.1), reads, 0.5, slots=2) == [1.0, 1.0, 0.5]
    # one slot: each read waits for the compute before it
    assert _per_shard(compute, reads, 0.5, slots=1) == [2.0, 3.0, 3.5]


# Per shard, one layer per shard: reads (2, 1, 1, 1, 1, 1.5) s, compute (0, 1, 1, 1, 1, 0.5) s (the
# embedding is a lookup; activations in RAM on a CPU worker cost no copy).
READ, COMPUTE = 7.5, 4.5


def test_one_round_with_two_slots_reads_the_first_shard_then_overlaps():
    # the embedding's read (2), then max(compute k, read k+1): 1, 1, 1, 1, 1.5, 0.5 = 6 -> 8 s streaming;
    # reading dominates (7.5 s), so 0.5 s of it is not hidden: the fill
    t = _time(job(), _Setup("cpu", 1, 1024, "cpu"), (0,), ((0,),), threads=1, stages=1)
    assert (t.read, t.compute, t.fill, t.start) == (READ, COMPUTE, 0.5, START)
    assert t.total == START + 0.5 + READ


def test_one_slot_adds_every_read_to_the_compute_before_it():
    # 2 + (0 + 1) + (1 + 1) x 3 + (1 + 1.5) + 0.5 = 12 s streaming, 4.5 of it beyond the reading
    t = _time(job(), _Setup("cpu", 1, 1024, "cpu", slots=1), (0,), ((0,),), threads=1, stages=1)
    assert (t.read, t.compute, t.fill) == (READ, COMPUTE, 4.5)


def test_layers_per_shard_group_the_reads_and_the_compute():
    # two layers per shard: reads (2, 2, 2, 1.5), compute (0, 2, 2, 0.5); streaming 2 + 2 + 2 + 2 + 0.5:
    # the second group's compute (2 s) now waits beside the head's shorter read (1.5 s)
    t = _time(job(), _Setup("cpu", 2, 1024, "cpu"), (0,), ((0,),), threads=1, stages=1)
    assert (t.read, t.compute, t.fill) == (READ, COMPUTE, 1.0)


def test_every_round_rereads_the_model_unless_it_is_resident():
    two = job(loads=(ROUND, ROUND))
    streamed = _time(two, _Setup("cpu", 1, 1024, "cpu"), (0, 1), ((0,), (1,)), threads=1, stages=1)
    assert (streamed.read, streamed.compute, streamed.fill) == (2 * READ, 2 * COMPUTE, 2 * 0.5)
    # resident: the second round reads nothing and computes 4.5 s; 12.5 s streaming, computing (9 s) dominates
    resident = _time(two, _Setup("cpu", 1, 1024, "cpu", resident=True), (0, 1), ((0,), (1,)), threads=1, stages=1)
    assert (resident.read, resident.compute, resident.fill) == (READ, 2 * COMPUTE, 8.0 + 4.5 - 2 * COMPUTE)


def test_a_later_generation_step_computes_a_token_per_suffix_and_reads_the_model_again():
    # 2 steps; the later one: 4 suffixes, one token each (80 GFLOP through the layers, 8 through the head)
    # at a batch of 4 tokens, where the assumed curve gives 80e9 x (4 / 104) / (1024 / 1124)
    later = replace(ROUND, later_layer_flops=RATE, later_head_flops=0.1 * RATE, suffixes=4)
    t = _time(job(loads=(later,), steps=2), _Setup("cpu", 1, 1024, "cpu"), (0,), ((0,),), threads=1, stages=1)
    slow = (4 / 104) / (1024 / 1124)
    assert t.read == 2 * READ
    assert t.compute == pytest.approx(COMPUTE + 1.1 / slow)


def test_a_prompt_moves_its_cache_over_its_own_steps_spread_over_the_rounds():
    # 100 tokens, 2 suffixes, 5 steps of its own in a round of 9: step 0 writes the row (100), later step t
    # reads the row and 2 x (t - 1) generated columns and writes 2 x t: 5 x 100 + 2 x 4^2 = 532 tokens per
    # layer, over the round's 8 later steps, padded (x 1.25): 83.125 per later step
    spec = JobSpec(path="job.yaml", model="m", prompts="p.jsonl", output="o.pkl", job_dir="o.job")
    assert _prompt_load(MODEL, spec, 100, 2, 2, own_steps=5, steps=9).cache_traffic == 83.125
    assert _prompt_load(MODEL, spec, 100, 2, 2, own_steps=1, steps=1).cache_traffic == 0.0  # one step: no cache


# 64-wide heads, as in test_planner_memory: 512 bytes per token and layer as computed, int8 144, int4 80
KV_MODEL = replace(MODEL, kv_bytes=512, kv_heads=1, key_dim=64, value_dim=64)


@pytest.mark.parametrize("device, storage, compression, seconds_per_layer", [
    ("cpu", "cpu", "none", 0.0),  # a CPU worker's RAM is its device: nothing moves
    ("cpu", "disk", "none", 1e6 * 512 / 2e9),  # through files at the disk store's 2 GB/s
    # the codes move (144 bytes a token), and 512 bytes a token are quantised and restored at 0.12 GB/s
    ("cpu", "disk", "int8", 1e6 * 144 / 2e9 + 1e6 * 512 / 0.12e9),
    ("cuda:0", "cpu", "none", 1e6 * 512 / 12.64e9),  # over PCIe gen3 x16 (16 x 0.79 GB/s)
    ("cuda:0", "cpu", "int4", 1e6 * 80 / 12.64e9 + 1e6 * 512 / 100e9),
    ("cuda:0", "gpu", "none", 0.0),  # on the device
])
def test_a_later_step_moves_its_kv_cache_in_the_bytes_its_tier_keeps(device, storage, compression, seconds_per_layer):
    # a round whose later steps read and write 1e6 tokens of cache per layer: the same round without, less
    load = replace(ROUND, later_layer_flops=RATE, suffixes=4, cache_traffic=1e6)
    kv_job = replace(job(steps=2, hardware=machine(gpu=device != "cpu")), model=KV_MODEL)
    setup = _Setup(device, 1, 1024, storage, kv_compression=compression)
    costs = [_shard_costs(kv_job, setup, x, 1, 1) for x in (load, replace(load, cache_traffic=0.0))]
    extra = [a - b for a, b in zip(costs[0].later_step, costs[1].later_step)]
    assert extra == pytest.approx([0.0] + [seconds_per_layer] * 4 + [0.0])  # each decoder layer, not the edges
    assert costs[0].first_step == costs[1].first_step  # step 0's cache is written as part of the traffic


def test_a_pipeline_stage_reads_and_computes_its_share():
    t = _time(job(), _Setup("cpu", 1, 1024, "cpu"), (0,), ((0,),), threads=1, stages=2)
    assert (t.read, t.compute) == (READ / 2, COMPUTE / 2)


def test_the_read_rate_is_the_disks_or_the_pcie_links_if_slower():
    assert _read_rate(job(), "cpu") == 1e9
    # PCIe gen3 x16: 16 x 0.79 GB/s = 12.64 GB/s is faster than the disk
    assert _read_rate(job(hardware=machine(gpu=True)), "cuda:0") == 1e9
    slow_link = replace(machine(gpu=True), gpus=(replace(machine(gpu=True).gpus[0], pcie_width=1),))
    assert _read_rate(job(hardware=slow_link), "cuda:0") == 0.79e9


def test_hashing_unverified_files_slows_the_first_pass_by_their_share():
    # half the bytes unverified; sha256 1 GB/s (assumed) beside a 1 GB/s read: with a spare core (8 cores,
    # 1 compute thread + loader + hash) the slower sets the rate, 1 GB/s: no slower
    assert _verifying_read_factor(job(unverified_share=0.5), "cpu", threads=1) == 1.0
    # 2 cores: they take turns, 1 / (1/1 + 1/1) = 0.5 GB/s, so the hashed half reads twice as long
    assert _verifying_read_factor(job(hardware=machine(cpus=2), unverified_share=0.5), "cpu",
                                  threads=1) == pytest.approx(1.5)


def test_reads_go_around_the_page_cache_only_for_a_model_larger_than_the_ram():
    # the model is 7.5 GB
    fits, why = _with_reads(job(), machine(ram=64 * GB), readers=1)
    assert not fits.direct_reads and why.startswith("reads: through the page cache: the model (7.50 GB) fits")
    larger, why = _with_reads(job(hardware=machine(ram=4 * GB)), machine(ram=4 * GB), readers=1)
    assert larger.direct_reads and why.startswith("reads: direct (O_DIRECT): the model (7.50 GB) is larger")
    shared, why = _with_reads(job(), machine(ram=4 * GB), readers=2)
    assert not shared.direct_reads and "2 workers read every layer file in step" in why
