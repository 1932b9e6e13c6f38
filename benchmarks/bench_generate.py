"""Benchmark 8 (issue 17): the cost of each extra greedy step, with and without the KV cache.

flexorch streams the model once per step either way (weights are read G times); what the cache
changes is the compute: without it every step runs each prompt's prefix and suffixes again, one
token longer per suffix; with it a later step runs one token per suffix against the kept keys and
values. Per step, from the engine's progress events: seconds of that pass. Goal: an extra step
costs less than a quarter of the first for 150-token prompts. Every run's scores and generated ids
are compared with the recompute run's (they must agree within float rounding).

    python benchmarks/bench_generate.py [--quick] [--steps 4] [--storages cpu,disk] [--prompts 32]

Issue 28 (`--text`): N prompts x T new tokens (score kind generate, greedy, prompts without suffixes):
tokens/s of flexorch streaming the model against the same arithmetic with the whole model in RAM
(the engine with `resident`: read once, the limit) and `model.generate` batched in RAM (left-padded);
and each step's time over the first, every prompt running to T, and with a mix of short and long
answers (half the prompts stop at T/4: their rows leave the batches).

    python benchmarks/bench_generate.py --text [--quick] [--prompts 8] [--new-tokens 16]
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


def child_text(params: dict) -> dict:
    """One generation run: flexorch (streamed or resident) or model.generate; seconds, tokens, step times."""
    import time

    import torch

    from flexorch.contract.protocol import EngineSettings, ScoreSpec, TokenizedPrompt
    from flexorch.workers.engine import score_prompts

    prompts = [TokenizedPrompt(i, tuple(ids), ((),), max_new_tokens=n)
               for i, (ids, n) in enumerate(zip(params["prefixes"], params["limits"]))]
    if params["kind"] == "hf-generate":
        model = c.load_hf_model(Path(params["checkpoint"]))
        width = max(len(p.prefix_ids) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p.prefix_ids)) + list(p.prefix_ids) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p.prefix_ids)) + [1] * len(p.prefix_ids) for p in prompts])
        steps = max(params["limits"])
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                 pad_token_id=0)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "new_tokens": int((out.shape[1] - width) * len(prompts)), "peak_rss": c.peak_rss()}
    step_ends: dict[int, float] = {}

    def on_progress(event) -> None:
        if event.stage == event.stages:
            step_ends[event.step] = event.seconds

    settings = EngineSettings("cpu", "float32", 1, "cpu", 4096, verify_checksums=False,
                              resident=params["kind"] == "flexorch-resident")
    score = ScoreSpec("generate", eos_ids=())  # no EOS: each prompt runs to its limit
    score_prompts(params["layerwise"], prompts[:1], ScoreSpec(), settings)  # warm-up: kernels, allocator
    start = time.perf_counter()
    results, _ = score_prompts(params["layerwise"], prompts, score, settings, on_progress=on_progress)
    seconds = time.perf_counter() - start
    ends = [step_ends[s] for s in sorted(step_ends)]
    return {"seconds": seconds, "new_tokens": int(sum(int(r.scores["n_new"].sum()) for r in results)),
            "step_seconds": [b - a for a, b in zip([0.0] + ends, ends)], "peak_rss": c.peak_rss(),
            "ids": [r.scores["ids"].tolist() for r in results]}


def text_main(args) -> None:
    """--text: generation's tokens/s against the limit and model.generate, and steps after the first."""
    shape = c.QUICK_SHAPE if args.quick else c.DEFAULT_SHAPE
    prompt_set = dataclasses.replace(c.QUICK_PROMPTS if args.quick else c.PromptSet(prefix_words=60),
                                     n_prompts=args.prompts or 8)
    machine = c.machine_info()
    checkpoint, layerwise = c.ensure_checkpoint(shape), c.ensure_layerwise(shape)
    prefixes = [list(p.prefix_ids) for p in c.tokenize(checkpoint, c.make_texts(prompt_set))]
    c.warm_page_cache([layerwise])
    n, t = len(prefixes), args.new_tokens
    mixed = [t if i % 2 == 0 else max(1, t // 4) for i in range(n)]
    methods = [("flexorch", "flexorch", [t] * n), ("flexorch, mixed lengths", "flexorch", mixed),
               ("limit: resident, KV cache", "flexorch-resident", [t] * n),
               ("model.generate, batched in RAM", "hf-generate", [t] * n)]
    runs, rows = {}, []
    for name, method, limits in methods:
        runs[name] = run = c.run_child(Path(__file__), {
            "method": "text", "layerwise": str(layerwise), "checkpoint": str(checkpoint), "prefixes": prefixes,
            "limits": limits, "kind": method}) | {"limits": limits, "kind": method}
        if "seconds" not in run:
            rows.append([name, "-", "-", "-", run.get("error", "")[:60]])
            continue
        run["tokens_per_second"] = run["new_tokens"] / run["seconds"]
        print(f"{name}: {run['seconds']:.2f} s, {run['tokens_per_second']:.2f} new tokens/s, steps "
              f"{[round(x, 3) for x in run.get('step_seconds', [])]}", flush=True)  # a run cut short keeps these
        steps = run.get("step_seconds") or []
        run["later_over_first"] = [s / steps[0] for s in steps[1:]] if steps else None
        later = run["later_over_first"]
        rows.append([name, c.fmt_seconds(run["seconds"]), f"{run['tokens_per_second']:.1f}",
                     (f"{later[0]:.2f} .. {later[-1]:.2f} (mean {sum(later) / len(later):.2f})" if later else "-"),
                     c.fmt_bytes(run.get("peak_rss"))])
    limit = runs["limit: resident, KV cache"].get("tokens_per_second")
    streamed = runs["flexorch"].get("tokens_per_second")
    same = runs["flexorch"].get("ids") == runs["limit: resident, KV cache"].get("ids")
    caption = (f"{shape.name}, {n} prompts of ~{sum(map(len, prefixes)) // n} tokens, {t} new tokens (mixed: half "
               f"stop at {max(1, t // 4)}), float32, warm page cache; flexorch / limit "
               f"{streamed / limit if streamed and limit else float('nan'):.2f}x, same ids: {same}")
    c.print_table("generation: tokens/s and each step after the first over the first", (
        "method", "total s", "new tok/s", "later step / first", "peak RSS"), rows, caption)
    for run in runs.values():
        run.pop("ids", None)
    path = c.write_results("generate-text", {"quick": args.quick, "model": shape.name, "prompts": n,
                                             "new_tokens": t, "runs": runs}, machine, args.machine)
    print(f"results: {path}")


def main() -> None:
    import numpy as np

    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--text", action="store_true", help="issue 28: generation jobs (see the docstring)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--storages", default="cpu,disk", help="tiers the cache is tried in")
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--prompts", type=int, help="number of prompts (default: the prompt set's)")
    args = parser.parse_args()
    if args.text:
        return text_main(args)
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
        c.child_main({"generate": child_generate, "text": child_text})
    else:
        main()
