"""Benchmark 10 (issue 14): one lm-eval multiple-choice task run by `flexorch` against lm-eval's own
`hf` model, whole in RAM and with accelerate's disk offload capped below the model's size
(`parallelize=True,max_cpu_memory=...`, what lm-eval users do today for a model larger than memory).

Each method runs `lm_eval.simple_evaluate` in its own process on the same local task (the prompts of
common.PromptSet as questions, their suffixes as choices) and reports wall time, peak RSS (its own
and its workers'), and the task's acc; the log-likelihoods must agree, so acc must be equal.

    python benchmarks/bench_lm_eval.py [--quick] [--cap 0.3GB]
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TASK = "flexorch_bench_mc"


def write_task(folder: Path, prompts: common.PromptSet) -> Path:
    from flexorch.lm_eval import write_json_task

    rows = [{"question": prefix, "choices": [s.lstrip() for s in suffixes], "answer": 0}
            for prefix, suffixes in common.make_texts(prompts)]
    return write_json_task(folder, TASK, rows, "multiple_choice", ("acc",), doc_to_text="{{question}}",
                           doc_to_choice="choices", doc_to_target="answer")


def run_method(params: dict) -> dict:
    """In a child: one simple_evaluate; its time, acc and peak RSS (workers included)."""
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if params["method"].startswith("flexorch"):
        from flexorch.lm_eval import FlexorchLM

        # flexorch_1layer: one decoder layer resident at a time, what a RAM cap makes the planner choose
        shard = {"layers_per_shard": 1} if params["method"] == "flexorch_1layer" else {}
        model, args = FlexorchLM(pretrained=params["layerwise"], devices="cpu", job_dir=params["job_dir"],
                                 progress=False, **shard), None
    else:
        model, args = "hf", {"pretrained": params["checkpoint"], "dtype": "float32", "device": "cpu"}
        if params["method"] == "hf_offload":
            args |= {"parallelize": True, "max_cpu_memory": params["cap"], "offload_folder": params["job_dir"]}
    manager = TaskManager(include_path=params["tasks"], include_defaults=False)
    start = time.perf_counter()
    out = simple_evaluate(model=model, model_args=args, tasks=[TASK], task_manager=manager, batch_size=4,
                          bootstrap_iters=0)
    seconds = time.perf_counter() - start
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"seconds": seconds, "acc": out["results"][TASK]["acc,none"],
            "peak_rss": max(common.peak_rss(), workers)}


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cap", default="0.3GB", help="max_cpu_memory of the offloaded hf model")
    parser.add_argument("--methods", default="flexorch,flexorch_1layer,hf,hf_offload")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per method")
    args = parser.parse_args()
    shape = common.QUICK_SHAPE if args.quick else common.DEFAULT_SHAPE
    prompts = common.QUICK_PROMPTS if args.quick else common.PromptSet()
    checkpoint, layerwise = common.ensure_checkpoint(shape), common.ensure_layerwise(shape)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tasks = write_task(Path(tmp), prompts)
        for method in args.methods.split(","):
            work = Path(tmp) / method
            params = {"method": method, "checkpoint": str(checkpoint), "layerwise": str(layerwise),
                      "tasks": str(tasks), "job_dir": str(work), "cap": args.cap}
            results[method] = common.run_child(Path(__file__), params, timeout=args.timeout)
            print(f"{method}: {json.dumps(results[method])}", flush=True)  # kept if a later method never ends
    weights = sum(p.stat().st_size for p in common.weight_files(checkpoint))
    rows = [[m, common.fmt_seconds(r.get("seconds")), common.fmt_bytes(r.get("peak_rss")), r.get("acc", r.get("error"))]
            for m, r in results.items()]
    common.print_table(f"one lm-eval task, {prompts.n_prompts} questions x {prompts.n_suffixes} choices, "
                       f"{shape.name} ({common.fmt_bytes(weights)})", ["method", "seconds", "peak RSS", "acc"], rows,
                       caption=f"hf_offload: max_cpu_memory={args.cap}, the rest on disk")
    machine = common.machine_info()
    path = common.write_results("lm-eval", {"quick": args.quick, "shape": shape.name, "weights_bytes": weights,
                                            "prompts": vars(prompts), "cap": args.cap, "results": results}, machine,
                                args.machine)
    print(f"written {path}")


if __name__ == "__main__":
    if common.is_child():
        common.child_main({"flexorch": run_method, "flexorch_1layer": run_method, "hf": run_method,
                           "hf_offload": run_method})
    else:
        main()
