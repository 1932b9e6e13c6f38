"""Benchmark 1 (issue 7): flexorch streaming against the same arithmetic with the whole model in memory.

(a) flexorch: score_prompts on the layerwise dir, storage cpu, one decoder layer per shard, with and
    without sha256 verification of every layer read;
(b) the un-split model loaded with AutoModelForCausalLM and held in memory, the same packed batches
    (prefix once, suffixes after it) and masks run through every layer in turn.
Weights are in the page cache (read once before the runs), so (a)/(b) is the cost of streaming
itself. Goal: (a) within 1.15x of (b). Run on a model of several hundred MB and one twice as deep.

    python benchmarks/bench_limit.py [--quick] [--repeats N]
"""

from __future__ import annotations

from pathlib import Path

import common as c

GOAL = 1.15


def child_flexorch(params: dict) -> dict:
    prompts = c.prompts_from_json(params["prompts"])
    layerwise = Path(params["layerwise"])
    c.flexorch_run(layerwise, prompts[:1], verify=params["verify"])  # warm-up: kernels, allocator
    runs = [c.flexorch_run(layerwise, prompts, verify=params["verify"], batch_tokens=params["batch_tokens"])
            for _ in range(params["repeats"])]
    best = min(runs, key=lambda run: run["seconds"])
    return {**best, "all_seconds": [run["seconds"] for run in runs]}


def child_in_memory(params: dict) -> dict:
    import time

    prompts = c.prompts_from_json(params["prompts"])
    start = time.perf_counter()
    model = c.load_hf_model(Path(params["checkpoint"]))
    load_seconds = time.perf_counter() - start
    c.score_in_memory(model, prompts[:1])  # warm-up
    seconds = [c.score_in_memory(model, prompts, params["batch_tokens"]) for _ in range(params["repeats"])]
    return {"seconds": min(seconds), "all_seconds": seconds, "load_seconds": load_seconds}


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method; the fastest counts")
    parser.add_argument("--batch-tokens", type=int, default=1024)
    args = parser.parse_args()
    shape = c.QUICK_SHAPE if args.quick else c.DEFAULT_SHAPE
    prompt_set = c.QUICK_PROMPTS if args.quick else c.PromptSet()
    machine = c.machine_info()
    script = Path(__file__)
    rows, runs, prediction_rows = [], [], []
    for model in (shape, shape.deeper(2)):
        checkpoint, layerwise = c.ensure_checkpoint(model), c.ensure_layerwise(model)
        prompts = c.tokenize(checkpoint, c.make_texts(prompt_set))
        c.warm_page_cache([checkpoint, layerwise])
        common = {"prompts": c.prompts_to_json(prompts), "repeats": args.repeats, "batch_tokens": args.batch_tokens}
        in_memory = c.run_child(script, {**common, "method": "in_memory", "checkpoint": str(checkpoint)})
        streamed = {verify: c.run_child(script, {**common, "method": "flexorch", "layerwise": str(layerwise),
                                                 "verify": verify})
                    for verify in (False, True)}
        size = sum(p.stat().st_size for p in c.weight_files(layerwise))
        tokens = sum(p.n_tokens for p in prompts)
        label = f"{model.name} ({c.fmt_bytes(size)})"
        base = in_memory.get("seconds")
        rows.append([label, "(b) in memory", c.fmt_seconds(base), "1.00x", c.fmt_bytes(in_memory.get("peak_rss")),
                     "-", in_memory.get("error", "")[:60]])
        for verify, run in streamed.items():
            ratio = run["seconds"] / base if base and "seconds" in run else None
            verdict = "" if ratio is None else ("meets goal" if ratio <= GOAL else "misses goal")
            rows.append([label, f"(a) flexorch, verify {'on' if verify else 'off'}", c.fmt_seconds(run.get("seconds")),
                         c.fmt_ratio(ratio, f"<= {GOAL}x"), c.fmt_bytes(run.get("peak_rss")),
                         c.fmt_seconds(run.get("load_seconds")), run.get("error", verdict)[:60]])
        prediction = {}
        if "settings" in streamed[False]:
            prediction = c.compare_prediction(
                c.planner_prediction(layerwise, prompts, streamed[False]["settings"]), streamed[False])
            prediction_rows += c.prediction_rows(f"{model.name} verify off", prediction)
        runs.append({"model": model.name, "weight_bytes": size, "prompts": len(prompts), "tokens": tokens,
                     "in_memory": in_memory, "flexorch_verify_off": streamed[False],
                     "flexorch_verify_on": streamed[True], "prediction": prediction,
                     "ratio_verify_off": streamed[False].get("seconds", 0) / base if base else None,
                     "ratio_verify_on": streamed[True].get("seconds", 0) / base if base else None})
    caption = (f"{len(prompts)} prompts, {prompt_set.n_suffixes} suffixes each; warm page cache; "
               f"best of {args.repeats}; load wait = time compute waited for weights")
    c.print_table("flexorch streaming vs the model held in memory", ("model", "method", "seconds", "ratio to (b)",
                  "peak RSS", "load wait s", "note"), rows, caption)
    c.print_table("planner predictions vs measured", c.PREDICTION_COLUMNS, prediction_rows)
    path = c.write_results("limit", {"goal_ratio": GOAL, "quick": args.quick, "prompt_set": vars(prompt_set),
                                     "runs": runs}, machine, args.machine)
    print(f"results: {path}")


if __name__ == "__main__":
    if c.is_child():
        c.child_main({"flexorch": child_flexorch, "in_memory": child_in_memory})
    else:
        main()
