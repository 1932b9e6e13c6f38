"""Benchmark 2 (issue 7): flexorch against what users run today, on the same prompts and model.

(c) a plain Hugging Face loop: AutoModelForCausalLM, one batch-1 forward per prefix + suffix;
(d) accelerate big-model offloading: from_pretrained(device_map="auto", max_memory={"cpu": cap},
    offload_folder=...), so every forward streams the layers beyond the cap from disk; the cap is
    what flexorch needs for weights (two one-layer shard slots);
(e) AirLLM 4.0.0 with device="cpu", where it installs (else reported as skipped, with why).
(c)-(e) are used as their users use them: one forward per prefix + suffix. Each method runs in its
own process (its peak RSS is its own), once with the weight files in the page cache ("warm") and
once with them evicted before the process starts ("cold"). Times include loading the model.
Goals: flexorch >= 3x faster than (c), >= 4x than (d), >= 40x than (e), each with less peak RSS.

    python benchmarks/bench_alternatives.py [--quick] [--methods flexorch,hf_loop,accelerate,airllm]
                                            [--variants warm,cold]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import common as c

GOALS = {"hf_loop": 3.0, "accelerate": 4.0, "airllm": 40.0}
LABELS = {"flexorch": "(a) flexorch", "hf_loop": "(c) HF loop", "accelerate": "(d) accelerate offload",
          "airllm": "(e) AirLLM"}
METHODS = tuple(LABELS)


def _timed(load, prompts, device: str = "cpu") -> dict:
    before = c.disk_read_bytes()
    start = time.perf_counter()
    model = load()
    load_seconds = time.perf_counter() - start
    score_seconds = c.score_one_by_one(model, prompts, device)
    return {"load_seconds": load_seconds, "score_seconds": score_seconds, "seconds": load_seconds + score_seconds,
            "disk_read_bytes": c.disk_read_bytes() - before}


def child_flexorch(params: dict) -> dict:
    run = c.flexorch_run(Path(params["layerwise"]), c.prompts_from_json(params["prompts"]), verify=True)
    return {**run, "score_seconds": run["seconds"]}


def child_hf_loop(params: dict) -> dict:
    return _timed(lambda: c.load_hf_model(Path(params["checkpoint"])), c.prompts_from_json(params["prompts"]))


def child_accelerate(params: dict) -> dict:
    offload = Path(params["offload_folder"])
    load = lambda: c.load_hf_model(Path(params["checkpoint"]), device_map="auto",  # noqa: E731
                                   max_memory={"cpu": params["cap"]}, offload_folder=str(offload))
    result = _timed(load, c.prompts_from_json(params["prompts"]))
    return {**result, "cap": params["cap"]}


def child_airllm(params: dict) -> dict:
    import torch

    try:
        from airllm import AutoModel
    except ImportError as exc:
        return {"skipped": f"airllm is not installed ({exc}); pip install airllm==4.0.0"}
    load = lambda: AutoModel.from_pretrained(params["checkpoint"], device="cpu", dtype=torch.float32,  # noqa: E731
                                             layer_shards_saving_path=params["split_dir"])
    return _timed(load, c.prompts_from_json(params["prompts"]))


def method_files(method: str, checkpoint: Path, layerwise: Path, split_dir: Path) -> list[Path]:
    """The weight files a method reads: what is warmed or evicted before its run."""
    return {"flexorch": [layerwise], "hf_loop": [checkpoint], "accelerate": [checkpoint],
            "airllm": [checkpoint, split_dir]}[method]


def prepare_airllm_split(script: Path, checkpoint: Path, split_dir: Path, prompts_json: list) -> dict | None:
    """AirLLM splits the checkpoint into per-layer files on its first load: do that once, outside
    the timed runs (users pay it once too). Returns a skip/error dict, or None when ready."""
    if (split_dir / "splitted_model").exists():
        return None
    result = c.run_child(script, {"method": "airllm", "checkpoint": str(checkpoint), "split_dir": str(split_dir),
                                  "prompts": prompts_json[:1]})
    return result if ("skipped" in result or "error" in result) else None


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--variants", default="warm,cold", help="warm, cold or both")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per method run")
    args = parser.parse_args()
    methods = [m for m in METHODS if m in args.methods.split(",")]
    variants = [v for v in ("warm", "cold") if v in args.variants.split(",")]
    shape = c.QUICK_SHAPE if args.quick else c.DEFAULT_SHAPE
    prompt_set = c.QUICK_PROMPTS if args.quick else c.PromptSet()
    machine, script = c.machine_info(), Path(__file__)
    checkpoint, layerwise = c.ensure_checkpoint(shape), c.ensure_layerwise(shape)
    split_dir = c.CACHE / shape.name / "airllm"
    prompts = c.tokenize(checkpoint, c.make_texts(prompt_set))
    prompts_json = c.prompts_to_json(prompts)
    cap = 2 * shape.layer_bytes  # flexorch's weight memory: two one-layer shard slots
    skipped = {}
    if "airllm" in methods:
        problem = prepare_airllm_split(script, checkpoint, split_dir, prompts_json)
        if problem:
            skipped["airllm"] = problem.get("skipped") or problem["error"]
            methods.remove("airllm")
            print(f"(e) AirLLM skipped: {skipped['airllm']}")

    results: dict[str, dict[str, dict]] = {v: {} for v in variants}
    for variant in variants:
        for method in methods:
            files = method_files(method, checkpoint, layerwise, split_dir)
            offload = c.CACHE / shape.name / "offload"
            shutil.rmtree(offload, ignore_errors=True)
            if variant == "warm":
                c.warm_page_cache(files)
            else:
                c.evict_page_cache(files)
            params = {"method": method, "prompts": prompts_json, "checkpoint": str(checkpoint),
                      "layerwise": str(layerwise), "split_dir": str(split_dir), "offload_folder": str(offload),
                      "cap": cap}
            print(f"{variant}: {LABELS[method]} ...", flush=True)
            results[variant][method] = c.run_child(script, params, timeout=args.timeout)
            shutil.rmtree(offload, ignore_errors=True)

    rows, ratios = [], {}
    for variant in variants:
        ours = results[variant].get("flexorch", {})
        for method in methods:
            run = results[variant][method]
            ratio = run["seconds"] / ours["seconds"] if "seconds" in run and "seconds" in ours else None
            goal = GOALS.get(method)
            if method != "flexorch":
                ratios[f"{method}_{variant}"] = ratio
            lower = ("" if "peak_rss" not in run or "peak_rss" not in ours or method == "flexorch"
                     else ("flexorch lower" if ours["peak_rss"] < run["peak_rss"] else "flexorch NOT lower"))
            verdict = "" if ratio is None or goal is None else ("meets goal" if ratio >= goal else "misses goal")
            note = run.get("error") or run.get("skipped") or ", ".join(x for x in (verdict, lower) if x)
            rows.append([variant, LABELS[method], c.fmt_seconds(run.get("load_seconds")),
                         c.fmt_seconds(run.get("score_seconds")), c.fmt_seconds(run.get("seconds")),
                         "1.00x" if method == "flexorch" else c.fmt_ratio(ratio, f">= {goal:g}x" if goal else ""),
                         c.fmt_bytes(run.get("peak_rss")), c.fmt_bytes(run.get("disk_read_bytes")), note[:70]])
    for method, why in skipped.items():
        rows.append(["-", LABELS[method], "-", "-", "-", "-", "-", "-", f"skipped: {why}"[:70]])
    caption = (f"{shape.name}, {len(prompts)} prompts x {prompt_set.n_suffixes} suffixes; ratio = method seconds / "
               f"flexorch seconds (load + scoring); accelerate cap {c.fmt_bytes(cap)}; flexorch verifies checksums")
    c.print_table("flexorch vs the alternatives", ("cache", "method", "load s", "score s", "total s",
                  "ratio", "peak RSS", "disk read", "note"), rows, caption)
    path = c.write_results("alternatives", {
        "quick": args.quick, "model": shape.name, "prompts": len(prompts), "prompt_set": vars(prompt_set),
        "tokens": sum(p.n_tokens for p in prompts), "accelerate_cap": cap, "goals": GOALS, "results": results,
        "ratios": ratios, "skipped": skipped}, machine, args.machine)
    print(f"results: {path}")


if __name__ == "__main__":
    if c.is_child():
        c.child_main({"flexorch": child_flexorch, "hf_loop": child_hf_loop, "accelerate": child_accelerate,
                      "airllm": child_airllm})
    else:
        main()
