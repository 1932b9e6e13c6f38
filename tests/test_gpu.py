"""The CUDA paths against the un-split Hugging Face model: pinned staging and the copy stream
(workers/prefetch.py), pinned host activations (workers/activations.py), the KV cache and head steps
on the device, device-memory accounting, calibration and the whole `flexorch submit` on a GPU.

Skipped on a machine without CUDA (CI has none); run on a GPU machine with
`python -m pytest tests/test_gpu.py`. The CPU suite runs the same code with the CPU branches.
"""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from flexorch.contract.manifest import read_manifest
from flexorch.contract.protocol import EngineSettings, ScoreSpec
from flexorch.orchestrator.demo import ARCHITECTURES
from flexorch.workers import devicememory
from flexorch.workers.engine import score_prompts

from test_controller import reference_probs, submit, write_job
from test_engine import CONFIGS, GREEDY_STEPS, reference_scores, references  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda:0"
# float32 on the GPU against float32 on the CPU: other kernels (cuBLAS, SDPA), no TF32, so rounding
# differs by a few float32 ulps of the logits.
PROBS_ATOL = 1e-5
LOGPROB_ATOL = 1e-4


def gpu_settings(**overrides) -> EngineSettings:
    base = dict(device=DEVICE, dtype="float32", layers_per_shard=1, storage="gpu", batch_tokens=4096)
    return EngineSettings(**{**base, **overrides})


def assert_greedy_steps(results, ref, steps: int) -> None:
    for result, expected, generated in zip(results, ref.probs, ref.generated):
        assert result.scores.shape == expected[:, :steps].shape
        np.testing.assert_allclose(result.scores, expected[:, :steps], atol=PROBS_ATOL, rtol=0)
        assert [tuple(g) for g in result.generated] == [g[:steps] for g in generated]


@pytest.mark.parametrize("arch", tuple(ARCHITECTURES))
def test_every_architecture_matches_unsplit_model_on_the_gpu(arch, layerwise, references, tmp_path):
    """Every storage (gpu, pinned host, disk), 1-3 layers per shard, two slots and one."""
    ref = references(arch)
    for layers, storage, budget, double_buffer in CONFIGS:
        run = gpu_settings(layers_per_shard=layers, storage=storage, batch_tokens=budget,
                           disk_folder=str(tmp_path), double_buffer=double_buffer)
        probs, summary = score_prompts(layerwise(arch), ref.prompts, ScoreSpec("next_token_probs"), run)
        for result, expected in zip(probs, ref.probs):
            assert result.scores.dtype == np.float32
            np.testing.assert_allclose(result.scores[:, 0], expected[:, 0], atol=PROBS_ATOL, rtol=0)
        assert summary.peak_device_memory > 0 and len(summary.peak_device_memory_per_shard) > 0
        logprobs, _ = score_prompts(layerwise(arch), ref.prompts, ScoreSpec("suffix_logprob"), run)
        for result, logprob, greedy in zip(logprobs, ref.logprob, ref.is_greedy):
            np.testing.assert_allclose(result.scores["logprob"], logprob, atol=LOGPROB_ATOL, rtol=0)
            np.testing.assert_array_equal(result.scores["is_greedy"], greedy)
    assert not any(tmp_path.iterdir()), "disk activations are removed after the pass"


@pytest.mark.parametrize("storage", ["gpu", "cpu", "disk"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: sliding-window layers against the cache
def test_kv_cache_generation_matches_unsplit_greedy_extension_on_the_gpu(arch, storage, layerwise, references,
                                                                         tmp_path):
    ref = references(arch)
    score = ScoreSpec("next_token_probs", generate_tokens=GREEDY_STEPS)
    results, _ = score_prompts(layerwise(arch), ref.prompts, score,
                               gpu_settings(storage=storage, layers_per_shard=2, batch_tokens=60,
                                            disk_folder=str(tmp_path)))
    assert_greedy_steps(results, ref, GREEDY_STEPS)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_as_close_to_float32_as_the_unsplit_model_in_that_dtype(dtype, checkpoint, layerwise,
                                                                                  references):
    """No exact reference exists in half precision (kernels differ): the engine's error against the
    float32 model must be no larger than the un-split model's own in the same dtype on the same GPU."""
    from transformers import AutoModelForCausalLM

    ref = references("llama")
    half = AutoModelForCausalLM.from_pretrained(checkpoint("llama"), dtype=getattr(torch, dtype)).to(DEVICE).eval()
    theirs = []
    with torch.no_grad():
        for prompt in ref.prompts:
            for suffix in prompt.suffix_ids:
                ids = torch.tensor([list(prompt.prefix_ids) + list(suffix)], device=DEVICE)
                logits = half(ids).logits[0].float()
                start = len(prompt.prefix_ids) - 1
                target = torch.tensor(suffix, dtype=torch.long, device=DEVICE)
                theirs.append(float(torch.log_softmax(logits[start:start + len(suffix)], -1)
                                    .gather(1, target[:, None]).double().sum()))
    results, _ = score_prompts(layerwise("llama"), ref.prompts, ScoreSpec("suffix_logprob"), gpu_settings(dtype=dtype))
    ours = np.concatenate([r.scores["logprob"] for r in results])
    exact = np.concatenate(ref.logprob)
    their_error, our_error = np.abs(np.array(theirs) - exact).max(), np.abs(ours - exact).max()
    print(f"{dtype}: max |logprob - float32|: un-split {their_error:.2e}, flexorch {our_error:.2e}")
    assert our_error <= 2 * their_error + 1e-3


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_head_in_vocabulary_steps_and_a_gathered_embedding_on_the_gpu(arch, large_vocab):
    from flexorch.contract.shards import plan_shards

    source, model = large_vocab(arch)
    ref = reference_scores(source)
    assert len([s for s in plan_shards(read_manifest(model), 2) if s.rows is not None]) > 5
    run = gpu_settings(layers_per_shard=2, batch_tokens=60, storage="cpu")
    probs, _ = score_prompts(model, ref.prompts, ScoreSpec("next_token_probs", generate_tokens=3), run)
    assert_greedy_steps(probs, ref, 3)
    logprobs, _ = score_prompts(model, ref.prompts, ScoreSpec("suffix_logprob"), run)
    for result, logprob in zip(logprobs, ref.logprob):
        np.testing.assert_allclose(result.scores["logprob"], logprob, atol=LOGPROB_ATOL, rtol=0)


def test_a_resident_model_is_read_once_on_the_gpu(layerwise, references):
    from flexorch.workers.prefetch import ResidentShards

    ref = references("qwen2")
    model = layerwise("qwen2")
    manifest = read_manifest(model)
    score = ScoreSpec("next_token_probs", generate_tokens=3)
    resident = ResidentShards()
    first, summary = score_prompts(model, ref.prompts, score, gpu_settings(resident=True), resident=resident)
    assert summary.bytes_read == sum(manifest.stored_bytes(entry) for entry in manifest.layers)
    kept = [t for layer in resident.tensors.values() for tensors in layer.values() for t in tensors.values()]
    assert kept and all(t.device == torch.device(DEVICE) for t in kept)
    again, summary = score_prompts(model, ref.prompts, score, gpu_settings(resident=True), resident=resident)
    assert summary.bytes_read == 0
    assert_greedy_steps(first, ref, 3)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.scores, b.scores)


def test_peak_device_memory_follows_the_layer_not_the_model(tmp_path):
    """Six times as deep: the same peak GPU memory, two shard slots and cuBLAS's workspaces."""
    from flexorch.orchestrator.demo import build_checkpoint
    from flexorch.orchestrator.prepare import prepare_checkpoint
    from test_engine import tokenize

    allocated, sizes, largest, fixed = {}, {}, {}, {}
    for layers in (2, 12):
        src = build_checkpoint(tmp_path / f"src{layers}", "llama", hidden_size=512, intermediate_size=1536,
                               num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                               layout="safetensors")
        manifest = prepare_checkpoint(src, tmp_path / f"layers{layers}")
        prompts = tokenize(src)
        shutil.rmtree(src)
        torch.cuda.empty_cache()
        _, summary = score_prompts(tmp_path / f"layers{layers}", prompts, ScoreSpec("next_token_probs"),
                                   gpu_settings(layers_per_shard=1, storage="gpu"))
        allocated[layers] = summary.peak_device_memory - summary.device_fixed_bytes
        fixed[layers] = summary.device_fixed_bytes
        sizes[layers], largest[layers] = manifest.total_bytes, max(e.bytes for e in manifest.layers)
    print(f"model {sizes[2] / 1e6:.0f} -> {sizes[12] / 1e6:.0f} MB, peak GPU allocation {allocated[2] / 1e6:.1f} -> "
          f"{allocated[12] / 1e6:.1f} MB beside a fixed {fixed[12] / 1e6:.0f} MB (the context)")
    assert sizes[12] - sizes[2] > 120e6
    assert abs(allocated[12] - allocated[2]) < 0.05 * allocated[2]
    assert allocated[12] < 2 * largest[12] + 64 * 2**20  # two slots, cuBLAS's workspaces, small activations
    assert fixed[12] > 100e6  # a CUDA context is hundreds of MB


def test_a_cuda_out_of_memory_is_recognised_for_the_step_down():
    from flexorch.workers.stepdown import is_out_of_memory

    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(Exception) as raised:
        torch.empty(2 * free + (1 << 40), dtype=torch.uint8, device=DEVICE)
    assert is_out_of_memory(raised.value)


def test_calibration_measures_the_gpu():
    from flexorch.orchestrator.calibrate import measure_worker

    figures = measure_worker([DEVICE])
    assert figures["cuda_context_bytes"] > 100e6  # a CUDA context is hundreds of MB
    (device, rate), = figures["host_to_device_bytes_per_s"]
    assert device == DEVICE and rate > 1e9
    kinds = {(t["device"], t["dtype"]) for t in figures["throughput"]}
    assert {(DEVICE, "float16"), (DEVICE, "bfloat16"), (DEVICE, "float32")} <= kinds
    assert all(t["flops_per_s"] > 0 for t in figures["throughput"])
    assert 0 < figures["cuda_workspace_bytes"] < figures["cuda_context_bytes"]
    print(json.dumps({k: v for k, v in figures.items() if k != "throughput"}))


def test_submit_on_the_gpu_plans_the_gpu_and_matches_the_unsplit_model(tmp_path, checkpoint, layerwise, capsys):
    """devices: auto on a GPU machine: the probe (NVML) sees the GPU, the worker runs there, the
    report says so, and the scores are the un-split model's."""
    from flexorch.orchestrator import cli

    assert cli.main(["probe"]) == 0
    probe = capsys.readouterr().out
    assert torch.cuda.get_device_name(0) in probe, probe
    job = write_job(tmp_path, layerwise("llama"), devices="auto", generate_tokens=2)
    assert submit(job) == 0
    report = json.loads((tmp_path / "job.job" / "report.json").read_text())
    assert [w["device"] for w in report["workers"]] == [DEVICE], report["workers"]
    assert all(w["peak_device_memory"] > 0 for w in report["workers"])
    got = pickle.loads((tmp_path / "job.pkl").read_bytes())
    for mine, want in zip(got, reference_probs(checkpoint("llama"), steps=2)):
        np.testing.assert_allclose(mine, want, atol=PROBS_ATOL, rtol=0)

    # A limit below a CUDA context's few hundred MB cannot be met, and says so.
    assert submit(write_job(tmp_path, layerwise("llama"), "tiny", devices=[0], limits={"gpu_memory": "200MB"})) == 2
    assert "does not fit on cuda:0" in capsys.readouterr().err
    # What this test's own process holds on the GPU counts in the worker's peak where NVML cannot say
    # which process holds what (workers/devicememory.py).
    free, total = torch.cuda.mem_get_info(DEVICE)
    others = 0 if devicememory.own_bytes(torch.device(DEVICE)) is not None else total - free
    cap = 1_000_000_000
    streamed = write_job(tmp_path, layerwise("llama"), "streamed", devices=[0], layers_per_shard=1, storage="cpu",
                         limits={"gpu_memory": "1GB"})
    assert submit(streamed) == 0
    again = pickle.loads((tmp_path / "streamed.pkl").read_bytes())
    for a, b in zip(got, again):  # one step here, two above
        np.testing.assert_allclose(b, a[:, :1], atol=PROBS_ATOL, rtol=0)
    report = json.loads((tmp_path / "streamed.job" / "report.json").read_text())
    planned, worker = report["plan"]["workers"][0], report["workers"][0]
    assert planned["settings"]["storage"] == "cpu", planned
    measured = worker["peak_device_memory"] - others
    print(f"peak GPU memory: predicted {planned['predicted_peak_device_memory'] / 1e6:.0f} MB, "
          f"measured {measured / 1e6:.0f} MB ({others / 1e6:.0f} MB of other processes left out), "
          f"cap {cap / 1e6:.0f} MB")
    assert 0 < measured <= planned["predicted_peak_device_memory"] <= cap


def test_settings_change_nothing_but_rounding_on_the_gpu(layerwise, references, tmp_path):
    """Two slots or one, resident or streamed, every storage: the same scores within float32 rounding."""
    ref = references("mistral")
    model = layerwise("mistral")
    runs = [gpu_settings(), gpu_settings(double_buffer=False, storage="cpu"), gpu_settings(resident=True),
            gpu_settings(layers_per_shard=4, storage="disk", disk_folder=str(tmp_path), batch_tokens=30)]
    outs = [score_prompts(model, ref.prompts, ScoreSpec("suffix_logprob"), run)[0] for run in runs]
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_allclose(a.scores["logprob"], b.scores["logprob"], atol=1e-5, rtol=0)
