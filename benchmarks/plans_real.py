"""What `flexorch plan` predicts for four released models at full size on described machines (issue 27,
item 5): the manifests are described from the releases' configs (benchmarks/manifests.py), the
machines by Hardware records; nothing is downloaded. 1,000 multiple-choice prompts of a ~250-token
prefix and 4 suffixes of ~3 tokens, scored by suffix log-probability.

    python benchmarks/plans_real.py [--only DeepSeek-V3] [--prompts 1000]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from flexorch.orchestrator.hardware import GpuInfo, Hardware
from flexorch.orchestrator.planner import make_plan, render_plan
from flexorch.orchestrator.spec import JobSpec, Limits

from manifests import DEEPSEEK_V3, GPT_OSS_120B, LLAMA4_MAVERICK, QWEN3_235B, Release, described_manifest

GB = 10**9
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Machine:
    label: str
    gpu_gb: tuple[float, ...]  # one entry per GPU
    ram_gb: float
    disk_gbps: float = 3.5  # a PCIe 4 NVMe's sequential read


CASES: tuple[tuple[Release, Machine], ...] = (
    (DEEPSEEK_V3, Machine("one 24 GB GPU, 128 GB RAM, NVMe", (24,), 128)),
    (QWEN3_235B, Machine("a 6 GB GPU, 32 GB RAM, NVMe", (6,), 32)),
    (GPT_OSS_120B, Machine("a 6 GB GPU, 32 GB RAM, NVMe", (6,), 32)),
    (LLAMA4_MAVERICK, Machine("two 24 GB GPUs, 128 GB RAM, NVMe", (24, 24), 128)),
)


def hardware(machine: Machine) -> Hardware:
    gpus = tuple(GpuInfo(index=i, name=f"described {gb:g} GB GPU", total_memory=int(gb * GB),
                         free_memory=int(gb * GB * 0.95), pcie_gen=4, pcie_width=16)
                 for i, gb in enumerate(machine.gpu_gb))
    return Hardware(gpus=gpus, ram_total=int(machine.ram_gb * GB), ram_available=int(machine.ram_gb * GB * 0.8),
                    cpu_count=16, disk_path="/data", disk_free=2000 * GB,
                    disk_read_bytes_per_s=machine.disk_gbps * GB)


def _kept(plan: dict) -> dict:
    """The plan without its per-prompt lists (1,000 indices a worker): each worker's round count stays."""
    workers = [{k: v for k, v in w.items() if k not in ("prompt_indices", "rounds")} | {"rounds": len(w["rounds"])}
               for w in plan["workers"]]
    return {k: v for k, v in plan.items() if k != "channel_batches"} | {"workers": workers}


def summary(results: list[dict]) -> str:
    """A markdown table of the plans (README.md's): per pass, the bytes read are the whole layerwise dir."""
    rows = ["| model (as stored) | machine | layout | experts per step | predicted peak GPU / RAM | "
            "bytes read per pass | time per pass (read / compute) | 1,000 prompts |", "|" + "---|" * 8]
    for result in results:
        plan, workers = result["plan"], result["plan"]["workers"]
        first, prediction = workers[0], result["plan"]["predictions"][0]
        settings, passes = first["settings"], first["rounds"]
        layout = (f"{len(workers)} x {plan['parallel']}-parallel, " if len(workers) > 1 else "") + \
                 f"{settings['layers_per_shard']} layer per shard, activations on {settings['storage']}"
        total = prediction["start_seconds"] + max(prediction["read_seconds"], prediction["compute_seconds"])
        rows.append(
            f"| {result['model']} ({result['scheme'] or plan['dtype']}) | {result['machine']} | {layout} | "
            f"{settings['experts_per_group'] or 'whole layers'} | "
            f"{first['predicted_peak_device_memory'] / GB:.1f} GB / {first['predicted_peak_ram'] / GB:.1f} GB | {result['layerwise_bytes'] / GB:.0f} GB | "
            f"{prediction['read_seconds'] / passes:.0f} s / {prediction['compute_seconds'] / passes:.0f} s | "
            f"~{total / 60:.0f} min ({passes} pass{'es' if passes > 1 else ''}) |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="one release by name")
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--prefix-tokens", type=int, default=250)
    args = parser.parse_args()
    console, results = Console(), []
    tokens = args.prefix_tokens + 4 * 3
    for release, machine in CASES:
        if args.only and args.only != release.name:
            continue
        manifest = described_manifest(release)
        spec = JobSpec(path=Path("job.yaml"), model=Path(f"{release.name}.layers"), prompts=Path("questions.jsonl"),
                       output=Path("scores.pkl"), job_dir=Path("scores.job"), limits=Limits(),
                       allow_untested_models=True)
        plan = make_plan(hardware(machine), manifest, spec, [tokens] * args.prompts, suffix_counts=[4] * args.prompts)
        console.rule(f"{release.name} ({release.scheme or manifest.dtype}, {manifest.total_bytes / GB:.0f} GB) on "
                     f"{machine.label}")
        render_plan(plan, console)
        results.append({"model": release.name, "scheme": release.scheme, "machine": machine.label,
                        "layerwise_bytes": manifest.total_bytes, "plan": _kept(plan.to_dict())})
    print(summary(results))
    RESULTS.mkdir(exist_ok=True)
    if not args.only:
        (RESULTS / "plans-real.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
