"""The planner on described machines: hand-sized manifests (sizes in comments), exact decisions.

Units: GB = 10^9 bytes (what `limits: 6GB` means), GiB = 2^30.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import math

import pytest

from flexorch.orchestrator.hardware import Calibration, GpuInfo, Hardware, Node, format_bytes
from flexorch.orchestrator.planner import Plan, make_cluster_plan, make_plan
from flexorch.orchestrator.planner.model import _active_params
from flexorch.orchestrator.render import render_plan
from flexorch.orchestrator.shapes import llama3_70b, llama_shaped_manifest, mixtral_8x7b
from flexorch.orchestrator.spec import JobSpec, Limits, ScoreSettings
from flexorch.contract.errors import UserError
from flexorch.contract.manifest import Manifest
from flexorch.contract.protocol import HEAP_SLACK

GB, GiB, MiB = 10**9, 2**30, 2**20


# -- described models, machines and jobs ---------------------------------------------------------
def llama_manifest(layers: int, hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int,
                   dtype: str = "float16", tied: bool = False) -> Manifest:
    """A Llama-shaped manifest: sizes computed from the shapes, no files."""
    return llama_shaped_manifest(layers, hidden, intermediate, vocab, heads, kv_heads, dtype, tied)


def llama2_70b() -> Manifest:
    # Llama-2-70B, fp16. Per decoder layer: q, o 8192x8192 (2 x 67,108,864), k, v 8192x1024 (GQA, 8 kv heads:
    # 2 x 8,388,608), gate/up/down 8192x28672 (3 x 234,881,024), 2 norms (16,384) = 855,654,400 params
    # = 1,711,308,800 bytes (1.71 GB). Embedding and head 32000x8192 = 524,288,000 bytes each.
    # One pass reads 80 x 1,711,308,800 + 2 x 524,288,000 + 16,384 = 137,953,296,384 bytes.
    return llama_manifest(80, 8192, 28672, 32000, heads=64, kv_heads=8)


def llama2_13b() -> Manifest:
    # Llama-2-13B, fp16: 40 layers of 5120 x 5120 attention (4 x 26,214,400) and 5120x13824 MLP
    # (3 x 70,778,880) + norms (10,240) = 317,194,240 params = 634,388,480 bytes per layer.
    return llama_manifest(40, 5120, 13824, 32000, heads=40, kv_heads=40)


def small_fp32() -> Manifest:
    # 16 layers x 1024 wide fp32 (the CPU benchmark's shape): 1024x1024 attention (4 x 1,048,576),
    # 1024x2816 MLP (3 x 2,883,584), norms 2048 = 12,847,104 params = 51,388,416 bytes per layer;
    # embedding and head 32000x1024 = 131,072,000 bytes each (bigger than a decoder layer).
    return llama_manifest(16, 1024, 2816, 32000, heads=16, kv_heads=16, dtype="float32")


def gpu(index: int, name: str, memory: int, free: int | None = None) -> GpuInfo:
    return GpuInfo(index=index, name=name, total_memory=memory, free_memory=memory if free is None else free,
                   pcie_gen=3, pcie_width=16)


def machine(*gpus: GpuInfo, ram: int = 64 * GB, cpus: int = 8, disk_free: int = 500 * GB) -> Hardware:
    return Hardware(gpus=tuple(gpus), ram_total=ram, ram_available=ram, cpu_count=cpus, disk_path="/data",
                    disk_free=disk_free)


def job_spec(**fields) -> JobSpec:
    """A real JobSpec of a described job: its paths name files nothing reads."""
    paths = {"path": Path("job.yaml"), "model": Path("model.layers"), "prompts": Path("prompts.jsonl"),
             "output": Path("out/scores.pkl"), "job_dir": Path("out/scores.job")}
    return JobSpec(**(paths | fields))


Spec = job_spec  # the name test_pipeline, test_calibrate, test_compression and test_engine import


SMALL_GPU = gpu(0, "NVIDIA GeForce RTX 2060", 6 * GiB, free=6 * GB)
WORKSTATION_LIMITS = Limits(gpu_memory=6 * GB, ram=8 * GB)


# -- a 70B model on a 6 GB GPU with 8 GB of RAM --------------------------------------------------
def test_70b_on_a_6gb_gpu_streams_one_layer_at_a_time_with_activations_in_ram():
    # 400 prompts of 300 packed tokens, 4 suffixes each (the default count).
    plan = make_plan(machine(SMALL_GPU), llama2_70b(), job_spec(limits=WORKSTATION_LIMITS), [300] * 400)
    (worker,) = plan.workers
    assert (plan.parallel, plan.dtype, worker.device) == ("data", "float16", "cuda:0")
    # GPU budget: min(6 GB free, 6 GB limit) less 10% = 5.4 GB. At batch 4096, one layer per shard:
    #   CUDA context                                           671,088,640
    #   two shards of 1,711,308,800                          3,422,617,600
    #   batch in flight: 2 x 4096 x 8192 x 2                   134,217,728
    #   working: MLP + hidden copies (3x28672 + 6x8192) x 4096 x 2 = 1,107,296,256 (sdpa's kernel on a GPU
    #            holds no attention scores), mask 4096 x 300 x 2 = 2,457,600  1,109,753,856
    #   masks kept for the pass: 101 prompts x 375 padded tokens x 300 x 2        22,725,000
    #   total                                                5,360,402,824  <= 5.4 GB
    # batch 8192 would double the batch's share (6.6 GB > 5.4 GB); two layers per shard add 3.4 GB.
    # Smaller batches fit too but run slower (2048: 17.6 min against 15.9; 1024: 21.1): the fastest is kept.
    assert worker.settings.batch_tokens == 4096
    assert worker.settings.layers_per_shard == 1
    assert worker.predicted_peak_device_memory == 5_360_402_824
    # Rounds: one pass reads 137.95 GB at 2 GB/s (default disk; PCIe gen3 x16 is faster) = 69 s, x4 = 276 s,
    # so the target is 300 s of compute at 20 TFLOP/s (unknown card) x 4096 / (4096 + 512) / (16384 / (16384 + 512))
    # (a 4096-token batch runs at 92% of the card's rate) = 5.50e15 FLOPs; a prompt costs
    # 2 x (80 x 855,654,400 x 300 + 262,144,000 x 4 scored) + attention 4 x 80 x 8192 x 300 x 300 = 4.131e13
    # FLOPs -> at most 133 prompts per round: 4 rounds, evened out (a last round of one prompt would read the
    # whole model for it).
    assert [len(r) for r in worker.rounds] == [101, 101, 101, 97]
    assert worker.rounds[0][0] == 0 and worker.rounds[-1][-1] == 399
    # The largest round's activations, 101 x 300 x 1.25 (padding) x 8192 x 2 = 620,544,000, do not fit beside the
    # shards (5.36 + 0.62 > 5.4 GB) but do in RAM (budget 8 GB less 10% = 7.2 GB). Pinned memory comes in powers of
    # two (torch's allocator rounds each block up): the 1,711,308,800-byte staging buffer takes 2 GiB, and each of
    # the round's 10 batches of 4096 tokens takes 4096 x 8192 x 2 = 67,108,864 bytes:
    #   base 1 GiB 1,073,741,824 + pinned staging 2,147,483,648 + activations 671,088,640
    #   + scores 101 x 4 suffixes x 32000 x 4 = 51,712,000                          = 3,944,026,112
    assert worker.settings.storage == "cpu"
    assert worker.predicted_peak_ram == 3_944_026_112
    # The embedding reads only the rows of a round's token ids (at most one per padded token): here the whole
    # table every round (97 x 375 padded tokens > 32000 rows).
    embeds = [524_288_000 * min(1.0, len(r) * 375 / 32000) for r in worker.rounds]
    assert worker.predicted_read_seconds == pytest.approx((4 * (137_953_296_384 - 524_288_000) + sum(embeds)) / 2e9)
    # Compute: each forward at the rate of the tokens it carries (a round's padded tokens split into
    # 4096-token batches; the head's rows are the batch's 4 scored positions per prompt) and each layer
    # forward's fixed 0.8 ms on a GPU, plus each batch's activations to RAM and back at every one of the
    # 81 shard boundaries, over PCIe gen3 x16 (12.6 GB/s).
    def rate(tokens):
        return 20e12 * (tokens / (tokens + 512)) / (16384 / 16896)

    def compute(n):
        batches = math.ceil(n * 375 / 4096)
        layers = n * (2 * 80 * 855_654_400 * 300 + 4 * 80 * 8192 * 300 * 300) / rate(round(n * 375 / batches))
        return layers + batches * 80 * 0.8e-3 + n * 2 * 262_144_000 * 4 / rate(round(n * 4 / batches))

    assert worker.predicted_compute_seconds == pytest.approx(sum(compute(len(r)) for r in worker.rounds)
                                                             + 81 * 2 * 400 * 375 * 8192 * 2 / (16 * 0.79e9))
    # Before the double buffer runs, each round reads the embedding and the first layer (2.24 GB at 2 GB/s), less
    # what the embedding's sending of the round's activations hides (0.12 s a full round); the worker's start-up
    # is assumed (nothing calibrated on a described machine).
    sends = sum(2 * len(r) * 375 * 8192 * 2 / (16 * 0.79e9) for r in worker.rounds)
    assert worker.predicted_fill_seconds == pytest.approx((sum(embeds) + 4 * 1_711_308_800) / 2e9 - sends, rel=0.01)
    assert worker.predicted_start_seconds == 10.0
    assert any("storage cpu (auto)" in r for r in worker.reasons)


def test_a_128k_vocabulary_70b_is_sized_by_its_decoder_layers_not_its_head():
    # Llama-3-70B: Llama-2-70B's layers (1,711,308,800 bytes) with a 128256 x 8192 embedding and head of
    # 2,101,346,304 bytes. The head comes in steps that fit a layer's slot, so the GPU peak is the 32k
    # model's (see the test above): while the head runs, its logits (2 x 55 scored positions of a 4096-token
    # batch x 104,448 rows a step x 4 = 45,957,120) and, between its steps, a round's 101 x 375 x 4 / 300 =
    # 505 scored positions' normed hidden states and logits so far (505 x (8192 x 2 + 128256 x 4) =
    # 267,351,040) stay below a decoder layer's 1,109,753,856 of working memory. Two slots of the whole norm +
    # head would have added 2 x 390,053,888: 6,140,510,600 bytes, which does not fit in 5.4 GB.
    plan = make_plan(machine(SMALL_GPU), llama3_70b(), job_spec(limits=WORKSTATION_LIMITS), [300] * 400)
    (worker,) = plan.workers
    assert (worker.settings.batch_tokens, worker.settings.layers_per_shard) == (4096, 1)
    assert [len(r) for r in worker.rounds] == [101, 101, 101, 97]
    assert worker.predicted_peak_device_memory == 5_360_402_824
    # RAM: the pinned staging is one layer too; the scores grow with the vocabulary (101 x 4 x 96256 x 4 more)
    assert worker.predicted_peak_ram == 3_944_026_112 + 101 * 4 * (128256 - 32000) * 4


def test_70b_with_less_ram_keeps_activations_on_the_gpu_in_smaller_batches():
    # RAM 3.7 GB (3.33 GB usable) and 1000-token prompts: base + staging (1 GiB + 2 GiB: the 1.71 GB staging
    # buffer pinned, rounded up to a power of two) leave no room for a round's activations in RAM. On the
    # GPU, a 4096-token batch leaves room for rounds of 37 prompts; more rounds re-read the weights, which
    # beats writing and reading 81 x 2 activations per pass through the disk. A 2048-token batch would leave
    # room for longer rounds but pays each forward's fixed cost twice (70.8 min against 64.1).
    spec = job_spec(limits=Limits(gpu_memory=6 * GB, ram=3_700_000_000))
    (worker,) = make_plan(machine(SMALL_GPU), llama2_70b(), spec, [1000] * 400).workers
    assert (worker.settings.storage, worker.settings.batch_tokens) == ("gpu", 4096)
    assert [len(r) for r in worker.rounds] == [37] * 10 + [30]
    assert worker.predicted_peak_device_memory <= 0.9 * 6 * GB and worker.predicted_peak_ram <= 0.9 * 3.7 * GB
    # 3.3 GB would not hold the pinned staging buffer beside the worker's own RAM.
    with pytest.raises(UserError, match=r"a shard of 1.71 GB .* needs 3.22 GB of RAM"):
        make_plan(machine(SMALL_GPU), llama2_70b(), job_spec(limits=Limits(gpu_memory=6 * GB, ram=3_300_000_000)),
                  [1000] * 400)


def test_a_disk_too_small_for_disk_storage_is_an_error():
    # The smallest useful round is sized at the smallest batch (300 tokens: the slowest rate, so the fewest
    # prompts reach 4x the read time; attention counted): 50 prompts, two copies of 50 x 375 x 8192 x 2 bytes on disk.
    spec = job_spec(limits=Limits(gpu_memory=6 * GB, ram=4 * GB), storage="disk")
    with pytest.raises(UserError, match=r"storage: disk does not hold the smallest useful round on cuda:0 \(50 "
                                        r"prompt\(s\).*disk needs 614.40 MB of disk"):
        make_plan(machine(SMALL_GPU, disk_free=GB // 2), llama2_70b(), spec, [300] * 400)


def test_a_layer_that_cannot_be_double_buffered_runs_in_one_slot_and_one_that_cannot_fit_is_an_error():
    # Two 1.71 GB shards + the context need 4.09 GB; a 3 GB limit leaves 2.7 GB: one slot (each layer read after
    # the one before is computed) fits, with a 1024-token batch.
    (worker,) = make_plan(machine(SMALL_GPU), llama2_70b(), job_spec(limits=Limits(gpu_memory=3 * GB)), [300] * 4).workers
    assert (worker.settings.double_buffer, worker.settings.layers_per_shard) == (False, 1)
    assert worker.predicted_peak_device_memory <= 0.9 * 3 * GB
    # 2 GB leaves 1.8 GB: one 1.71 GB shard and the context do not fit.
    with pytest.raises(UserError, match=r"model: does not fit on cuda:0 even one layer at a time: a shard of 1.71 GB"):
        make_plan(machine(SMALL_GPU), llama2_70b(), job_spec(limits=Limits(gpu_memory=2 * GB)), [300] * 4)


# -- explicit values override auto, and must fit -------------------------------------------------
def test_explicit_layers_per_shard_that_does_not_fit_is_an_error_saying_what_fits():
    # two layers fit in one slot (3.4 GB of the 5.4 GB budget), three do not
    spec = job_spec(limits=WORKSTATION_LIMITS, layers_per_shard=3)
    with pytest.raises(UserError, match=r"layers_per_shard: 3 does not fit on cuda:0.*at most 2 fit"):
        make_plan(machine(SMALL_GPU), llama2_70b(), spec, [300] * 400)


def test_explicit_values_override_auto():
    spec = job_spec(limits=WORKSTATION_LIMITS, layers_per_shard=1, batch_tokens=1024, storage="disk")
    (worker,) = make_plan(machine(SMALL_GPU), llama2_70b(), spec, [300] * 400).workers
    s = worker.settings
    assert (s.layers_per_shard, s.batch_tokens, s.storage) == (1, 1024, "disk")
    assert "batch_tokens 1024 (from the job)" in worker.reasons


def test_explicit_batch_tokens_must_hold_the_longest_prompt_and_fit():
    with pytest.raises(UserError, match=r"batch_tokens: 256 is below prompt 1's 300 tokens"):
        make_plan(machine(SMALL_GPU), llama2_70b(), job_spec(limits=WORKSTATION_LIMITS, batch_tokens=256), [200, 300])
    # 16384 tokens of working memory (4.4 GB) do not fit beside a shard; the largest batch that does is 9935.
    with pytest.raises(UserError, match=r"batch_tokens: 16384 does not fit on cuda:0 .*at most 9935 fits"):
        make_plan(machine(SMALL_GPU), llama2_70b(), job_spec(limits=WORKSTATION_LIMITS, batch_tokens=16384), [200, 300])


def test_a_prompt_longer_than_any_batch_that_fits_is_an_error_naming_it():
    # Prompt 2's 12000 tokens as one forward: MLP and hidden copies 12000 x (3 x 28672 + 6 x 8192) x 2 = 3.2 GB
    # and its mask 12000 x 12000 x 2 = 0.29 GB do not fit beside two shards (sdpa's kernel on a GPU keeps no
    # scores: 6000 tokens would fit).
    with pytest.raises(UserError, match=r"prompts: prompt 2 \(12000 tokens\) is one forward pass and needs 6.37 GB"):
        make_plan(machine(SMALL_GPU), llama2_70b(), job_spec(limits=WORKSTATION_LIMITS), [300, 300, 12000, 300])


def test_storage_gpu_on_a_cpu_worker_is_an_error():
    with pytest.raises(UserError, match=r"storage: gpu needs a GPU device"):
        make_plan(machine(), small_fp32(), job_spec(storage="gpu"), [150] * 4)


# -- limits cap the budgets ----------------------------------------------------------------------
def test_limits_cap_gpu_memory_and_ram():
    big = gpu(0, "NVIDIA A100-SXM4-80GB", 80 * GB)
    free = make_plan(machine(big, ram=256 * GB), llama2_70b(), job_spec(), [300] * 400).workers[0]
    capped = make_plan(machine(big, ram=256 * GB), llama2_70b(), job_spec(limits=WORKSTATION_LIMITS),
                       [300] * 400).workers[0]
    # Without limits: 80 GB less 10% = 72 GB. 18 layers per shard would fit (2 x 18 x 1.71 = 61.6 GB) but buy
    # no time: reading is hidden behind compute, and a bigger first shard only delays the start. Batch 8192
    # would save 3.4 GB of working memory but is 3.3% slower (107.2 s against 103.8 s: a lower predicted rate,
    # 94% against 97%, and twice the forwards, each with its fixed cost), beyond the 3% tolerance.
    assert (free.settings.layers_per_shard, free.settings.batch_tokens, free.settings.storage) == (1, 16384, "gpu")
    # With the workstation's limits, the same machine plans like the 6 GB one.
    assert (capped.settings.layers_per_shard, capped.settings.batch_tokens, capped.settings.storage) == (1, 2048, "cpu")
    assert capped.predicted_peak_device_memory <= 0.9 * 6 * GB and capped.predicted_peak_ram <= 0.9 * 8 * GB


# -- two GPUs: data parallel, prompts balanced by tokens -----------------------------------------
def test_two_24gb_gpus_get_a_worker_each_with_prompts_balanced_by_tokens():
    gpus = (gpu(0, "NVIDIA GeForce RTX 3090", 24 * GB), gpu(1, "NVIDIA GeForce RTX 3090", 24 * GB))
    # 600 tokens in all: balanced by tokens, prompt 3 alone weighs as much as prompts 0-2 together.
    plan = make_plan(machine(*gpus), llama2_13b(), job_spec(), [100, 100, 100, 300])
    assert [w.device for w in plan.workers] == ["cuda:0", "cuda:1"]
    assert [w.prompt_indices for w in plan.workers] == [(0, 1, 2), (3,)]
    assert [w.name for w in plan.workers] == ["worker0", "worker1"]
    for w in plan.workers:
        # One layer per shard: with 300 tokens a worker reads far longer than it computes, and more layers per
        # shard read no faster (16 would need 20.3 GB, for a later start).
        assert (w.settings.layers_per_shard, w.settings.storage, w.settings.threads) == (1, "gpu", 0)
        assert w.predicted_peak_device_memory <= 0.9 * 24 * GB
    # Reading dominates: the batch shows only in the head's compute after the last read, and every batch is within
    # 10% of the least memory (the shards dominate it), so the fastest is kept.
    assert [w.settings.batch_tokens for w in plan.workers] == [512, 512]


def test_a_model_that_fits_whole_on_the_gpu_stays_resident_when_rereading_it_costs_time():
    # Llama-2-13B fp16 (26 GB) on an 80 GB A100, 8 prompts, 8 greedy steps: streaming reads the model once per
    # step (8 x 26 GB at the assumed disk's 2 GB/s = 104 s) for 7 s of compute; resident reads it once (13 s).
    big = gpu(0, "NVIDIA A100-SXM4-80GB", 80 * GB)
    (worker,) = make_plan(machine(big, ram=256 * GB), llama2_13b(), job_spec(generate_tokens=8), [300] * 8).workers
    assert worker.settings.resident and worker.settings.storage == "gpu"
    assert worker.predicted_read_seconds == pytest.approx(26_031_415_296 / 2e9, rel=1e-3)
    assert 26 * GB < worker.predicted_peak_device_memory < 0.9 * 80 * GB
    assert any(r.startswith("resident (auto): the whole model fits on cuda:0") for r in worker.reasons)
    # One step reads the model once either way: streaming needs less memory for the same time.
    (once,) = make_plan(machine(big, ram=256 * GB), llama2_13b(), job_spec(), [300] * 8).workers
    assert not once.settings.resident and once.settings.layers_per_shard == 1


def test_devices_listed_explicitly_and_missing_ones():
    gpus = (gpu(0, "NVIDIA GeForce RTX 3090", 24 * GB), gpu(1, "NVIDIA GeForce RTX 3090", 24 * GB))
    plan = make_plan(machine(*gpus), llama2_13b(), job_spec(devices=("cuda:1",)), [100] * 4)
    assert [w.device for w in plan.workers] == ["cuda:1"]
    with pytest.raises(UserError, match=r"devices: cuda:2 not present \(visible GPUs: cuda:0, cuda:1\)"):
        make_plan(machine(*gpus), llama2_13b(), job_spec(devices=("cuda:0", "cuda:2")), [100] * 4)


def test_more_devices_than_prompts_leaves_some_idle():
    plan = make_plan(machine(cpus=8), small_fp32(), job_spec(devices=("cpu", "cpu", "cpu")), [150, 150])
    assert [w.prompt_indices for w in plan.workers] == [(0,), (1,)]
    assert any("1 device(s) left idle" in r for r in plan.reasons)


# -- a Ray cluster (executor: ray) ----------------------------------------------------------------
def node(i: int, hardware: Hardware) -> Node:
    return Node(f"node{i}", f"10.0.0.{i + 1}", f"{i:056x}", hardware)


def test_cluster_devices_auto_are_every_gpu_of_every_node_named_by_node():
    rtx = "NVIDIA GeForce RTX 3090"
    nodes = (node(0, machine(gpu(0, rtx, 24 * GB), gpu(1, rtx, 24 * GB))), node(1, machine(gpu(0, rtx, 24 * GB))))
    plan = make_cluster_plan(nodes, llama2_13b(), job_spec(devices="auto", parallel="auto"), [100] * 6)
    assert [(w.device, w.node, w.settings.device) for w in plan.workers] == [
        ("node0:cuda:0", "node0", "cuda:0"), ("node0:cuda:1", "node0", "cuda:1"), ("node1:cuda:0", "node1", "cuda:0")]
    assert [w.prompt_indices for w in plan.workers] == [(0, 1), (2, 3), (4, 5)]
    assert plan.parallel == "data" and any("executor ray runs data mode only" in r for r in plan.reasons)
    assert plan.reasons[0].startswith("Ray cluster of 2 node(s): node0 10.0.0.1 (2 GPU, 8 cores")
    from rich.console import Console

    console = Console(record=True, width=100)
    render_plan(plan, console)
    assert "node1:cuda:0" in console.export_text()


def test_cluster_workers_share_their_own_nodes_cores_and_ram():
    # node0: 8 cores for two CPU workers; node1: 2 cores and 2 GB of RAM for one.
    nodes = (node(0, machine(cpus=8)), node(1, machine(cpus=2, ram=2 * GB)))
    spec = job_spec(devices=("node0:cpu", "node1:cpu", "node0:cpu"))
    plan = make_cluster_plan(nodes, small_fp32(), spec, [150] * 30)
    assert [(w.device, w.settings.threads) for w in plan.workers] == [("node0:cpu", 4), ("node1:cpu", 2),
                                                                      ("node0:cpu", 4)]
    # Slices weighted by throughput: node1's worker has half the cores of the others.
    assert [len(w.prompt_indices) for w in plan.workers] == [12, 6, 12]
    lps = [w.settings.layers_per_shard for w in plan.workers]
    # Each sized within its own node's RAM; one layer per shard everywhere (more buys no time on a CPU).
    assert lps == [1, 1, 1] and plan.workers[1].predicted_peak_ram <= 0.9 * 2 * GB
    # The same devices on one machine with both nodes' cores would split them evenly.
    assert make_plan(machine(cpus=10), small_fp32(), job_spec(devices=("cpu",) * 3), [150] * 30).workers[0].settings.threads == 3


def test_cluster_devices_on_missing_nodes_or_gpus_are_errors():
    nodes = (node(0, machine()), node(1, machine(gpu(0, "NVIDIA A100", 80 * GB))))
    with pytest.raises(UserError, match=r"devices: node2:cpu: no node node2 in the cluster \(nodes: node0, node1\)"):
        make_cluster_plan(nodes, small_fp32(), job_spec(devices=("node2:cpu",)), [100])
    with pytest.raises(UserError, match=r"devices: node1:cuda:1 not present \(node1's GPUs Ray may use: cuda:0\)"):
        make_cluster_plan(nodes, small_fp32(), job_spec(devices=("node1:cuda:1",)), [100])


def test_cluster_without_gpus_gets_one_cpu_worker_per_node():
    plan = make_cluster_plan((node(0, machine(cpus=4)), node(1, machine(cpus=4))), small_fp32(), job_spec(), [100] * 4)
    assert [w.device for w in plan.workers] == ["node0:cpu", "node1:cpu"]
    assert [w.settings.threads for w in plan.workers] == [4, 4]
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


# -- CPU only ------------------------------------------------------------------------------------
def test_cpu_only_machine_gets_one_cpu_worker_with_every_core():
    # 64 GB of RAM: the whole fp32 model (16 x 51 MB layers) would fit in one shard, but on a CPU reading is
    # hidden behind compute and more layers per shard buy no time, only memory (issue 12: 16 layers per shard
    # ran 2.2x slower with 3.7x the memory of one).
    plan = make_plan(machine(cpus=8), small_fp32(), job_spec(), [150] * 32)
    (worker,) = plan.workers
    s = worker.settings
    assert (worker.device, s.threads, s.layers_per_shard, s.storage, s.dtype) == ("cpu", 8, 1, "cpu", "float32")
    assert not s.resident
    assert s.batch_tokens == 1024  # 32 x 150 = 4800 tokens: the CPU cap
    assert worker.predicted_peak_device_memory == 0
    assert "devices cpu (auto): no GPU visible" in plan.reasons


def test_two_cpu_workers_split_the_cores_and_the_prompts():
    plan = make_plan(machine(cpus=8), small_fp32(), job_spec(devices=("cpu", "cpu")), [150] * 32)
    assert [w.settings.threads for w in plan.workers] == [4, 4]
    assert [w.prompt_indices for w in plan.workers] == [tuple(range(16)), tuple(range(16, 32))]


def test_cpu_peak_ram_is_the_base_the_shard_slots_and_one_forward():
    # RAM limit 2 GB, 1.8 GB usable. 32 prompts of 150 tokens, batch 1024 (the CPU cap), fp32, one layer per
    # shard (more would not be faster):
    #   base                                                             536,870,912
    #   working: (3 x 2816 + 6 x 1024) x 1024 x 4 = 59,768,832, mask 1024 x 150 x 4 = 614,400
    #            (sdpa's flash kernel holds no attention scores)                  60,383,232
    #   batch in flight 2 x 1024 x 1024 x 4                                      8,388,608
    #   activations 32 x 150 x 1.25 x 1024 x 4                                  24,576,000
    #   scores 32 x 4 x 32000 x 4                                               16,384,000
    #   weights: 2 slots of a decoder layer (the 131 MB head comes in steps) 102,776,832
    #   masks kept for the pass: 32 x 187.5 padded tokens x 150 x 4              3,600,000
    #   total                                                                  752,979,584
    # (Between the head's steps the 32 x 187.5 x 4 / 150 = 160 scored positions' normed hidden states and
    # logits so far, 160 x (1024 + 32000) x 4 = 21,135,360, with the head's logits of a 12,544-row step,
    # stay below a decoder layer's working memory.) That is the fastest (16.5 s). One slot is predicted 3%
    # slower (the reads no longer hidden) for a layer's 51 MB less (7%): two are within 10% of the least
    # memory too, so auto keeps the fastest.
    plan = make_plan(machine(cpus=4), small_fp32(), job_spec(limits=Limits(ram=2 * GB)), [150] * 32)
    (worker,) = plan.workers
    assert (worker.settings.double_buffer, worker.settings.batch_tokens) == (True, 1024)
    assert worker.predicted_peak_ram == 752_979_584
    assert "shard slots 2 (auto): 16.5 s, 752.98 MB; 1: 17.0 s, 701.59 MB" in worker.reasons
    assert any(r.startswith("settings (auto)") and "the fastest is predicted 16.5 s" in r for r in worker.reasons)
    # The free heap a worker keeps between shards (64 MiB) fits beside that peak; under 900 MB (810 MB usable)
    # it shrinks to what is left, 810,000,000 - 752,979,584.
    assert worker.settings.heap_slack == HEAP_SLACK
    (tight,) = make_plan(machine(cpus=4), small_fp32(), job_spec(limits=Limits(ram=900_000_000)), [150] * 32).workers
    assert tight.predicted_peak_ram == 752_979_584 and tight.settings.heap_slack == 57_020_416
    assert any(r.startswith("heap slack 57.02 MB") for r in tight.reasons)


# -- job-wide decisions --------------------------------------------------------------------------
def test_parallel_auto_and_pipeline_on_one_device_are_data():
    # Two devices: tests/test_pipeline.py.
    for parallel in ("auto", "pipeline"):
        plan = make_plan(machine(), small_fp32(), job_spec(parallel=parallel), [150] * 4)
        assert plan.parallel == "data" and len(plan.workers) == 1
        assert any(r.startswith("parallel data (") and "one device" in r for r in plan.reasons)


def test_dtype_auto_keeps_the_checkpoints_and_a_conversion_costs_memory():
    fp16 = make_plan(machine(SMALL_GPU), llama2_70b(), job_spec(limits=WORKSTATION_LIMITS), [300] * 4)
    assert fp16.dtype == "float16" and any("dtype float16 (auto)" in r for r in fp16.reasons)
    # float32 compute of an fp16 checkpoint: slots hold 1.71 GB as read plus 3.42 GB converted, twice
    # (10.3 GB): no longer fits 6 GB.
    with pytest.raises(UserError, match="model: does not fit on cuda:0"):
        make_plan(machine(SMALL_GPU), llama2_70b(), job_spec(limits=WORKSTATION_LIMITS, dtype="float32"), [300] * 4)


def test_generation_steps_multiply_the_reads_and_cached_steps_compute_one_token_per_suffix():
    one = make_plan(machine(cpus=8), small_fp32(), job_spec(layers_per_shard=1), [150] * 32, suffix_counts=[4] * 32).workers[0]
    three = make_plan(machine(cpus=8), small_fp32(), job_spec(generate_tokens=3, layers_per_shard=1), [150] * 32,
                      suffix_counts=[4] * 32).workers[0]
    assert three.predicted_read_seconds == pytest.approx(3 * one.predicted_read_seconds)
    # small_fp32: 16 x 12,847,104 decoder params, 32,768,000 in the head, which reads the 4 suffixes'
    # last tokens each step; steps 2 and 3 run the decoder on those 4 tokens only (the KV cache).
    # Attention: 4 x row x hidden per token and layer; a later step's 4 tokens see the row and the new columns.
    decoder, head, attention = 16 * 12_847_104, 32_768_000, 4 * 16 * 1024
    first_layers, first_head = 32 * (2 * decoder * 150 + attention * 150 * 150), 32 * 2 * head * 4
    later = 32 * (2 * decoder * 4 + attention * 4 * (150 + 3 / 2 * 4) + 2 * head * 4)
    # Each forward runs at the rate of the tokens it carries (the assumed CPU curve: 8 cores x 80 GFLOP/s at
    # 1024 tokens, b / (b + 100) of it at b): 6,000 padded tokens in 6 batches of 1,000; the head's rows and a
    # later step's tokens are the 128 suffixes' share of a batch, 21.
    assert (one.settings.batch_tokens, three.settings.batch_tokens) == (1024, 1024)

    def rate(tokens):
        return 8 * 80e9 * tokens / (tokens + 100) / (1024 / 1124)

    assert one.predicted_compute_seconds == pytest.approx(first_layers / rate(1000) + first_head / rate(21))
    assert three.predicted_compute_seconds == pytest.approx(one.predicted_compute_seconds + 2 * later / rate(21))
    # rows do not grow either: a batch of 150 tokens holds the 150-token prompt for every step
    plan = make_plan(machine(), small_fp32(), job_spec(generate_tokens=3, batch_tokens=150), [150], suffix_counts=[4])
    assert plan.workers[0].settings.batch_tokens == 150


def test_the_kv_cache_is_counted_in_its_tier_and_shrinks_rounds_that_must_stay_in_ram():
    # small_fp32 keeps 16 layers x (keys + values) 2 x 1024 x 4 B = 131,072 B per token. 32 prompts of
    # 150 tokens, 4 suffixes, 3 steps keep (150 + 4) x 1.25 padding = 192.5 tokens each: 807,403,520 B
    # in all; the batch in flight holds one layer's cache of its 1024 tokens twice (16,777,216 B), and
    # the two extra steps' results are 2 x 32 x 4 x 32000 x 4 B = 32,768,000 B.
    job = dict(suffix_counts=[4] * 32)
    fixed = dict(layers_per_shard=1, batch_tokens=1024)  # the same settings with and without the cache
    one = make_plan(machine(cpus=8), small_fp32(), job_spec(**fixed), [150] * 32, **job).workers[0]
    three = make_plan(machine(cpus=8), small_fp32(), job_spec(generate_tokens=3, **fixed), [150] * 32, **job).workers[0]
    assert (one.settings, one.rounds) == (three.settings, three.rounds)  # storage cpu, 1 round
    assert three.predicted_peak_ram - one.predicted_peak_ram == 807_403_520 + 16_777_216 + 32_768_000

    # 320 prompts (25.2 MB of cache each) with 2 GB of RAM to spare beyond a one-step job's: held in RAM
    # the cache makes rounds of at most 92 prompts (4, evened out); on disk it would keep one round, but its
    # traffic costs more than reading the weights 4 times (predicted 64.7 s vs 52.7 s), so auto keeps it in RAM.
    n, job = 320, dict(suffix_counts=[4] * 320)
    spare = make_plan(machine(cpus=8), small_fp32(), job_spec(layers_per_shard=1), [150] * n, **job).workers[0]
    limits = Limits(ram=int((spare.predicted_peak_ram + 2 * GB) / 0.9) + 1)  # the planner keeps 10% free
    auto = make_plan(machine(cpus=8), small_fp32(), job_spec(generate_tokens=3, layers_per_shard=1, limits=limits),
                     [150] * n, **job).workers[0]
    assert (auto.settings.storage, len(auto.rounds)) == ("cpu", 4)
    assert any(r.startswith("storage cpu (auto)") and "disk: " in r for r in auto.reasons)
    ram = make_plan(machine(cpus=8), small_fp32(),
                    job_spec(generate_tokens=3, layers_per_shard=1, limits=limits, storage="cpu"), [150] * n,
                    **job).workers[0]
    assert [len(r) for r in ram.rounds] == [81, 81, 81, 77]
    assert any(r.startswith("4 round(s) (the resume unit)") for r in ram.reasons)


def test_no_prompts_is_an_error():
    with pytest.raises(UserError, match="no prompts"):
        make_plan(machine(), small_fp32(), job_spec(), [])


# -- the plan as data ----------------------------------------------------------------------------
def test_plan_round_trips_through_json():
    gpus = (gpu(0, "NVIDIA GeForce RTX 3090", 24 * GB), gpu(1, "NVIDIA GeForce RTX 3090", 24 * GB))
    plan = make_plan(machine(*gpus), llama2_70b(), job_spec(storage="disk"), [300] * 40)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan


def test_make_plan_is_deterministic():
    args = (machine(SMALL_GPU), llama2_70b(), job_spec(limits=WORKSTATION_LIMITS), [300 + i % 7 for i in range(400)])
    assert make_plan(*args) == make_plan(*args)


def test_moe_compute_counts_only_the_routed_experts():
    from flexorch.contract.manifest import DECODER, LayerEntry

    # 1000 dense parameters + 8 experts of 100 (200 bytes each in float16); a token visits 2 experts
    entry = LayerEntry(name="layer.0", kind=DECODER, file="layers/001_layer.0.safetensors", bytes=3600,
                       sha256=None, dtype="float16", params=1800, source_prefix="model.layers.0.",
                       experts=8, expert_bytes=200)
    assert _active_params(entry, {"num_experts_per_tok": 2}) == 1000 + 2 * 100
    assert _active_params(replace(entry, experts=0, expert_bytes=0), {}) == 1800


def test_mixtral_on_a_6gb_gpu_streams_its_experts_in_groups():
    # Mixtral-8x7B fp16 (orchestrator/shapes.py): a decoder layer is 2,902,540,288 bytes — attention, norms
    # and router 83,968,000, 8 experts of 352,321,536. Two whole layers (5.8 GB) exceed the 5.4 GB budget.
    plan = make_plan(machine(SMALL_GPU), mixtral_8x7b(), job_spec(limits=WORKSTATION_LIMITS), [300] * 400)
    (worker,) = plan.workers
    # Planned at one expert per group, the batch grows to 8192 tokens; then the groups grow into what is left:
    # two slots of 3 experts 2 x 1,056,964,608 + CUDA context 671,088,640 + in flight 2 x 8192 x 4096 x 2
    # = 134,217,728 + working: a token's 2 routes are 2 rows of 14336, (3 x 28672 + 6 x 4096) x 8192 x 2
    # = 1,811,939,328 (sdpa's kernel on a GPU keeps no scores), mask 8192 x 300 x 2 = 4,915,200, and the
    # masks and rotary tables the engine keeps for a pass (capped at 64 MiB) 67,108,864 = 4,803,198,976
    # (4 experts per group would add 704,643,072: 5.51 GB, over the 5.4 GB budget).
    assert (worker.settings.experts_per_group, worker.settings.layers_per_shard) == (3, 1)
    assert worker.settings.batch_tokens == 8192
    assert worker.predicted_peak_device_memory == 4_803_198_976 <= 0.9 * 6 * GB
    assert any("experts_per_group 3 (auto)" in r for r in worker.reasons)
    # Compute counts the 2 routed experts of 8: 2 x 32 x (83,968,000 / 2 + 2 x 176,160,768) params x 300 tokens
    # per prompt, plus the head, at 20 TFLOP/s; the rest is activations crossing PCIe at each shard boundary
    # (all 8 experts counted would be 3.6x the routed FLOPs).
    active = 32 * (83_968_000 // 2 + 2 * 176_160_768)
    routed = 400 * 2 * (active * 300 + 4096 * 32000 * 4) / 20e12
    assert routed <= worker.predicted_compute_seconds < 1.2 * routed
    # A card that holds two whole layers streams none.
    (roomy,) = make_plan(machine(gpu(0, "NVIDIA H100", 80 * GB)), mixtral_8x7b(), job_spec(), [300] * 400).workers
    assert roomy.settings.experts_per_group == 0


def test_the_heads_logits_are_sized_by_the_positions_it_scores():
    # suffix_logprob on a 32k-vocabulary model: with scored positions given (8 of each 150-token prompt), the
    # head's float32 logits and log-softmax are counted for those, not for every token.
    spec = job_spec(score=ScoreSettings(kind="suffix_logprob"), layers_per_shard=1, batch_tokens=1024)
    every = make_plan(machine(cpus=8), small_fp32(), spec, [150] * 8).workers[0]
    scored = make_plan(machine(cpus=8), small_fp32(), spec, [150] * 8, scored_counts=[8] * 8).workers[0]
    # The 131 MB head comes in steps of (51,388,416 - 4,096 norm - 64) // 4,096 = 12,544 rows (a decoder
    # layer's slot). Working memory at batch 1024 is the larger of a decoder layer's (60,383,232: see the
    # test above) and the head's, its logits and, kept between its steps, the scored positions' normed
    # hidden states: every token, 2 copies x 1024 x 12,544 x 4 = 102,760,448 and 8 x 187.5 padded tokens
    # x 1024 x 4 = 6,144,000; the scored ones (1024 x 8 / 150 = 55 rows), 2 x 55 x 12,544 x 4 = 5,519,360
    # and 1,500 x 8 / 150 x 4,096 = 327,680, so the decoder layer's.
    assert every.predicted_peak_ram - scored.predicted_peak_ram == 102_760_448 + 6_144_000 - 60_383_232


# -- layer files not verified yet ------------------------------------------------------------------
def test_files_not_verified_yet_are_hashed_on_each_workers_first_pass():
    # The CPU benchmark's model on an 8-core box with the assumed figures: disk 2 GB/s, sha256 1 GB/s. A CPU
    # worker computes on all 8 cores, so no core is spare for the hash thread beside the loader: reading and
    # hashing take turns, 1/2 + 1/1 s per GB against 1/2 s, 3x the read time of what is hashed.
    manifest = small_fp32()
    total = sum(e.bytes for e in manifest.layers)
    plain = make_plan(machine(cpus=8), manifest, job_spec(devices=("cpu",)), [150] * 32)
    (p,) = plain.workers
    assert len(p.rounds) == 1 and not any(r.startswith("checksums") for r in plain.reasons)
    for unverified, factor in ((total, 3.0), (total // 2, 2.0)):
        hashed = make_plan(machine(cpus=8), manifest, job_spec(devices=("cpu",)), [150] * 32, unverified_bytes=unverified)
        (h,) = hashed.workers
        assert h.settings == p.settings
        assert h.predicted_read_seconds == pytest.approx(factor * p.predicted_read_seconds, rel=1e-3)
        assert any(r.startswith(f"checksums: {format_bytes(unverified)} of layer files not verified") for r in hashed.reasons)
    # A GPU worker computes on the device: with cores to spare the hash runs beside the read, and the slower of
    # the two (sha256 1 GB/s against the disk's 2 GB/s) sets the rate: 2x.
    gpu_plain = make_plan(machine(SMALL_GPU, cpus=8), manifest, job_spec(), [150] * 32)
    gpu_hashed = make_plan(machine(SMALL_GPU, cpus=8), manifest, job_spec(), [150] * 32, unverified_bytes=total)
    (gp,), (gh,) = gpu_plain.workers, gpu_hashed.workers
    assert gp.device == "cuda:0" and len(gp.rounds) == 1
    assert gh.predicted_read_seconds == pytest.approx(2.0 * gp.predicted_read_seconds, rel=1e-3)


def test_a_model_larger_than_the_ram_is_read_around_the_page_cache_by_a_lone_reader():
    """The 70B (138 GB) cannot stay in 64 GB of page cache between passes: every pass reads it from the disk
    anyway, and read direct it lands in the slot with no copy (measured here at twice the cached path's rate).
    A model that fits is read through the cache (later passes and jobs read it from memory), and so are files
    that several workers of the machine read in step; a filesystem that refuses direct reads is never asked."""
    figures = Calibration(machine="box", measured_at="2026-11-26 15:00 UTC", seconds=10.0,
                          disk_read_bytes_per_s=1e9, direct_read_bytes_per_s=2e9)
    box = replace(machine(SMALL_GPU), calibration=figures)
    spec = job_spec(limits=WORKSTATION_LIMITS)
    direct = make_plan(box, llama2_70b(), spec, [300] * 400)
    (d,) = direct.workers
    assert d.settings.direct_reads
    assert any(r.startswith("reads: direct (O_DIRECT): the model (137.95 GB) is larger than the RAM available")
               for r in direct.reasons)
    refused = make_plan(replace(box, calibration=replace(figures, direct_read_bytes_per_s=None)), llama2_70b(),
                        spec, [300] * 400)
    (r,) = refused.workers
    assert not r.settings.direct_reads and "reads: through the page cache: the filesystem refuses direct reads" \
        in " ".join(refused.reasons)
    # each round reads the model once: at 2 GB/s direct, at 1 GB/s through the cache (where the slower reads
    # also make fewer, larger rounds pay)
    assert d.predicted_read_seconds / len(d.rounds) == pytest.approx(137.95 / 2, rel=1e-3)
    assert r.predicted_read_seconds / len(r.rounds) == pytest.approx(137.95, rel=1e-3)

    fits = make_plan(box, llama2_13b(), job_spec(), [300] * 4)
    assert not fits.workers[0].settings.direct_reads
    assert any(x.startswith("reads: through the page cache: the model (26.03 GB) fits in the RAM available")
               for x in fits.reasons)

    gpus = (gpu(0, "NVIDIA GeForce RTX 3090", 24 * GB), gpu(1, "NVIDIA GeForce RTX 3090", 24 * GB))
    small_ram = replace(machine(*gpus, ram=16 * GB), calibration=figures)
    shared = make_plan(small_ram, llama2_13b(), job_spec(parallel="data"), [300] * 4)
    assert [w.settings.direct_reads for w in shared.workers] == [False, False]
    assert "reads: through the page cache: 2 workers read every layer file in step" in " ".join(shared.reasons)
    stages = make_plan(small_ram, llama2_13b(), job_spec(parallel="pipeline"), [300] * 4)
    assert [w.settings.direct_reads for w in stages.workers] == [True, True]  # each stage reads its own shards


# -- checkpoints of a round in progress (planner/checkpoints.py) -----------------------------------------
SLOW_DISK = 200_000_000  # bytes/s: a pass of the 70B reads 138 GB in 11.5 min, so a round runs 17.5 min


def test_70b_on_a_6gb_gpu_checkpoints_often_enough_for_ten_minutes_at_under_five_percent():
    # The slow disk makes a round long: its compute must be >= 4x its read (ROUND_MIN_COMPUTE_OVER_READ), so the
    # 400 prompts are one round of ~17.5 min, longer than the default checkpoint_interval of 10 minutes.
    hw = replace(machine(SMALL_GPU), disk_read_bytes_per_s=SLOW_DISK)
    (worker,) = make_plan(hw, llama2_70b(), job_spec(limits=WORKSTATION_LIMITS), [300] * 400).workers
    assert len(worker.rounds) == 1 and worker.settings.storage == "cpu"
    every = worker.settings.checkpoint_shards
    # 82 shards a pass (embedding, 80 layers, head), each about the round's time / 82
    per_shard = (worker.predicted_seconds - worker.predicted_start_seconds - worker.predicted_checkpoint_seconds) / 82
    assert 1 < every < 82 and every * per_shard <= 600 * 1.05  # shards differ a little around the mean
    assert (every + 2) * per_shard > 600  # not needlessly often: the fewest checkpoints that keep the bound
    # one checkpoint a round: 400 x 375 padded tokens x 8192 x 2 bytes of activations + the scores, at the disk's
    # read rate (no write rate is measured)
    written = 400 * 375 * 8192 * 2 + 400 * 4 * 32000 * 4
    assert worker.predicted_checkpoint_seconds == pytest.approx(written / SLOW_DISK)
    assert worker.predicted_checkpoint_seconds <= 0.05 * worker.predicted_seconds
    (reason,) = [r for r in worker.reasons if r.startswith("checkpoints:")]
    assert f"every {every} shard(s)" in reason and "checkpoint_interval 10.0 min" in reason
    assert "the disk's read rate" in reason


def test_disk_storage_checkpoints_link_the_activations_and_write_only_the_scores():
    hw = replace(machine(SMALL_GPU), disk_read_bytes_per_s=SLOW_DISK)
    spec = job_spec(limits=WORKSTATION_LIMITS, storage="disk", generate_tokens=3)
    (worker,) = make_plan(hw, llama2_70b(), spec, [300] * 400).workers
    assert worker.settings.checkpoint_shards > 0
    (reason,) = [r for r in worker.reasons if r.startswith("checkpoints:")]
    assert "linked where it waits on the disk already" in reason
    # the scores of 3 steps are written, the activations and the KV cache linked
    per_checkpoint = 400 * 4 * 3 * 32000 * 4
    assert worker.predicted_checkpoint_seconds == pytest.approx(
        per_checkpoint / SLOW_DISK * int(reason.split(" per round")[0].split(", ")[-1]))


def test_a_round_within_the_bound_is_not_checkpointed_and_off_turns_them_off():
    (short,) = make_plan(machine(SMALL_GPU), llama2_70b(), job_spec(limits=WORKSTATION_LIMITS), [300] * 40).workers
    assert short.settings.checkpoint_shards == 0 and short.predicted_checkpoint_seconds == 0
    assert any(r.startswith("checkpoints: none needed: a round") for r in short.reasons)
    hw = replace(machine(SMALL_GPU), disk_read_bytes_per_s=SLOW_DISK)
    (off,) = make_plan(hw, llama2_70b(), job_spec(limits=WORKSTATION_LIMITS, checkpoint_interval=None),
                       [300] * 400).workers
    assert off.settings.checkpoint_shards == 0
    assert any(r.startswith("checkpoints: off") for r in off.reasons)


def test_a_bound_that_costs_more_than_five_percent_wins_and_the_plan_says_so():
    hw = replace(machine(SMALL_GPU), disk_read_bytes_per_s=SLOW_DISK)
    (worker,) = make_plan(hw, llama2_70b(), job_spec(limits=WORKSTATION_LIMITS, checkpoint_interval=15.0),
                          [300] * 400).workers
    assert worker.settings.checkpoint_shards == 1  # a shard (~13 s) fits 15 s, two do not
    assert worker.predicted_checkpoint_seconds > 0.05 * worker.predicted_seconds
    assert any("the bound wins" in r for r in worker.reasons)


def test_pipeline_stages_take_no_checkpoints_and_say_why():
    hw = replace(machine(gpu(0, "A", 24 * GB), gpu(1, "B", 24 * GB)), disk_read_bytes_per_s=SLOW_DISK)
    plan = make_plan(hw, llama2_70b(), job_spec(parallel="pipeline"), [300] * 400)
    assert plan.parallel == "pipeline"
    for worker in plan.workers:
        assert worker.settings.checkpoint_shards == 0
        assert any(r.startswith("checkpoints: none in pipeline mode") for r in worker.reasons)
