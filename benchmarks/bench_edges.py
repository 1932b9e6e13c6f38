"""Benchmark 12 (issue 12 item 4): the edges do not size the slots, measured on the large-vocab shape.

bench_autotune's large-vocab llama (4 x 512-wide layers of 12.6 MB, a 32000-token embedding and head
of 65.5 MB each, fp32) scored on CPU by this checkout and others (`--checkout LABEL=DIR`: a worktree of,
say, the commit before the change, with its own .venv and a copy of this file in its benchmarks/, so
its child imports only its own code): per run, the slot bytes the loader
allocates, the peak RSS of the run (the high-water mark reset after a warm-up, as bench_autotune
does), the planner's predicted peak RAM for the same settings (with this machine's calibration, from
the checkout running the parent) and the scores, compared across checkouts.

    python benchmarks/bench_edges.py [--checkout before=/path/to/old/worktree] [--machine NAME]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import common as c
from bench_autotune import PROMPTS, SHAPES, _vm, ensure_layerwise

# (score kind, layers per shard): the bench's kind and next_token_probs (whose output is the vocabulary
# row), one layer per shard and all four (50 MB: the 65.5 MB head still comes in two steps)
RUNS = [("suffix_logprob", 1), ("suffix_logprob", 4), ("next_token_probs", 1), ("next_token_probs", 4)]
BATCH_TOKENS = 1024


def child_run(params: dict) -> dict:
    import gc
    import inspect

    import numpy as np
    import torch

    from flexorch.contract.protocol import EngineSettings, ScoreKind, ScoreSpec
    from flexorch.contract.shards import plan_shards
    from flexorch.workers.engine import score_prompts
    from flexorch.workers.heap import Heap
    from flexorch.workers.layerfile import LayerwiseModel
    from flexorch.workers.prefetch import ShardLoader

    prompts = c.prompts_from_json(params["prompts"])
    settings = EngineSettings(**params["settings"])
    score = ScoreSpec(params["kind"])
    score_prompts(params["layerwise"], prompts[:1], score, settings)  # warm-up: kernels, allocator
    gc.collect()
    Heap().trim(slack=0)
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current RSS
    start_rss = _vm("VmHWM")
    results, summary = score_prompts(params["layerwise"], prompts, score, settings)
    peak = _vm("VmHWM")
    model = LayerwiseModel(params["layerwise"])
    # as the engine makes it; before the change neither took these and the loader had no slot_bytes
    size = ({"size": lambda name: model.part_bytes(name, None)}
            if "size" in inspect.signature(plan_shards).parameters else {})
    gather = {"gather": True} if "gather" in inspect.signature(ShardLoader).parameters else {}
    loader = ShardLoader(model, plan_shards(model.manifest, settings.layers_per_shard, **size), torch.device("cpu"),
                         torch.float32, **gather)
    slot_bytes = getattr(loader, "slot_bytes", None) or loader._slots[0].numel()
    scores = [r.scores["logprob"].tolist() if ScoreKind(params["kind"]) is ScoreKind.SUFFIX_LOGPROB
              else np.asarray(r.scores).reshape(-1).tolist() for r in results]
    return {"peak_rss": peak, "start_rss": start_rss, "slot_bytes": slot_bytes, "seconds": summary.seconds,
            "bytes_read": summary.bytes_read, "scores": scores}


def predicted_peak_ram(layerwise: Path, prompts, kind: str, settings: dict) -> int:
    from flexorch.contract.manifest import read_manifest
    from flexorch.contract.protocol import ScoreKind
    from flexorch.orchestrator.calibrate import calibrated
    from flexorch.orchestrator.hardware import probe
    from flexorch.orchestrator.modelstore import default_cache_dir
    from flexorch.orchestrator.planner import make_plan
    from flexorch.orchestrator.spec import JobSpec, ScoreSettings

    job_dir = c.CACHE / "edges-job"
    spec = JobSpec(path=job_dir / "job.yaml", model=layerwise, prompts=job_dir / "p.jsonl", output=job_dir / "o.pkl",
                   job_dir=job_dir, devices=("cpu",), score=ScoreSettings(kind=kind), dtype="float32",
                   layers_per_shard=settings["layers_per_shard"], storage=settings["storage"],
                   batch_tokens=settings["batch_tokens"])
    positions = ScoreKind(kind).positions
    plan = make_plan(calibrated(probe(c.CACHE), default_cache_dir()), read_manifest(layerwise), spec,
                     [p.n_tokens for p in prompts], suffix_counts=[len(p.suffix_ids) for p in prompts],
                     scored_counts=[len(positions(len(p.prefix_ids), tuple(map(len, p.suffix_ids)))) for p in prompts])
    return plan.workers[0].predicted_peak_ram


def run_with(checkout: Path, python: str, params: dict) -> dict:
    script = checkout / "benchmarks" / Path(__file__).name
    done = subprocess.run([python, str(script), "--child", c.json.dumps(params)], capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(c.RESULT_MARKER):
            return c.json.loads(line[len(c.RESULT_MARKER):])
    return c._failure(done.returncode, done.stderr)


def main() -> None:
    import numpy as np

    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", default=[], metavar="LABEL=DIR",
                        help="another checkout (with .venv) to run the same runs with (repeatable)")
    args = parser.parse_args()
    checkouts = [(label, Path(d), str(Path(d) / ".venv" / "bin" / "python"))
                 for label, d in (item.split("=", 1) for item in args.checkout)]
    checkouts.append(("this", c.REPO, sys.executable))
    checkpoint, layerwise = ensure_layerwise(SHAPES["large-vocab"])
    prompts = c.tokenize(checkpoint, c.make_texts(PROMPTS))
    c.warm_page_cache([layerwise])
    results, rows = [], []
    for kind, lps in RUNS:
        settings = {"device": "cpu", "dtype": "float32", "layers_per_shard": lps, "storage": "cpu",
                    "batch_tokens": BATCH_TOKENS, "threads": 2}
        predicted = predicted_peak_ram(layerwise, prompts, kind, settings)
        runs = {label: run_with(checkout, python, {"method": "run", "prompts": c.prompts_to_json(prompts),
                                         "layerwise": str(layerwise), "kind": kind, "settings": settings})
                for label, checkout, python in checkouts}
        this = runs["this"]
        for label, run in runs.items():
            if "error" in run:
                rows.append([kind, lps, label, run["error"], "", "", "", ""])
                continue
            diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                       for a, b in zip(run["scores"], this["scores"]))
            rows.append([kind, lps, label, c.fmt_bytes(run["slot_bytes"]), c.fmt_bytes(run["peak_rss"]),
                         c.fmt_bytes(run["peak_rss"] - run["start_rss"]),
                         c.fmt_ratio(predicted / run["peak_rss"]) if label == "this" else "", f"{diff:.1e}"])
            run.pop("scores")
        results.append({"kind": kind, "layers_per_shard": lps, "predicted_peak_ram": predicted, "runs": runs})
    c.print_table("large-vocab (4 x 12.6 MB layers, 65.5 MB embedding and head, fp32), CPU",
                  ["kind", "lps", "checkout", "slot", "peak RSS", "run's growth", "predicted/peak",
                   "max |score diff| vs this"], rows)
    c.write_results("edges", {"runs": results}, c.machine_info(), args.machine)


if __name__ == "__main__":
    if c.is_child():
        c.child_main({"run": child_run})
    else:
        main()
