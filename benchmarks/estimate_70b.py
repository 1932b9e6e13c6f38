"""What `flexorch plan` predicts for Llama-2-70B on a described workstation (issue 7, item 6).

A 6 GB GPU, 16 GB of RAM, an NVMe disk reading 3 GB/s; 1,000 multiple-choice prompts of a
~250-token prefix and 4 suffixes of ~3 tokens. Nothing is downloaded: the model is described by
its shapes (orchestrator.shapes), the machine by a Hardware record.

    python benchmarks/estimate_70b.py [--prompts 1000] [--prefix-tokens 250] [--gpu-name "RTX 3060"]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from flexorch.orchestrator.hardware import GpuInfo, Hardware
from flexorch.orchestrator.planner import make_plan, render_plan
from flexorch.orchestrator.shapes import llama2_70b
from flexorch.orchestrator.spec import JobSpec, Limits

GB = 10**9
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--prefix-tokens", type=int, default=250)
    parser.add_argument("--suffixes", type=int, default=4)
    parser.add_argument("--suffix-tokens", type=int, default=3)
    parser.add_argument("--gpu-name", default="NVIDIA GeForce RTX 2060")
    parser.add_argument("--gpu-memory-gb", type=float, default=6)
    parser.add_argument("--ram-gb", type=float, default=16)
    parser.add_argument("--disk-gbps", type=float, default=3)
    args = parser.parse_args()

    gpu = GpuInfo(index=0, name=args.gpu_name, total_memory=int(args.gpu_memory_gb * GB),
                  free_memory=int(args.gpu_memory_gb * GB * 0.95), pcie_gen=3, pcie_width=16)
    hardware = Hardware(gpus=(gpu,), ram_total=int(args.ram_gb * GB), ram_available=int(args.ram_gb * GB * 0.8),
                        cpu_count=8, disk_path="/data", disk_free=1000 * GB,
                        disk_read_bytes_per_s=args.disk_gbps * GB)
    spec = JobSpec(path=Path("job.yaml"), model=Path("llama2-70b.layers"), prompts=Path("questions.jsonl"),
                   output=Path("scores.pkl"), job_dir=Path("scores.job"), limits=Limits())
    tokens = args.prefix_tokens + args.suffixes * args.suffix_tokens
    plan = make_plan(hardware, llama2_70b(), spec, [tokens] * args.prompts,
                     suffix_counts=[args.suffixes] * args.prompts)
    console = Console()
    console.print(f"Llama-2-70B fp16 on {args.gpu_name} ({args.gpu_memory_gb:g} GB), {args.ram_gb:g} GB RAM, "
                  f"NVMe {args.disk_gbps:g} GB/s; {args.prompts} prompts x {tokens} tokens")
    render_plan(plan, console)
    worker = plan.workers[0]
    result = {"machine": "described", "gpu": args.gpu_name, "gpu_memory_gb": args.gpu_memory_gb,
              "ram_gb": args.ram_gb, "disk_gbps": args.disk_gbps, "prompts": args.prompts,
              "tokens_per_prompt": tokens, "predicted_read_seconds": worker.predicted_read_seconds,
              "predicted_compute_seconds": worker.predicted_compute_seconds,
              "predicted_peak_device_memory": worker.predicted_peak_device_memory,
              "predicted_peak_ram": worker.predicted_peak_ram, "plan": plan.to_dict()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "estimate-70b-6gb.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
