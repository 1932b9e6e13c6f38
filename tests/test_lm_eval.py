"""flexorch as an lm-eval model: per-request log-likelihoods, is_greedy and task metrics equal
lm-eval's own `hf` model on the same tiny checkpoint (float32), on a multiple-choice task and a
perplexity task defined locally (offline); two devices answer as one; a request longer than the
model's limit is left-truncated as lm-eval does; a re-run resumes; a generative task (generate_until)
gives the same text and metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[lm-eval]')")
pytest.importorskip("accelerate", reason="lm-eval's hf model (the reference) needs accelerate")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import flexorch  # noqa: E402
from flexorch.lm_eval import FlexorchLM, _Pair, _shared_context_prompts, write_json_task  # noqa: E402

MC, PPL, GEN = "flexorch_tiny_mc", "flexorch_tiny_ppl", "flexorch_tiny_gen"
TOLERANCE = 1e-4  # per request, float32
# A rolling total (thousands of nats) is summed in float32 by lm-eval's hf model: one float32 ulp
# at 4000 is 2.4e-4, so totals compare relatively (flexorch sums in float64).
TOTAL_RTOL = 1e-6
LONG = ("Streaming a large language model layer by layer lets a small graphics card run a model far larger "
        "than its memory: load a layer, pass every prompt through it, free it, load the next one. ") * 8
QUESTIONS = [
    {"question": "Question: What is the capital of France? Answer:", "choices": ["Paris", "Mars", "Rome"], "answer": 0},
    {"question": "Question: Which planet is known as the red planet? Answer: ", "choices": ["Mars", "Paris"],
     "answer": 0},  # a trailing space: lm-eval moves it to the continuation
    {"question": "2 + 2 =", "choices": ["4", "5", "4 4"], "answer": 0},
    {"question": LONG + "Question: what does it load next? Answer:", "choices": ["the next one", "a layer"],
     "answer": 0},  # longer than the model's 256 positions: left-truncated
]
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": LONG}, {"text": "yes no maybe"}]

@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    write_json_task(root, MC, QUESTIONS, "multiple_choice", ("acc", "acc_norm"), doc_to_text="{{question}}",
                    doc_to_choice="choices", doc_to_target="answer")
    return write_json_task(root, PPL, TEXTS, "loglikelihood_rolling", ("word_perplexity", "byte_perplexity",
                                                                       "bits_per_byte"),
                           doc_to_text="", doc_to_target="{{text}}")


def evaluate(model, tasks_dir: Path, tasks=(MC, PPL), **kwargs) -> dict:
    # Only the local tasks: indexing lm-eval's thousands of built-in ones takes seconds.
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, log_samples=True,
                           bootstrap_iters=0, **kwargs)


def responses(out: dict, task: str) -> list:
    """Per request, in lm-eval's order: (loglikelihood, is_greedy), or the rolling total."""
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [resp[0] for sample in samples for resp in sample["resps"]]


@pytest.fixture(scope="module")
def reference(checkpoint, tasks_dir) -> dict:
    """lm-eval's own hf model on the un-split checkpoint."""
    args = f"pretrained={checkpoint('llama')},dtype=float32,device=cpu"
    return evaluate("hf", tasks_dir, model_args=args, batch_size=4)


@pytest.fixture(scope="module")
def job_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lm-eval-jobs")


@pytest.fixture(scope="module")
def ours(layerwise, tasks_dir, job_root) -> dict:
    return evaluate(FlexorchLM(pretrained=str(layerwise("llama")), devices="cpu", job_dir=str(job_root),
                               progress=False), tasks_dir)


def assert_same_answers(ours: list, reference: list) -> None:
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference):
        if isinstance(theirs, (list, tuple)):  # loglikelihood: (logprob, is_greedy)
            assert mine[0] == pytest.approx(float(theirs[0]), abs=TOLERANCE) and bool(mine[1]) == bool(theirs[1])
        else:  # loglikelihood_rolling: the text's total
            assert mine == pytest.approx(float(theirs), abs=TOLERANCE, rel=TOTAL_RTOL)


@pytest.mark.parametrize("task", [MC, PPL])
def test_requests_equal_lm_evals_hf_model(ours, reference, task):
    assert_same_answers(responses(ours, task), responses(reference, task))


@pytest.mark.parametrize("task, metrics", [(MC, ("acc,none", "acc_norm,none")),
                                           (PPL, ("word_perplexity,none", "byte_perplexity,none"))])
def test_task_metrics_equal_lm_evals_hf_model(ours, reference, task, metrics):
    for metric in metrics:
        assert ours["results"][task][metric] == pytest.approx(reference["results"][task][metric], rel=1e-4)


def test_the_long_request_is_longer_than_the_model_and_still_matches(layerwise, ours, reference):
    lm = FlexorchLM(pretrained=str(layerwise("llama")), job_dir="unused")
    context, continuation = lm._encode_pair(QUESTIONS[3]["question"], " the next one")
    assert len(context) + len(continuation) > lm.max_length + 1 == 257
    assert len(lm.tok_encode(LONG)) > lm.max_length  # and the perplexity text spans several windows
    long_requests = slice(8, 10)  # the fourth question's two choices (3 + 2 + 3 before it)
    assert_same_answers(responses(ours, MC)[long_requests], responses(reference, MC)[long_requests])


def test_two_devices_answer_as_one_and_a_rerun_resumes(layerwise, tasks_dir, job_root, ours, tmp_path):
    two = evaluate(FlexorchLM(pretrained=str(layerwise("llama")), devices="cpu+cpu", job_dir=str(tmp_path),
                              progress=False), tasks_dir, tasks=(MC,))  # a new job_dir: computed again
    assert_same_answers(responses(two, MC), responses(ours, MC))
    (job,) = tmp_path.iterdir()  # one job for every loglikelihood request of the run
    assert json.loads((job / "report.json").read_text())["workers"][1]["prompts"] > 0
    # The same evaluation again, from the command line (`flexorch eval`), on two workers: every
    # prompt is reused.
    again = subprocess.run(
        [sys.executable, "-m", "flexorch.orchestrator.cli", "eval", "--model_args",
         f"pretrained={layerwise('llama')},devices=cpu+cpu,job_dir={job_root},progress=False", "--tasks", MC,
         "--include_path", str(tasks_dir)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"|{MC}|" in again.stdout.replace(" ", "")  # lm-eval's results table
    reports = [json.loads(p.read_text()) for p in job_root.glob("loglikelihood-*/report.json")]
    assert [r["prompts_computed"] for r in reports] == [0] and reports[0]["prompts_reused"] >= len(QUESTIONS)


def test_requests_sharing_a_context_become_one_prompt():
    pairs = [_Pair((1, 2), (3,)), _Pair((1, 2), (4, 5)), _Pair((1,), (3,)), _Pair((1, 2), (3,))]
    prompts, where = _shared_context_prompts(pairs)
    assert prompts == [{"prefix_ids": [1, 2], "suffix_ids": [[3], [4, 5]]}, {"prefix_ids": [1], "suffix_ids": [[3]]}]
    assert where == [(0, 0), (0, 1), (1, 0), (0, 0)]


@pytest.fixture(scope="module")
def gen_tasks(tmp_path_factory) -> Path:
    """A local generate_until task: greedy, stopped by its `until` strings (one the tiny model's
    text often holds), the EOS or max_gen_toks, with one request asking for fewer tokens."""
    root = tmp_path_factory.mktemp("lm-eval-gen")
    rows = [{"question": q["question"], "answer": q["choices"][0]} for q in QUESTIONS[:3]] + [{"question": LONG, "answer": "x"}]
    write_json_task(root, GEN, rows, "generate_until", ("exact_match",), doc_to_text="{{question}}",
                    doc_to_target="{{answer}}")
    spec = root / f"{GEN}.yaml"
    spec.write_text(spec.read_text() + "generation_kwargs:\n  until: [\"n\", \"\\n\\n\"]\n  max_gen_toks: 10\n"
                    "  do_sample: false\n")
    return root


def test_generate_until_equals_lm_evals_hf_model(checkpoint, layerwise, gen_tasks, tmp_path):
    """The same text per request and the same metric as lm-eval's hf model (float32, one request
    per batch: no padding), from one flexorch job."""
    args = f"pretrained={checkpoint('llama')},dtype=float32,device=cpu"
    reference = evaluate("hf", gen_tasks, tasks=(GEN,), model_args=args, batch_size=1)
    ours = evaluate(FlexorchLM(pretrained=str(layerwise("llama")), devices="cpu", job_dir=str(tmp_path), progress=False),
                    gen_tasks, tasks=(GEN,))
    texts = responses(ours, GEN)
    assert texts == responses(reference, GEN)
    assert any(t for t in texts) and len(set(texts)) > 1  # something was generated, and not one text for all
    assert ours["results"][GEN]["exact_match,none"] == reference["results"][GEN]["exact_match,none"]
    (job,) = tmp_path.iterdir()  # one job for every generate_until request of the run
    assert json.loads((job / "report.json").read_text())["prompts"] == 4


def test_bad_model_args_are_user_errors(tmp_path):
    with pytest.raises(flexorch.UserError, match="pretrained: .* is not a model dir"):
        FlexorchLM(pretrained=str(tmp_path / "missing"))


def test_eval_command_refuses_bad_model_args_in_one_line(tmp_path, tasks_dir):
    run = subprocess.run([sys.executable, "-m", "flexorch.lm_eval", "--model_args", f"pretrained={tmp_path}/none",
                          "--tasks", MC, "--include_path", str(tasks_dir)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == f"error: model_args: pretrained: " \
        f"{tmp_path}/none is not a model dir"


def test_a_model_prepared_again_in_place_starts_a_fresh_job(checkpoint, tmp_path):
    """The job folder is named by the model's manifest: new weights in the same dir are a new job,
    not "holds results of a different job"."""
    from flexorch.orchestrator.demo import build_checkpoint
    from flexorch.orchestrator.prepare import prepare_checkpoint

    model = tmp_path / "model.layers"
    prepare_checkpoint(checkpoint("llama"), model)
    lm = FlexorchLM(pretrained=str(model), devices="cpu", job_dir=str(tmp_path / "jobs"), progress=False)
    pairs = [_Pair(tuple(lm.tok_encode("The capital of France is")), tuple(lm.tok_encode(" Paris")))]
    first = lm._score(pairs, "loglikelihood")
    prepare_checkpoint(build_checkpoint(tmp_path / "other", "llama", seed=1), model, force=True)
    second = lm._score(pairs, "loglikelihood")
    assert first != second  # other weights, scored afresh
    assert len(list((tmp_path / "jobs").iterdir())) == 2
