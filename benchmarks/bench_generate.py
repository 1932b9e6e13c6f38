"""Benchmark 8 (issue 17): the cost of each extra greedy step, with and without the KV cache.

flexorch streams the model once per step either way (weights are read G times); what the cache
changes is the compute: without it every step runs each prompt's prefix and suffixes again, one
token longer per suffix; with it a later step runs one token per suffix against the kept keys and
values. Per step, from the engine's progress events: seconds of that pass. Goal: an extra step
costs less than a quarter of the first for 150-token prompts. Every run's scores and generated ids
are compared with the recompute run's (they must agree within float rounding).

    python benchmarks/bench_generate.py [--quick] [--steps 4] [--storages cpu,disk] [--prompts 32]
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import common as c

GOAL = 0.25  # an extra step's time over the first step's


def child_generate(params: dict) -> dict:
    import time

    import numpy as np

    from flexorch.contract.protocol import EngineSettings, ScoreSpec
    from flexorch.workers.engine import score_prompts

    prompts = c.prompts_from_json(params["prompts"])
    step_ends: dict[int, float] = {}

    def on_progress(event) -> None:
        if event.stage == event.stages:  # the head shard: the step's pass is over
            step_ends[event.step] = event.seconds

    with tempfile.TemporaryDirectory() as folder:
        settings = EngineSettings("cpu", "float32", 1, params["storage"], params["batch_tokens"],
                                  disk_folder=folder, verify_checksums=False, kv_cache=params["kv_cache"])
        score = ScoreSpec("next_token_probs", generate_tokens=params["steps"])
        score_prompts(params["layerwise"], prompts[:1], ScoreSpec(), settings)  # warm-up: kernels, allocator
        start = time.perf_counter()
        results, summary = score_prompts(params["layerwise"], prompts, score, settings, on_progress=on_progress)
        seconds = time.perf_counter() - start
    ends = [step_ends[s] for s in range(1, params["steps"] + 1)]
    np.save(params["scores"], np.concatenate([r.scores.reshape(-1) for r in results]))
    return {"seconds": seconds, "step_seconds": [b - a for a, b in zip([0.0] + ends, ends)],
            "generated": [list(map(list, r.generated)) for r in results], "tokens": summary.tokens,
            "bytes_read": summary.bytes_read}


def main() -> None:
    import numpy as np

    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--storages", default="cpu,disk", help="tiers the cache is tried in")
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--prompts", type=int, help="number of prompts (default: the prompt set's)")
    args = parser.parse_args()
    shape = c.QUICK_SHAPE if args.quick else c.DEFAULT_SHAPE
    prompt_set = c.QUICK_PROMPTS if args.quick else c.PromptSet()
    if args.prompts:
        prompt_set = dataclasses.replace(prompt_set, n_prompts=args.prompts)
    machine = c.machine_info()
    checkpoint, layerwise = c.ensure_checkpoint(shape), c.ensure_layerwise(shape)
    prompts = c.tokenize(checkpoint, c.make_texts(prompt_set))
    c.warm_page_cache([layerwise])
    methods = [("recompute", "cpu", False)] + [(f"kv cache, {s}", s, True) for s in args.storages.split(",")]
    runs, rows = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for name, storage, kv_cache in methods:
            scores = Path(scratch) / f"{len(runs)}.npy"
            runs[name] = c.run_child(Path(__file__), {
                "method": "generate", "layerwise": str(layerwise), "prompts": c.prompts_to_json(prompts),
                "steps": args.steps, "storage": storage, "kv_cache": kv_cache, "batch_tokens": args.batch_tokens,
                "scores": str(scores)})
            runs[name]["max_abs_diff_to_recompute"] = float(np.abs(
                np.load(scores) - np.load(Path(scratch) / "0.npy")).max()) if scores.exists() else None
    base = runs["recompute"]
    for name, run in runs.items():
        if "step_seconds" not in run:
            rows.append([name, "-", "-", "-", "-", "-", run.get("error", "")[:60]])
            continue
        first, extra = run["step_seconds"][0], run["step_seconds"][1:]
        ratio = max(extra) / first if extra else None
        run["extra_over_first"] = ratio
        run["same_ids_as_recompute"] = run["generated"] == base.get("generated")
        rows.append([name, c.fmt_seconds(run["seconds"]), c.fmt_seconds(first),
                     " / ".join(f"{s:.2f}" for s in extra), c.fmt_ratio(ratio, f"<= {GOAL}"),
                     c.fmt_bytes(run.get("peak_rss")),
                     f"ids {'=' if run['same_ids_as_recompute'] else '!='}, max |d p| "
                     f"{run['max_abs_diff_to_recompute']:.1e}"])
    tokens = sum(p.n_tokens for p in prompts)
    caption = (f"{shape.name}, {len(prompts)} prompts of ~{tokens // len(prompts)} tokens ({prompt_set.n_suffixes} "
               f"suffixes), {args.steps} greedy steps, 1 layer per shard, warm page cache")
    c.print_table("each greedy step, with and without the KV cache", ("method", "total s", "step 1 s",
                  "extra steps s", "extra / first", "peak RSS", "vs recompute"), rows, caption)
    for run in runs.values():
        run.pop("generated", None)
    path = c.write_results("generate", {"goal_extra_over_first": GOAL, "quick": args.quick, "model": shape.name,
                                        "prompt_set": vars(prompt_set), "steps": args.steps, "runs": runs},
                           machine, args.machine)
    print(f"results: {path}")


if __name__ == "__main__":
    if c.is_child():
        c.child_main({"generate": child_generate})
    else:
        main()
