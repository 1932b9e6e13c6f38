"""Re-plan a bench_gpu run with today's planner: auto's choice against the batch grid measured there.

bench_gpu.py records the machine's calibration, the page-cache read rate its runs read at, and the
engine's time at the planner's batch size and at hand-set ones (--grid-batch-tokens). Given that
file, this plans the same job (the 13B shape, the same prompts, the same 6 GB cap) on a machine
described by those figures — no GPU needed — and reports the batch the planner chooses now, its
predicted time, and the time measured for that batch, against the best measured.

    python benchmarks/replan_gpu.py benchmarks/results/gpu-nvidia-h100-80gb-hbm3.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import common as c
from bench_gpu import GPU_CAP, LLAMA_2_13B, make_token_prompts

from flexorch.orchestrator.hardware import Calibration, GpuInfo, Hardware
from flexorch.orchestrator.planner import make_plan
from flexorch.orchestrator.shapes import llama_shaped_manifest
from flexorch.orchestrator.spec import JobSpec, Limits


def replan(run: dict) -> dict:
    layers = int(run["model"].split("-")[-2]) if run["model"].endswith("-layers") else LLAMA_2_13B["num_hidden_layers"]
    shape = LLAMA_2_13B | {"num_hidden_layers": layers}
    manifest = llama_shaped_manifest(shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"],
                                     shape["vocab_size"], shape["num_attention_heads"], shape["num_key_value_heads"],
                                     run["dtype"])
    machine = run["machine"]
    gpu = GpuInfo(index=0, name=machine["gpu"], total_memory=machine["gpu_memory_bytes"],
                  free_memory=machine["gpu_memory_bytes"], pcie_gen=5, pcie_width=16)
    hardware = Hardware(gpus=(gpu,), ram_total=machine["ram_bytes"], ram_available=machine["ram_bytes"],
                        cpu_count=machine["cores"], disk_path="/", disk_free=10**12,
                        disk_read_bytes_per_s=run["rates"]["page_cache_bytes_per_s"],  # the runs read warm
                        calibration=Calibration.from_dict(run["calibration"]))
    prompts = make_token_prompts(run["prompts"], 300, 4, shape["vocab_size"])
    job_dir = Path("/nonexistent/replan")
    spec = JobSpec(path=job_dir / "job.yaml", model=job_dir, prompts=job_dir / "prompts.jsonl",
                   output=job_dir / "out.pkl", job_dir=job_dir, devices=("cuda:0",), parallel="data",
                   dtype=run["dtype"], limits=Limits(gpu_memory=run.get("gpu_cap", GPU_CAP)))
    worker = make_plan(hardware, manifest, spec, [p.n_tokens for p in prompts],
                       suffix_counts=[len(p.suffix_ids) for p in prompts]).workers[0]
    measured = {run["settings"]["batch_tokens"]: run["flexorch"]["seconds"]}
    measured |= {g["batch_tokens"]: g["seconds"] for g in run["grid"] if g.get("seconds")}
    chosen, best = worker.settings.batch_tokens, min(measured, key=measured.get)
    return {"chosen": dataclasses.asdict(worker.settings), "reasons": list(worker.reasons),
            "predicted_compute_seconds": worker.predicted_compute_seconds,
            "predicted_read_seconds": worker.predicted_read_seconds,
            "predicted_peak_device_memory": worker.predicted_peak_device_memory,
            "predicted_peak_ram": worker.predicted_peak_ram,
            # measured at the batch the run's planner chose (the grid records time and GPU memory only)
            "measured_peak_rss_then": run["flexorch"]["peak_rss"],
            "measured_peak_device_memory_by_batch": {
                run["settings"]["batch_tokens"]: run["flexorch"]["peak_device_memory"],
                **{g["batch_tokens"]: g["peak_device_memory"] for g in run["grid"] if g.get("peak_device_memory")}},
            "measured_seconds_by_batch": measured, "best_batch": best,
            "chosen_measured_seconds": measured.get(chosen),
            "chosen_over_best": measured[chosen] / measured[best] if chosen in measured else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a bench_gpu results file with a grid and a calibration")
    args = parser.parse_args()
    run = json.loads(args.results.read_text())
    if not run.get("calibration") or not run.get("grid"):
        raise SystemExit(f"{args.results}: no calibration or batch grid (run bench_gpu.py --grid-batch-tokens ...)")
    out = replan(run)
    rows = [[f"{b}{' (auto now)' if b == out['chosen']['batch_tokens'] else ''}"
             f"{' (auto then)' if b == run['settings']['batch_tokens'] else ''}", c.fmt_seconds(s),
             c.fmt_ratio(s / out["measured_seconds_by_batch"][out["best_batch"]])]
            for b, s in sorted(out["measured_seconds_by_batch"].items())]
    c.print_table(f"batch_tokens on {run['machine']['gpu']}: measured engine seconds", ("batch_tokens", "seconds",
                                                                                           "/ best"), rows,
                  f"auto now: {out['chosen']['batch_tokens']} tokens, {out['chosen']['storage']}, predicted compute "
                  f"{out['predicted_compute_seconds']:.2f} s")
    path = c.write_results("gpu-replan", {"source": str(args.results), **out}, run["machine"])
    print(f"results: {path}")


if __name__ == "__main__":
    main()
