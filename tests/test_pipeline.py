"""Pipeline mode: stages split the shards and hand activations on (workers/pipeline.py).

First the engine's stages run as threads of this process linked by queue.Queue (the ring the
controller builds from multiprocessing queues, minus the processes): every score kind and greedy
generation equal data mode bit for bit, each stage reads only its shards, and a slow last stage
keeps the others from running ahead. Then end to end through `flexorch submit` with worker
processes, a stage killed mid-job, resume, and the planner's choice between data and pipeline.
"""

from __future__ import annotations

import json
import pickle
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from flexorch.orchestrator import controller, planner
from flexorch.orchestrator.planner import make_plan
from flexorch.contract.shards import plan_shards
from flexorch.workers.engine import EngineHooks, score_prompts
from flexorch.workers.layerfile import LayerwiseModel
from flexorch.workers.pipeline import PipelineStage, Ring
from flexorch.contract.protocol import EngineSettings, ScoreSpec
from flexorch.contract.messages import WorkerHooks
from flexorch.contract.parts import read_part_indices

from test_controller import PROMPTS, submit, write_job
from test_engine import assert_greedy_extension, references, tokenize  # noqa: F401 (references: a fixture)
from test_planner import Spec, machine, small_fp32

BATCH_TOKENS = 64  # several batches per pass for the test prompts


def settings(**changes) -> EngineSettings:
    base = dict(device="cpu", dtype="float32", layers_per_shard=1, storage="cpu", batch_tokens=BATCH_TOKENS,
                threads=1)
    return EngineSettings(**{**base, **changes})


def run_stages(model_dir, rounds, score: ScoreSpec, n: int, hooks=None, capacity: int = 2,
               stage_settings: EngineSettings | None = None, **changes):
    """Run `n` stages as threads over `rounds` (lists of prompts): (per stage, per round: (results,
    summary)), and the rings (for their inbox counters). `changes`: to the engine settings."""
    channels = [queue.Queue(maxsize=capacity) for _ in range(n)]
    rings = [Ring(i, n, channels[i], channels[(i + 1) % n]) for i in range(n)]
    out: list[list] = [[] for _ in range(n)]
    errors = []

    def stage(i):
        try:
            for round_id, prompts in enumerate(rounds):
                out[i].append(score_prompts(model_dir, prompts, score, stage_settings or settings(**changes),
                                            hooks=(hooks or {}).get(i),
                                            link=PipelineStage(i, n, rings[i], round_id)))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
            raise

    threads = [threading.Thread(target=stage, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for ring in rings:
        ring.close()
    assert not errors and not any(t.is_alive() for t in threads)
    return out, rings


def assert_same_results(got, want):
    assert [r.index for r in got] == [r.index for r in want]
    for a, b in zip(got, want):
        assert a.generated == b.generated
        if isinstance(b.scores, dict):
            assert a.scores.keys() == b.scores.keys()
            for key in b.scores:
                assert np.array_equal(a.scores[key], b.scores[key]), key
        else:
            assert a.scores.dtype == b.scores.dtype and np.array_equal(a.scores, b.scores)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("score", [ScoreSpec("next_token_probs"), ScoreSpec("token_probs", token_ids=(5, 17, 42)),
                                   ScoreSpec("suffix_logprob"), ScoreSpec("next_token_probs", generate_tokens=2)],
                         ids=["next_token_probs", "token_probs", "suffix_logprob", "generate2"])
def test_stages_equal_data_mode_bit_for_bit(layerwise, score, n):
    model = layerwise("llama")
    prompts = tokenize(model)
    want, _ = score_prompts(model, prompts, score, settings())
    out, _ = run_stages(model, [prompts], score, n)
    head = (len(plan_shards(LayerwiseModel(model).manifest, 1)) - 1) % n
    for i, per_round in enumerate(out):
        results, summary = per_round[0]
        if i == head:
            assert_same_results(results, want)
        else:
            assert results == []  # only the head stage holds scores


@pytest.mark.parametrize("score", [ScoreSpec("suffix_logprob"), ScoreSpec("next_token_probs", generate_tokens=2)],
                         ids=["suffix_logprob", "generate2"])
def test_a_head_in_vocabulary_steps_stays_on_its_stage(large_vocab, score):
    """The head's steps share its shard index, so one stage runs them all; the embedding's stage gathers
    each step's rows; scores equal data mode's."""
    model = large_vocab("qwen2")[1]  # tied: the head reads the embedding's file, on another stage
    prompts = tokenize(model)
    want, _ = score_prompts(model, prompts, score, settings())
    out, _ = run_stages(model, [prompts], score, 2)
    head = plan_shards(LayerwiseModel(model).manifest, 1)[-1].index % 2
    assert_same_results(out[head][0][0], want)


def test_streamed_experts_stay_on_their_layers_stage(layerwise):
    """A MoE layer's steps share its shard index, so one stage runs them all; scores equal data mode's."""
    model = layerwise("qwen2_moe")
    prompts = tokenize(model)
    streamed = settings(experts_per_group=3)
    score = ScoreSpec("next_token_probs", generate_tokens=2)
    want, _ = score_prompts(model, prompts, score, streamed)
    out, _ = run_stages(model, [prompts], score, 2, stage_settings=streamed)
    head = plan_shards(LayerwiseModel(model).manifest, 1, 3)[-1].index % 2
    assert_same_results(out[head][0][0], want)


@pytest.mark.parametrize("n, steps, layers", [(2, 5, 1), (3, 3, 2), (2, 2, 3)])
def test_stages_with_the_kv_cache_equal_the_unsplit_greedy_extension(layerwise, references, n, steps, layers):
    """Each stage keeps the keys and values of its own layers; later steps hand on one token per suffix."""
    model, ref = layerwise("llama"), references("llama")
    out, _ = run_stages(model, [ref.prompts], ScoreSpec(generate_tokens=steps), n, layers_per_shard=layers)
    head = (len(plan_shards(LayerwiseModel(model).manifest, layers)) - 1) % n
    assert_greedy_extension(out[head][0][0], ref, steps)


def test_each_stage_reads_only_its_shards(layerwise):
    model = layerwise("llama")
    prompts = tokenize(model)
    score = ScoreSpec(generate_tokens=2)
    _, data = score_prompts(model, prompts, score, settings())
    out, _ = run_stages(model, [prompts], score, 3)
    per_stage = [per_round[0][1].bytes_read for per_round in out]
    # One model per pass between the three of them (a data worker reads it whole, per pass).
    assert sum(per_stage) == data.bytes_read
    assert all(0 < b < data.bytes_read for b in per_stage)


def test_a_slow_last_stage_keeps_the_others_from_running_ahead(layerwise):
    """The head stage sleeps before each batch; the other stages could run through every round at
    once, but the step barrier holds each stage's waiting activations to one round's batches."""
    model = layerwise("llama")
    prompts = tokenize(model)
    rounds = [prompts[i:i + 1] for i in range(len(prompts))] * 2  # 8 rounds of one prompt: one batch each
    n = 2
    head = (len(plan_shards(LayerwiseModel(model).manifest, 1)) - 1) % n
    slow = EngineHooks(before_batch=lambda step, shard, batch: time.sleep(0.01))  # test hook: a slow device
    out, rings = run_stages(model, rounds, ScoreSpec(), n, hooks={head: slow}, capacity=1)
    assert max(ring.inbox.peak_waiting_batches for ring in rings) == 1  # without the barrier: up to 8
    assert all(ring.inbox.waiting_batches == 0 for ring in rings)
    assert len(out[head]) == len(rounds)


# -- end to end: worker processes linked by multiprocessing queues ----------------------------------
def one_prompt_per_round(mp: pytest.MonkeyPatch) -> None:
    """One prompt per round (a tiny model's prompts would otherwise be one round), so a stage can be
    stopped between rounds; data and pipeline runs then have the same rounds, hence the same batches."""
    mp.setattr(planner.search, "ROUND_TARGET_SECONDS", 0.0)
    mp.setattr(planner.search, "ROUND_MIN_COMPUTE_OVER_READ", 0.0)


@pytest.fixture()
def rounds_of_one_prompt(monkeypatch):
    one_prompt_per_round(monkeypatch)


JOB = {"generate_tokens": 2, "batch_tokens": 256, "layers_per_shard": 1}


def assert_same_scores(output, data_output: bytes) -> None:
    """The pipeline's output against the data worker's. Not bit for bit: the stages run with fewer
    threads each (the planner splits the cores), and the KV cache's steps multiply matrices of a
    few rows, whose float32 sums BLAS splits differently by thread count (at equal threads they are
    bit-equal: test_stages_equal_data_mode_bit_for_bit)."""
    got, want = pickle.loads(Path(output).read_bytes()), pickle.loads(data_output)
    assert len(got) == len(want) == len(PROMPTS)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, layerwise):
    """One data-mode worker: (output bytes, report)."""
    tmp = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        one_prompt_per_round(mp)
        assert submit(write_job(tmp, layerwise("llama"), **JOB)) == 0
    return (tmp / "job.pkl").read_bytes(), json.loads((tmp / "job.job" / "report.json").read_text())


def test_two_stages_equal_one_data_worker_and_read_one_model_between_them(tmp_path, layerwise, data_run,
                                                                          rounds_of_one_prompt):
    data_output, data_report = data_run
    job = write_job(tmp_path, layerwise("llama"), devices=["cpu", "cpu"], parallel="pipeline", **JOB)
    assert submit(job) == 0
    assert_same_scores(tmp_path / "job.pkl", data_output)
    report = json.loads((tmp_path / "job.job" / "report.json").read_text())
    assert report["plan"]["parallel"] == "pipeline" and report["status"] == "completed"
    assert [w["status"] for w in report["workers"]] == ["finished", "finished"]
    # Same rounds and steps: the stages' reads add up to exactly the data worker's (one model per pass).
    assert sum(w["bytes_read"] for w in report["workers"]) == data_report["workers"][0]["bytes_read"]
    assert all(w["bytes_read"] > 0 for w in report["workers"])
    parts = list((tmp_path / "job.job" / "parts").glob("*.npz"))
    assert len(parts) == len(PROMPTS) and all(p.name.startswith("part-worker1-") for p in parts)  # the head's


def test_a_killed_middle_stage_fails_the_pipeline_and_resubmit_resumes(tmp_path, layerwise, data_run,
                                                                       rounds_of_one_prompt, capsys):
    job = write_job(tmp_path, layerwise("llama"), devices=["cpu", "cpu", "cpu"], parallel="pipeline", **JOB)
    # Stage 1 of 3 (the head is stage 2) dies after two rounds; stages 0 and 2 then wait on the ring
    # for ever, so the job ends only because the controller saw the death and stopped them.
    faults = {"worker1": WorkerHooks(sigkill_after_rounds=2)}
    assert controller.submit(job, Console(stderr=True), faults=faults) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: worker worker1 (cpu, pid ") and "killed by SIGKILL" in err[-1]
    assert not (tmp_path / "job.pkl").exists()
    report = json.loads((tmp_path / "job.job" / "report.json").read_text())
    assert [w["status"] for w in report["workers"]] == ["stopped", "failed", "stopped"]
    committed = sum(len(read_part_indices(p)) for p in (tmp_path / "job.job" / "parts").glob("*.npz"))
    assert 1 <= committed <= 2

    assert submit(job) == 0
    report = json.loads((tmp_path / "job.job" / "report.json").read_text())
    assert report["prompts_reused"] == committed and report["runs"] == 2
    assert_same_scores(tmp_path / "job.pkl", data_run[0])


# -- the planner's choice ---------------------------------------------------------------------------
def test_auto_chooses_pipeline_when_reading_dominates_and_data_when_computing_does():
    from dataclasses import replace

    # small_fp32: one pass reads 16 x 51,388,416 + 2 x 131,072,000 + norm = 1.085 GB. Two CPU workers
    # of 4 cores at 50 GFLOP/s each; a 150-token prompt costs about 62 GFLOPs.
    slow_disk = replace(machine(cpus=8), disk_read_bytes_per_s=100e6)
    spec = Spec(parallel="auto", devices=("cpu", "cpu"))
    few = make_plan(slow_disk, small_fp32(), spec, [150] * 2)
    # data: each worker reads the model (9.5 s at 100 MB/s: of the embedding only its prompt's rows) for one
    # prompt of compute (0.3 s)
    data, pipeline = few.predictions
    assert (data.parallel, pipeline.parallel) == ("data", "pipeline")
    assert data.read_seconds > data.compute_seconds
    # (the embedding's rows: 150 tokens and the padding allowance, 187.5 of 32000; the norm's 4 KB)
    assert data.read_seconds == pytest.approx((16 * 51_388_416 + 131_072_000 * (1 + 187.5 / 32000) + 4096) / 100e6)
    # 1 layer per shard (more would not read faster): stage 0 reads the embedding's rows and 8 layers, stage 1
    # eight layers and norm + head, the busier: 5.4 s.
    assert pipeline.read_seconds == pytest.approx((8 * 51_388_416 + 131_072_000) / 100e6, rel=1e-4)
    assert all(w.settings.layers_per_shard == 1 for w in few.workers)
    assert few.parallel == "pipeline" and any(r.startswith("parallel pipeline (auto)") for r in few.reasons)
    stages = few.workers
    assert [w.prompt_indices for w in stages] == [(0, 1), (0, 1)]  # every stage sees every prompt
    assert stages[0].rounds == stages[1].rounds and stages[0].settings == stages[1].settings
    assert all(w.settings.storage == "cpu" for w in stages)

    many = make_plan(machine(cpus=8), small_fp32(), spec, [150] * 2000)  # 2 GB/s: 0.5 s read per round
    data, _ = many.predictions
    assert data.compute_seconds > data.read_seconds
    assert many.parallel == "data" and any(r.startswith("parallel data (auto)") for r in many.reasons)
    assert [len(w.prompt_indices) for w in many.workers] == [1000, 1000]


def test_pipeline_is_refused_on_mixed_devices_and_off_ram_storage():
    from test_planner import SMALL_GPU

    from flexorch.contract.errors import UserError

    with pytest.raises(UserError, match="devices: parallel: pipeline needs devices of one kind"):
        make_plan(machine(SMALL_GPU), small_fp32(), Spec(parallel="pipeline", devices=("cpu", "cuda:0")), [150])
    with pytest.raises(UserError, match="storage: disk is not supported with parallel: pipeline"):
        make_plan(machine(), small_fp32(), Spec(parallel="pipeline", devices=("cpu", "cpu"), storage="disk"), [150])
