"""The search (orchestrator/planner/search.py) weighing the KV cache of a generation: its tier, the
batch, and with `kv_cache_compression: auto` whether to compress it, as the cache grows.

Llama-2-13B in fp16 (test_planner.py): 40 layers, 40 kv heads of 128, so the cache keeps 2 x 40 x 128 x 2
= 20,480 bytes per token and layer (819 kB per token over the 40 layers); int8 10,240 codes and per
group of 64 a fp16 minimum and step (640): 10,880; int4 5,760. A 24 GB GPU capped at 24 GB (21.6 GB
after the 10% margin), 16 GB of RAM; 16 prompts of 800 tokens, each generating up to N new tokens:
the cache holds 16 x (800 + N - 2) x 1.25 (padding) tokens.
"""

from __future__ import annotations

import pytest

from flexorch.contract.choices import KVCompression
from flexorch.contract.errors import UserError
from flexorch.orchestrator.generation import GenerateSettings
from flexorch.orchestrator.planner import make_plan
from flexorch.orchestrator.spec import Limits, ScoreSettings

from test_planner import GB, GiB, gpu, job_spec, llama2_13b, machine

RTX_4090 = gpu(0, "NVIDIA GeForce RTX 4090", 24 * GiB, free=24 * GB)


def generation_plan(new_tokens: int, compression: str | None, storage: str | None = None, batch: int | None = None,
                    disk_free: int = 500 * GB):
    spec = job_spec(score=ScoreSettings("generate", generate=GenerateSettings()), storage=storage, batch_tokens=batch,
                    limits=Limits(gpu_memory=24 * GB, ram=16 * GB), kv_cache_compression=compression)
    plan = make_plan(machine(RTX_4090, disk_free=disk_free), llama2_13b(), spec, [800] * 16, suffix_counts=[1] * 16,
                     new_tokens=[new_tokens] * 16)
    (worker,) = plan.workers
    return worker


def test_a_growing_cache_leaves_the_gpu_uncompressed_and_is_compressed_where_the_job_allows_it():
    # 16 new tokens: 16,280 cached tokens, 13.3 GB: on the GPU beside two layer slots (1.3 GB) and the batch
    short = generation_plan(16, "none")
    assert (short.settings.storage, short.settings.kv_cache_compression, len(short.rounds)) == ("gpu", "none", 1)
    # 1024: 36,440 tokens, 29.9 GB: neither the GPU nor the RAM holds it, so it goes to disk (in one round:
    # more rounds would each stream the weights 1024 times)
    long = generation_plan(1024, "none")
    assert (long.settings.storage, long.settings.kv_cache_compression) == ("disk", "none")
    assert long.predicted_peak_device_memory < 8 * GB
    # auto: short, the cache does not limit, and nothing lossy is chosen; long, int8 (15.9 GB) keeps it on the
    # GPU, where its traffic to and from the disk cost more than a third of the time
    auto_short = generation_plan(16, None)
    assert (auto_short.settings.storage, auto_short.settings.kv_cache_compression) == ("gpu", "none")
    assert any(r.startswith("kv_cache_compression none (auto): compressing the KV cache (lossy) would not be faster")
               for r in auto_short.reasons)
    auto_long = generation_plan(1024, None)
    assert (auto_long.settings.storage, auto_long.settings.kv_cache_compression) == ("gpu", "int8")
    assert auto_long.predicted_seconds < 0.7 * long.predicted_seconds
    assert any(r.startswith("kv_cache_compression int8 (auto): the KV cache limits") for r in auto_long.reasons)
    # longer still, 3000: 75,960 tokens are 33 GB in int8; int4 (5,760 bytes: 17.5 GB) stays on the GPU
    longest = generation_plan(3000, None)
    assert (longest.settings.storage, longest.settings.kv_cache_compression) == ("gpu", "int4")


@pytest.mark.parametrize("compression", ["int8", "int4"])
def test_a_compression_the_job_names_is_kept_and_sizes_the_cache(compression):
    named = generation_plan(16, compression, storage="gpu", batch=8192)
    assert named.settings.kv_cache_compression == compression
    assert not any(r.startswith("kv_cache_compression") for r in named.reasons)  # nothing chosen: nothing to say
    plain = generation_plan(16, "none", storage="gpu", batch=8192)
    # a smaller cache on the GPU: 16,280 tokens x 40 layers x (20,480 - the compressed bytes), less what the
    # batch in flight holds beside it (its codes, and the float32 copy quantising goes through: 8192 x
    # (compressed + 40,960))
    saved = 16_280 * 40 * (20_480 - KVCompression(compression).token_bytes(40, 128, 128, 2))
    extra = 8192 * (KVCompression(compression).token_bytes(40, 128, 128, 2) + 40_960)
    assert plain.predicted_peak_device_memory - named.predicted_peak_device_memory == pytest.approx(saved - extra, abs=1)


def test_a_cache_that_fits_nowhere_uncompressed_is_refused_saying_so_or_compressed_under_auto():
    # 1,024 new tokens, 29.9 GB of cache, and 20 GB of disk (18 GB after the margin): no tier holds it, and a
    # round of fewer prompts would stream the weights 1,024 times for too little compute
    with pytest.raises(UserError) as refused:
        generation_plan(1024, "none", disk_free=20 * GB)
    assert str(refused.value).endswith("or let the KV cache be compressed (kv_cache_compression: auto, int8 or int4)")
    auto = generation_plan(1024, None, disk_free=20 * GB)
    assert (auto.settings.storage, auto.settings.kv_cache_compression) == ("gpu", "int8")
    assert any(r.startswith("kv_cache_compression int8 (auto): the KV cache limits the batch: uncompressed it fits "
                            "nowhere") for r in auto.reasons)
