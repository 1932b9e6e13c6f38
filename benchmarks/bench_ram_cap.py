"""Benchmark 11 (issue 12): a RAM cap the job can meet is honoured.

The issue's case: a 16-layer, 1024-wide fp32 Llama (825 MB of weights), 16 prompts, `storage: cpu`,
everything else auto, submitted with `flexorch submit` as a user would: once with
`limits: {ram: 600MB}` and once without. The capped job must be planned (not refused), its worker's
peak RSS (report.json: VmHWM of the worker process, start-up included) must stay under the cap, its
predicted peak must be within 10% of the measured one, and its scores must equal the uncapped run's.

    python benchmarks/bench_ram_cap.py [--cap 600MB]
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import common as c

PROMPTS = c.PromptSet(n_prompts=16)


def submit(job_dir: Path, layerwise: Path, prompts: Path, limits: dict | None) -> dict:
    """`flexorch submit` on a fresh job dir: exit status, wall time, report.json, scores."""
    import yaml

    if job_dir.exists():
        import shutil

        shutil.rmtree(job_dir)
    job_dir.mkdir(parents=True)
    job = {"model": str(layerwise), "prompts": str(prompts), "output": str(job_dir / "scores.pkl"),
           "job_dir": str(job_dir / "job"), "devices": "cpu", "storage": "cpu"}
    if limits:
        job["limits"] = limits
    (job_dir / "job.yaml").write_text(yaml.safe_dump(job))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flexorch.orchestrator.cli", "submit", str(job_dir / "job.yaml")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(c.REPO)})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"returncode": done.returncode, "seconds": seconds, "stderr": done.stderr[-2000:]}
    report = json.loads((job_dir / "job" / "report.json").read_text())
    (worker,) = report["workers"]
    (planned,) = report["plan"]["workers"]
    with open(job_dir / "scores.pkl", "rb") as f:
        scores = pickle.load(f)  # next_token_probs (the default kind): one array per prompt
    return {"returncode": 0, "seconds": seconds, "peak_rss": worker["peak_rss"],
            "predicted_peak_ram": planned["predicted_peak_ram"], "settings": planned["settings"],
            "rounds": [len(r) for r in planned["rounds"]], "engine_seconds": worker["engine_seconds"],
            "scores": scores}


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cap", default="600MB", help="limits.ram of the capped job (default 600MB)")
    args = parser.parse_args()
    from flexorch.orchestrator.spec import parse_size

    cap = parse_size(args.cap)
    machine = c.machine_info()
    shape = c.QUICK_SHAPE if args.quick else c.DEFAULT_SHAPE  # --quick: checks the script runs
    layerwise = c.ensure_layerwise(shape)
    prompts = c.CACHE / "ram-cap" / "prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"prefix": p, "suffixes": s}) + "\n" for p, s in c.make_texts(PROMPTS)))
    capped = submit(c.CACHE / "ram-cap" / "capped", layerwise, prompts, {"ram": args.cap})
    free = submit(c.CACHE / "ram-cap" / "uncapped", layerwise, prompts, None)
    diff = None
    if capped["returncode"] == 0 and free["returncode"] == 0:
        import numpy as np

        diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(capped["scores"], free["scores"]))
    rows = [[label, str(run["returncode"]), c.fmt_seconds(run["seconds"]), c.fmt_bytes(run.get("peak_rss")),
             c.fmt_bytes(run.get("predicted_peak_ram")),
             c.fmt_ratio(run["predicted_peak_ram"] / run["peak_rss"]) if run.get("peak_rss") else "-",
             f"lps {run['settings']['layers_per_shard']}, bt {run['settings']['batch_tokens']}, rounds {run['rounds']}"
             if run.get("settings") else run.get("stderr", "")[-60:]]
            for label, run in ((f"limits.ram {args.cap}", capped), ("no limit", free))]
    c.print_table("a RAM cap the job can meet", ("job", "exit", "wall", "peak RSS", "predicted", "pred/meas", "plan"),
                  rows, caption=f"{shape.name}, {PROMPTS.n_prompts} prompts; max score difference "
                                f"{diff if diff is not None else '-'}")
    met = capped["returncode"] == 0 and capped["peak_rss"] <= cap and diff is not None and diff < 1e-4
    for run in (capped, free):
        run.pop("scores", None)
    path = c.write_results("ram-cap", {"cap": cap, "prompts": vars(PROMPTS), "capped": capped, "uncapped": free,
                                       "max_score_diff": diff, "met": met}, machine, args.machine)
    print(f"cap met: {met}; results: {path}")


if __name__ == "__main__":
    main()
