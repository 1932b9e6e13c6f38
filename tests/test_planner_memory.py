"""The planner's memory model (orchestrator/planner/memory.py) on a hand-sized model: every size in a
comment, every expected value exact.

The model: 4 decoder layers 8 wide, MLP 16 wide, 2 heads, a 100-token vocabulary, float32 (4 bytes);
1000 bytes per decoder layer, an embedding of 400 and norm + head of 600 (neither read whole beside
the slots: edge 0); 2 kv heads of 4 dims, so keys + values of one token in one layer are 2 x 2 x 4 x 4
= 64 bytes. No calibration: a CPU worker's fixed RAM is 512 MiB, a CUDA worker's 1 GiB, the CUDA
context 640 MiB (orchestrator/figures.py).
"""

from __future__ import annotations

from dataclasses import replace

from flexorch.contract.choices import KVCompression
from flexorch.orchestrator.figures import figures_of
from flexorch.orchestrator.hardware import GpuInfo, Hardware
from flexorch.orchestrator.planner.memory import (_Budget, _cap, _Edges, _fits, _gpu_budget, _max_peaks, _Peaks,
                                                  _peaks, _pinned, _shortfall, _usable, _working_bytes)
from flexorch.orchestrator.planner.model import _Job, _Load, _Model, _Setup
from flexorch.orchestrator.spec import JobSpec, Limits, ScoreSettings

MiB, GiB = 1 << 20, 1 << 30
CPU_BASE, CUDA_BASE, CUDA_CONTEXT = 512 * MiB, 1 * GiB, 640 * MiB

TINY = _Model(num_layers=4, hidden=8, intermediate=16, heads=2, vocab=100, dtype_bytes=4, kv_bytes=64, layer=1000,
              edge=0, stored_layer=1000, stored_edge=0, converted=False, bytes_per_pass=5000,
              stored_shards=(400, 1000, 1000, 1000, 1000, 600), decoder_params=1000, head_params=150, total=5000)
# A round of 100 padded tokens waiting between shards, its scores 68 bytes; rows at most 10 tokens.
ROUND = _Load(act_tokens=100, result_bytes=68)
LONGEST = 10


def machine(gpu_free: int = 0) -> Hardware:
    gpus = (GpuInfo(index=0, name="NVIDIA GeForce RTX 2060", total_memory=6 * 10**9, free_memory=gpu_free,
                    pcie_gen=3, pcie_width=16),) if gpu_free else ()
    return Hardware(gpus=gpus, ram_total=64 * 10**9, ram_available=64 * 10**9, cpu_count=8, disk_path="/data",
                    disk_free=500 * 10**9)


def job(model: _Model = TINY, gpu_free: int = 0, scored_ratio: float = 0.25, **spec) -> _Job:
    """By default a quarter of each batch's positions scored."""
    paths = JobSpec(path="job.yaml", model="m", prompts="p.jsonl", output="o.pkl", job_dir="o.job", **spec)
    return _Job(spec=paths, model=model, dtype="float32", tokens=(80,), lengths=(LONGEST,), loads=(ROUND,),
                scored_ratio=scored_ratio, figures=figures_of(machine(gpu_free)), token_flops=0.0, token_attention=0.0)


# -- one forward's working memory ----------------------------------------------------------------
def test_working_bytes_are_a_decoder_forward_or_the_heads_logits_whichever_is_larger():
    # batch 64, rows of 10: MLP + hidden copies (3 x 16 + 6 x 8) x 64 x 4 = 24,576, mask 64 x 10 x 4 = 2,560;
    # the head: 2 copies x 16 scored rows (64 x 0.25) x 100 columns x 4 (float32) = 12,800
    assert _working_bytes(TINY, 64, LONGEST, 0.25, 100, _Edges()) == 27_136
    # eager attention also holds the scores: 64 x 10 x 2 heads x (4 + 4 float32 softmax) = 10,240
    assert _working_bytes(replace(TINY, eager_attention=True), 64, LONGEST, 0.25, 100, _Edges()) == 37_376
    # every position scored over a 1,000-column vocabulary: 2 x 64 x 1000 x 4 = 512,000, and the state
    # held between the head's steps comes on top of the logits
    assert _working_bytes(TINY, 64, LONGEST, 1.0, 1000, _Edges(head_held=1_000)) == 513_000
    # a pass's gathered embedding rows beyond the slot count where they outgrow both
    assert _working_bytes(TINY, 64, LONGEST, 0.25, 100, _Edges(gathered=30_000)) == 30_000


def test_pinned_staging_rounds_up_to_a_power_of_two():
    assert [_pinned(n) for n in (0, 1, 1000, 2048, 2049)] == [0, 1, 1024, 2048, 4096]
    assert _pinned(1_711_308_800) == 2 * GiB  # a Llama-2-70B layer in fp16


# -- a worker's peaks ----------------------------------------------------------------------------
# Two layers per shard, batches of 64 tokens, two slots. On every device the compute holds:
#   slots 2 x (2 x 1000)                       4,000
#   batch in flight 2 x 64 x 8 x 4             4,096
#   masks kept for the pass 100 x 10 x 4       4,000
#   one forward's working memory              27,136 (above)
#   total                                     39,232
COMPUTE = 39_232
# the round's activations: 100 tokens x 8 x 4 = 3,200 bytes


def test_a_cpu_worker_holds_everything_in_ram():
    cpu = _peaks(job(), _Setup("cpu", 2, 64, "cpu"), ROUND, LONGEST)
    assert cpu == _Peaks(device=0, ram=CPU_BASE + 68 + COMPUTE + 3_200, disk=0)
    # storage disk: two copies of the activations on disk; RAM keeps only the batch in flight again (4,096)
    disk = _peaks(job(), _Setup("cpu", 2, 64, "disk"), ROUND, LONGEST)
    assert disk == _Peaks(device=0, ram=CPU_BASE + 68 + COMPUTE + 4_096, disk=6_400)


def test_a_gpu_worker_computes_on_the_device_and_stages_through_pinned_ram():
    gpu_job = job(gpu_free=6 * 10**9)
    # RAM: one pinned staging buffer of a stored shard (2,000 -> 2,048) and, with storage cpu, the round's
    # batches pinned one by one: 2 batches (100 / 64 tokens) of 64 x 8 x 4 = 2,048 bytes
    cpu = _peaks(gpu_job, _Setup("cuda:0", 2, 64, "cpu"), ROUND, LONGEST)
    assert cpu == _Peaks(device=CUDA_CONTEXT + COMPUTE, ram=CUDA_BASE + 68 + 2_048 + 2 * 2_048, disk=0)
    # storage gpu: the activations move to the device
    gpu = _peaks(gpu_job, _Setup("cuda:0", 2, 64, "gpu"), ROUND, LONGEST)
    assert gpu == _Peaks(device=CUDA_CONTEXT + COMPUTE + 3_200, ram=CUDA_BASE + 68 + 2_048, disk=0)


def test_one_slot_and_a_resident_model_size_the_weights():
    single = _peaks(job(), _Setup("cpu", 2, 64, "cpu", slots=1), ROUND, LONGEST)
    assert single.ram == CPU_BASE + 68 + COMPUTE - 2_000 + 3_200  # one shard of 2 x 1000 less
    # resident: the whole model (5,000) instead of the slots (4,000)
    resident = _peaks(job(), _Setup("cpu", 2, 64, "cpu", resident=True), ROUND, LONGEST)
    assert resident.ram == CPU_BASE + 68 + COMPUTE + 1_000 + 3_200


def test_the_kv_cache_waits_in_the_activations_tier():
    # 2 generation steps: the cache keeps 50 padded tokens x 4 layers x 64 bytes = 12,800; the batch in
    # flight also holds one layer's cache of its batch twice: 2 x 64 x 64 = 8,192
    cached = replace(ROUND, cache_tokens=50)
    cpu = _peaks(job(), _Setup("cpu", 2, 64, "cpu"), cached, LONGEST)
    assert cpu.ram == CPU_BASE + 68 + COMPUTE + 8_192 + 3_200 + 12_800
    # on disk: RAM holds the batch in flight again (4,096 + 8,192) and reads the next batch's cache of the
    # shard's 2 layers ahead (2 x 64 x 64 = 8,192); the disk two copies of the activations and the cache
    disk = _peaks(job(), _Setup("cpu", 2, 64, "disk"), cached, LONGEST)
    assert disk == _Peaks(device=0, ram=CPU_BASE + 68 + COMPUTE + 8_192 + (4_096 + 8_192) + 8_192,
                          disk=2 * 3_200 + 12_800)


# Heads 64 wide: one kv head of 64 key and 64 value dims, float32: 512 bytes per token and layer as
# computed; int8 keeps 128 one-byte codes and, per group of 64, a minimum and a step (2 x 2 x 4 = 16): 144;
# int4 64 + 16 = 80.
KV = replace(TINY, kv_bytes=512, kv_heads=1, key_dim=64, value_dim=64)


def test_a_compressed_kv_cache_keeps_codes_and_ranges_in_its_tier():
    assert [KV.kv_token_bytes(c) for c in KVCompression] == [512, 144, 80]
    assert KV.kv_parts(KVCompression.INT8) == (128, 16)
    cached = replace(ROUND, cache_tokens=50)
    # as computed: 50 tokens x 4 layers x 512 = 102,400 in RAM; in flight one layer's cache of the batch
    # twice, 2 x 64 x 512 = 65,536
    plain = _peaks(job(KV), _Setup("cpu", 2, 64, "cpu"), cached, LONGEST)
    assert plain.ram == CPU_BASE + 68 + COMPUTE + 65_536 + 3_200 + 102_400
    # int8: 50 x 4 x 144 = 28,800; in flight also the batch's codes as read (64 x 144 = 9,216) and the float32
    # copy quantising goes through (64 x 512 = 32,768)
    int8 = _peaks(job(KV), _Setup("cpu", 2, 64, "cpu", kv_compression="int8"), cached, LONGEST)
    assert int8.ram == CPU_BASE + 68 + COMPUTE + 65_536 + 9_216 + 32_768 + 3_200 + 28_800
    # storage gpu: the cache waits on the device, int4: 50 x 4 x 80 = 16,000 (codes in flight 64 x 80 = 5,120)
    gpu_job = job(KV, gpu_free=6 * 10**9)
    int4 = _peaks(gpu_job, _Setup("cuda:0", 2, 64, "gpu", kv_compression="int4"), cached, LONGEST)
    assert int4 == _Peaks(device=CUDA_CONTEXT + COMPUTE + 65_536 + 5_120 + 32_768 + 3_200 + 16_000,
                          ram=CUDA_BASE + 68 + 2_048, disk=0)
    # storage cpu on a GPU worker: each block pinned, codes (64 x 128 = 8,192) and ranges (64 x 16 = 1,024) apart,
    # both powers of two already; the activations' 2 batches as before (2 x 2,048)
    pinned = _peaks(gpu_job, _Setup("cuda:0", 2, 64, "cpu", kv_compression="int8"), cached, LONGEST)
    assert pinned.ram == CUDA_BASE + 68 + 2_048 + 2 * 2_048 + 28_800
    # on disk: the cache there; RAM holds the batch in flight again (4,096 + the cache's 65,536 + 9,216 + 32,768)
    # and reads the next batch's codes of the shard's 2 layers ahead (2 x 64 x 144 = 18,432)
    disk = _peaks(job(KV), _Setup("cpu", 2, 64, "disk", kv_compression="int8"), cached, LONGEST)
    assert disk.disk == 2 * 3_200 + 28_800
    assert disk.ram == CPU_BASE + 68 + COMPUTE + 107_520 + (4_096 + 107_520) + 18_432


def test_the_cache_is_counted_at_its_peak_over_the_steps():
    # profile: 30 padded tokens per layer at one peak, 40 at the other: 40 x 4 layers x 64 = 10,240 (not the
    # 50 of each prompt's largest summed)
    cached = replace(ROUND, cache_tokens=50, cache_profile=(30.0, 40.0))
    cpu = _peaks(job(), _Setup("cpu", 2, 64, "cpu"), cached, LONGEST)
    assert cpu.ram == CPU_BASE + 68 + COMPUTE + 8_192 + 3_200 + 10_240
    assert (cached + cached).cache_peak == 80.0 and (cached + ROUND).cache_profile == (30.0, 40.0)


def test_rows_leaving_at_their_limits_bound_the_rounds_cache_below_each_prompts_largest_summed():
    """Eight prompts of 200 tokens, one generating 256 tokens, seven 16: the cache peaks at step 14, the
    last the short ones keep (8 x 214 tokens), not at the sum of each one's largest (454 + 7 x 214)."""
    from test_planner import llama2_13b, machine as described

    from flexorch.orchestrator.generation import GenerateSettings
    from flexorch.orchestrator.planner.model import _describe_job

    spec = JobSpec(path="job.yaml", model="m", prompts="p.jsonl", output="o.pkl", job_dir="o.job",
                   score=ScoreSettings("generate", generate=GenerateSettings()))
    mixed = _describe_job(described(), llama2_13b(), spec, "float16", [200] * 8, [1] * 8, [1] * 8,
                          new_tokens=[256] + [16] * 7)
    # peaks at steps 0 (every row), 14 and 254, x 1.25 padding
    assert mixed.loads[0].cache_profile == (250.0, 267.5, 567.5)
    assert mixed.loads[1].cache_profile == (250.0, 267.5, 0.0)
    total = sum(mixed.loads, _Load())
    assert total.cache_peak == 8 * 267.5 and total.cache_tokens == (454 + 7 * 214) * 1.25
    # limits 2..20 (19 peaks with step 0) come in 7 groups of 3 steps, each prompt at its largest in a group:
    # at least the exact peak, at most each prompt's largest summed
    limits = list(range(2, 21))
    many = _describe_job(described(), llama2_13b(), spec, "float16", [100] * 19, [2] * 19, [2] * 19,
                         new_tokens=limits)
    assert len(many.loads[0].cache_profile) == 7
    exact = max(sum(100 + 2 * t for own in limits if t <= max(own - 2, 0)) for t in range(19)) * 1.25
    grouped = sum(many.loads, _Load()).cache_peak
    assert exact <= grouped <= sum(load.cache_tokens for load in many.loads)
    assert grouped < 1.2 * exact


def test_an_mla_cache_keeps_the_latent_and_the_rotary_key():
    """DeepSeek-V3's attention hands its cache the compressed latent (kv_lora_rank) and the rotary key
    (qk_rope_head_dim) of one head (transformers 5.17 and 5.25), not every head's keys and values."""
    from test_planner import llama2_13b

    from flexorch.orchestrator.planner.model import _describe_model

    manifest = llama2_13b()
    dense = _describe_model(manifest, "float16")
    assert dense.kv_bytes == 2 * 40 * 128 * 2  # 40 kv heads of 128, keys and values, fp16
    mla = _describe_model(replace(manifest, config={**manifest.config, "kv_lora_rank": 512, "qk_rope_head_dim": 64}),
                          "float16")
    assert (mla.kv_heads, mla.key_dim, mla.value_dim, mla.kv_bytes) == (1, 512, 64, (512 + 64) * 2)
    # int8: 576 codes and 9 groups of 64 with a fp16 minimum and step (36)
    assert mla.kv_token_bytes(KVCompression.INT8) == 576 + 36


def test_the_round_peaks_are_the_largest_of_its_rounds():
    # rounds of 1 and 2 prompts of ROUND's cost: the second holds 200 tokens of activations (6,400)
    two = job()
    two = replace(two, tokens=(80, 80, 80), lengths=(LONGEST,) * 3, loads=(ROUND,) * 3)
    peaks = _max_peaks(two, _Setup("cpu", 2, 64, "cpu"), [(0,), (1, 2)])
    # masks: 200 tokens x 10 x 4 = 8,000 (4,000 more); results 2 x 68
    assert peaks == _Peaks(device=0, ram=CPU_BASE + 2 * 68 + COMPUTE + 4_000 + 6_400, disk=0)


# -- budgets -------------------------------------------------------------------------------------
def test_budgets_are_the_smaller_of_what_is_free_and_the_limit_less_the_margin():
    assert _usable(_cap(10_000, None), 0.1) == 9_000
    assert _usable(_cap(10_000, 4_000), 0.05) == 3_800
    hw = machine(gpu_free=6 * 10**9)
    assert _gpu_budget(hw, "cuda:0", job(limits=Limits(gpu_memory=5 * 10**9)).spec, 0.1) == 4_500_000_000
    assert _gpu_budget(hw, "cuda:0", job().spec, 0.1) == 5_400_000_000
    assert _gpu_budget(hw, "cpu", job().spec, 0.1) is None


def test_a_peak_fits_when_every_resource_is_within_its_budget_and_the_shortfall_names_each_one_over():
    budget = _Budget(device=None, ram=1_000, disk=500)
    assert _fits(_Peaks(device=10**12, ram=1_000, disk=500), budget)  # no device budget on a CPU worker
    over = _Peaks(device=0, ram=2_000, disk=600)
    assert not _fits(over, budget)
    assert _shortfall(over, budget, "cpu") == (
        "needs 2.00 kB of RAM (this worker's share 1.00 kB after the safety margin) and 600 B of disk "
        "(this worker's share 500 B after the safety margin)")
    assert _shortfall(_Peaks(0, 10, 10), budget, "cpu") == "fits"


def test_a_head_in_steps_holds_a_steps_logits_but_next_token_probs_the_whole_vocabulary():
    # norm (8 x 4 = 32) + head (100 rows of 8 x 4 = 32 bytes: 3,200) outgrow a 2-layer shard (2,000), so the
    # head comes in steps of (2,000 - 32 - 64 alignment) // 32 = 59 rows; every position scored.
    split = replace(TINY, stored_tail=3_232, stored_norm=32, stored_row=32)
    setup = _Setup("cpu", 2, 64, "cpu")
    # suffix_logprob: 2 x 64 scored x 59 columns x 4 = 30,208, and between the steps each of the round's
    # 100 scored positions keeps its final-norm output (8 x 4): 3,200
    logprob = _peaks(job(split, scored_ratio=1.0, score=ScoreSettings(kind="suffix_logprob")), setup, ROUND, LONGEST)
    assert logprob.ram == CPU_BASE + 68 + COMPUTE - 27_136 + 30_208 + 3_200 + 3_200
    # next_token_probs: its output is the vocabulary-wide row, so 100 columns (51,200), and each position
    # also keeps its logits so far between the steps: 100 x (32 + 100 x 4) = 43,200
    probs = _peaks(job(split, scored_ratio=1.0), setup, ROUND, LONGEST)
    assert probs.ram == CPU_BASE + 68 + COMPUTE - 27_136 + 51_200 + 43_200 + 3_200
