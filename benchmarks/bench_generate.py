"""Benchmark 8 (issue 17): the cost of each extra greedy step, with and without the KV cache.

flexorch streams the model once per step either way (weights are read G times); what the cache
changes is the compute: without it every step runs each prompt's prefix and suffixes again, one
token longer per suffix; with it a later step runs one token per suffix against the kept keys and
values. Per step, from the engine's progress events: seconds of that pass. Goal: an extra step
costs less than a quarter of the first for 150-token prompts. Every run's scores and generated ids
are compared with the recompute run's (they must agree within float rounding).

    python benchmarks/bench_generate.py [--quick] [--steps 4] [--storages cpu,disk] [--prompts 32]

Issue 28 (`--text`): N prompts x T new tokens (score kind generate, greedy, prompts without suffixes)
on the benchmark model: tokens/s of flexorch streaming the model (one layer per shard: its weight
memory follows a layer) against (a) the same arithmetic with the whole model in RAM and the KV cache
(the engine with `resident`: read once, the limit), (b) `model.generate` batched in RAM
(left-padded) and (c) `model.generate` under accelerate's offload (device_map="auto" with a RAM cap
of a few layers: the rest waits on disk and is read back every step); and each step's time over the
first, every prompt running to T, and with a mix of short and long answers (half the prompts stop
at T/4: their rows leave the batches). Methods run interleaved, `--repeats` times each: on a shared
machine a run's neighbours can slow it 2x, so the table shows each method's fastest run and the
JSON every run. Goal: flexorch >= 0.8x the limit's tokens/s.

    python benchmarks/bench_generate.py --text [--quick] [--prompts 8] [--new-tokens 8] [--repeats 2] [--methods ...]
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import common as c

ACCELERATE_DISK = "disk"  # accelerate's device-map name for a module it offloads to disk (not a flexorch choice)

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


@dataclass(frozen=True)
class TextMethod:
    key: str  # --methods picks by it
    label: str
    kind: str  # flexorch | flexorch-resident | hf-generate | accelerate
    mixed: bool = False  # half the prompts stop at T/4


TEXT_METHODS = (TextMethod("streamed", "flexorch, streamed", "flexorch"),
                TextMethod("mixed", "flexorch, streamed, mixed lengths", "flexorch", mixed=True),
                TextMethod("limit", "(a) limit: resident, KV cache", "flexorch-resident"),
                TextMethod("hf", "(b) model.generate, batched in RAM", "hf-generate"),
                TextMethod("accelerate", "(c) accelerate offload", "accelerate"))
TEXT_GOAL = 0.8  # flexorch's new tokens/s over the limit's


def child_text(params: dict) -> dict:
    """One generation run: flexorch (streamed or resident) or model.generate (in RAM or offloaded):
    seconds, new tokens, each step's seconds."""
    import time

    from flexorch.contract.protocol import EngineSettings, ScoreSpec, TokenizedPrompt
    from flexorch.workers.engine import score_prompts

    prompts = [TokenizedPrompt(i, tuple(ids), ((),), max_new_tokens=n)
               for i, (ids, n) in enumerate(zip(params["prefixes"], params["limits"]))]
    if params["kind"] in ("hf-generate", "accelerate"):
        return _hf_generate(params, prompts)
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


def _hf_generate(params: dict, prompts) -> dict:
    """model.generate over every prompt in one left-padded batch, each step timed by a stopping
    criterion that never stops (called once per new token); in RAM, or offloaded by accelerate."""
    import time

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):
        def __init__(self):
            self.ends: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.ends.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    offload = {} if params["kind"] == "hf-generate" else dict(
        device_map="auto", max_memory={"cpu": params["cap"]}, offload_folder=params["offload_folder"])
    model = c.load_hf_model(Path(params["checkpoint"]), **offload)
    width = max(len(p.prefix_ids) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p.prefix_ids)) + list(p.prefix_ids) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p.prefix_ids)) + [1] * len(p.prefix_ids) for p in prompts])
    steps, clock = max(params["limits"]), StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
    seconds = time.perf_counter() - start
    on_disk = sum(1 for where in (getattr(model, "hf_device_map", None) or {}).values() if where == ACCELERATE_DISK)
    return {"seconds": seconds, "new_tokens": int((out.shape[1] - width) * len(prompts)), "peak_rss": c.peak_rss(),
            "step_seconds": [b - a for a, b in zip([start] + clock.ends, clock.ends)], "modules_on_disk": on_disk}


def _text_summary(runs: list[dict], n_prompts: int) -> dict:
    """A method's fastest run, with its tokens/s overall and after the first step (the decode phase)
    and each later step's time over the first."""
    done = [r for r in runs if "seconds" in r]
    if not done:
        return {"error": runs[-1].get("error", "no run")}
    best = min(done, key=lambda r: r["seconds"])
    steps = best["step_seconds"]
    return {"seconds": best["seconds"], "seconds_all": [r["seconds"] for r in done], "peak_rss": best["peak_rss"],
            "tokens_per_second": best["new_tokens"] / best["seconds"],
            "decode_tokens_per_second": (best["new_tokens"] - n_prompts) / sum(steps[1:]) if steps[1:] else None,
            "later_over_first": [x / steps[0] for x in steps[1:]], "step_seconds": steps, "new_tokens": best["new_tokens"],
            "ids": best.get("ids"), **({"modules_on_disk": best["modules_on_disk"]} if "modules_on_disk" in best else {})}


def text_main(args) -> None:
    """--text: generation's tokens/s against the limit, model.generate and accelerate, and steps after the first."""
    shape = c.QUICK_SHAPE if args.quick else c.DEFAULT_SHAPE
    prompt_set = dataclasses.replace(c.PromptSet(prefix_words=10) if args.quick else c.PromptSet(prefix_words=20),
                                     n_prompts=args.prompts or (4 if args.quick else 8))
    machine = c.machine_info()
    checkpoint, layerwise = c.ensure_checkpoint(shape), c.ensure_layerwise(shape)
    prefixes = [list(p.prefix_ids) for p in c.tokenize(checkpoint, c.make_texts(prompt_set))]
    c.warm_page_cache([layerwise, checkpoint])
    n, t = len(prefixes), args.new_tokens
    mixed = [t if i % 2 == 0 else max(1, t // 4) for i in range(n)]
    cap = 3 * shape.layer_bytes  # accelerate's RAM for weights: a few layers, flexorch's slots' order
    offload = c.CACHE / shape.name / "offload-generate"
    methods = [m for m in TEXT_METHODS if m.key in args.methods.split(",")]
    attempts: dict[str, list[dict]] = {m.label: [] for m in methods}
    for repeat in range(args.repeats):  # interleaved: a slow spell of the machine hits every method alike
        for method in methods:
            shutil.rmtree(offload, ignore_errors=True)
            run = c.run_child(Path(__file__), {
                "method": "text", "layerwise": str(layerwise), "checkpoint": str(checkpoint), "prefixes": prefixes,
                "limits": mixed if method.mixed else [t] * n, "kind": method.kind, "cap": cap,
                "offload_folder": str(offload)})
            shutil.rmtree(offload, ignore_errors=True)
            attempts[method.label].append(run)
            print(f"{repeat + 1}/{args.repeats} {method.label}: " + (
                f"{run['seconds']:.2f} s, steps {[round(x, 3) for x in run['step_seconds']]}" if "seconds" in run
                else run.get("error", "")), flush=True)
    runs = {label: _text_summary(tries, n) for label, tries in attempts.items()}
    label = {m.key: m.label for m in TEXT_METHODS}
    limit, streamed = runs.get(label["limit"], {}), runs.get(label["streamed"], {})
    ratio = _over(streamed, limit, "tokens_per_second")
    decode_ratio = _over(streamed, limit, "decode_tokens_per_second")
    rows = [_text_row(m, runs[m.label], limit) for m in methods]
    same = streamed.get("ids") is not None and streamed.get("ids") == limit.get("ids")
    caption = (f"{shape.name} ({c.fmt_bytes(shape.layer_bytes * shape.layers)} of decoder layers), {n} prompts of "
               f"~{sum(map(len, prefixes)) // n} tokens, {t} new tokens (mixed: half stop at {max(1, t // 4)}), "
               f"float32, warm page cache, fastest of {args.repeats}; accelerate's RAM cap {c.fmt_bytes(cap)}. "
               f"flexorch / limit: {c.fmt_ratio(ratio, f'>= {TEXT_GOAL}')} overall, {c.fmt_ratio(decode_ratio)} "
               f"after the first step; same ids: {same}")
    c.print_table("generation: new tokens/s and each step after the first over the first", (
        "method", "total s", "new tok/s", "tok/s after step 1", "later step / first", "peak RSS", "vs limit"),
        rows, caption)
    for run in runs.values():
        run.pop("ids", None)
    path = c.write_results("generate-text", {
        "quick": args.quick, "model": shape.name, "prompts": n, "prompt_tokens": [len(p) for p in prefixes],
        "new_tokens": t, "mixed_limits": mixed, "repeats": args.repeats, "accelerate_cap": cap, "goal": TEXT_GOAL,
        "over_limit": ratio, "decode_over_limit": decode_ratio, "same_ids_as_limit": same, "runs": runs,
        "attempts": {label: [{k: v for k, v in r.items() if k != "ids"} for r in tries]
                     for label, tries in attempts.items()}}, machine, args.machine)
    print(f"results: {path}")


def _text_row(method: TextMethod, run: dict, limit: dict) -> list:
    if "error" in run:
        return [method.label, "-", "-", "-", "-", "-", run["error"][:60]]
    later = run["later_over_first"]
    return [method.label, c.fmt_seconds(run["seconds"]), f"{run['tokens_per_second']:.2f}",
            f"{run['decode_tokens_per_second']:.2f}" if run["decode_tokens_per_second"] else "-",
            f"{min(later):.2f} .. {max(later):.2f} (mean {sum(later) / len(later):.2f})" if later else "-",
            c.fmt_bytes(run["peak_rss"]), "-" if method.mixed else _over(run, limit, "tokens_per_second", as_text=True)]


def _over(run: dict, base: dict, key: str, as_text: bool = False):
    value = run.get(key) / base[key] if run.get(key) and base.get(key) else None
    return c.fmt_ratio(value) if as_text else value


def main() -> None:
    import numpy as np

    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--text", action="store_true", help="issue 28: generation jobs (see the docstring)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="--text: runs of each method, interleaved")
    parser.add_argument("--methods", default=",".join(m.key for m in TEXT_METHODS), help="--text: which to run")
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
