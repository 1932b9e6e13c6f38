"""Pipeline vs data parallel (issue 8): 2 and 3 CPU workers, few and many prompts.

Each run is a real `flexorch submit` (controller, one spawned worker process per device) of the same
model and prompts with `parallel: data` or `parallel: pipeline`; measured: wall time of the submit,
weight bytes read by all workers together (report.json), and what `parallel: auto` would have
chosen. Data workers each stream the whole model; pipeline stages each stream their 1/n of it, so
with few prompts (reading dominates) pipeline should win and with many (computing dominates) data.

    python benchmarks/bench_pipeline.py [--quick] [--cold] [--workers 2,3]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common as c


def write_prompts(path: Path, texts) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prefix": p, "suffixes": s}) + "\n" for p, s in texts))
    return path


def run_job(layerwise: Path, prompts: Path, parallel: str, workers: int, name: str, cold: bool) -> dict:
    """One submit; wall seconds, bytes read by all workers, and the plan's parallel and predictions."""
    import yaml
    from rich.console import Console

    from orchestrator import controller

    root = c.CACHE / "pipeline-bench" / name
    job = {"model": str(layerwise), "prompts": str(prompts), "output": str(root / "out.pkl"),
           "job_dir": str(root / "job"), "devices": ["cpu"] * workers, "parallel": parallel}
    path = root / "job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job))
    if cold:
        c.evict_page_cache([layerwise])
    start = time.perf_counter()
    status = controller.submit(path, Console(stderr=True, quiet=True), restart=True)
    seconds = time.perf_counter() - start
    report = json.loads((root / "job" / "report.json").read_text())
    return {"parallel": parallel, "workers": workers, "status": status, "seconds": seconds,
            "bytes_read": sum(w["bytes_read"] for w in report["workers"]),
            "per_worker_bytes_read": [w["bytes_read"] for w in report["workers"]],
            "engine_seconds": [w["engine_seconds"] for w in report["workers"]],
            "predictions": report["plan"].get("predictions", [])}


def auto_choice(layerwise: Path, prompts: Path, workers: int) -> str:
    """What `parallel: auto` picks for this job on this machine."""
    from flexorch.orchestrator.controller import plan_job

    root = c.CACHE / "pipeline-bench" / "auto"
    root.mkdir(parents=True, exist_ok=True)
    path = root / "job.yaml"
    path.write_text(json.dumps({"model": str(layerwise), "prompts": str(prompts), "output": str(root / "out.pkl"),
                                "devices": ["cpu"] * workers, "parallel": "auto"}))
    _, plan = plan_job(path)
    return plan.parallel


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true", help="evict the model from the page cache before each run")
    parser.add_argument("--workers", default="2,3", help="worker counts to compare (default 2,3)")
    args = parser.parse_args()
    shape = c.QUICK_SHAPE if args.quick else c.DEFAULT_SHAPE
    machine = c.machine_info()
    layerwise = c.ensure_layerwise(shape)
    many = c.QUICK_PROMPTS if args.quick else c.PromptSet()
    sets = {"few": c.PromptSet(n_prompts=3, prefix_words=many.prefix_words, n_suffixes=many.n_suffixes), "many": many}
    model_bytes = sum(p.stat().st_size for p in c.weight_files(layerwise))

    runs, rows = [], []
    for label, prompt_set in sets.items():
        prompts = write_prompts(c.CACHE / "pipeline-bench" / f"prompts-{label}.jsonl", c.make_texts(prompt_set))
        for workers in (int(w) for w in args.workers.split(",")):
            auto = auto_choice(layerwise, prompts, workers)
            by_mode = {}
            for parallel in ("data", "pipeline"):
                run = run_job(layerwise, prompts, parallel, workers, f"{label}-{workers}-{parallel}", args.cold)
                by_mode[parallel] = run
                runs.append({"prompts": label, "n_prompts": prompt_set.n_prompts, "auto": auto, **run})
            for parallel, run in by_mode.items():
                speedup = by_mode["data"]["seconds"] / run["seconds"] if run["seconds"] else None
                rows.append([f"{label} ({prompt_set.n_prompts}), {workers} workers", parallel,
                             c.fmt_seconds(run["seconds"]), c.fmt_ratio(speedup), c.fmt_bytes(run["bytes_read"]),
                             c.fmt_ratio(run["bytes_read"] / model_bytes), auto + (" *" if auto == parallel else ""),
                             "ok" if run["status"] == 0 else f"exit {run['status']}"])
    c.print_table("pipeline vs data parallel", ("prompts, workers", "parallel", "wall s", "speed vs data",
                  "weights read", "models read", "auto", "status"), rows,
                  f"{shape.name}, {'cold' if args.cold else 'warm'} page cache; wall = whole submit incl. worker "
                  "start-up; models read = weight bytes read by all workers / model size; * = auto's choice")
    path = c.write_results("pipeline", {"quick": args.quick, "model": shape.name, "model_bytes": model_bytes,
                                        "cold": args.cold, "runs": runs}, machine, args.machine)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
