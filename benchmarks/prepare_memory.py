"""Peak RSS of `flexorch prepare` on a >= 1 GB checkpoint, against its largest layer and shard.

The claim under test: prepare streams, so its peak RSS is about the torch baseline plus the largest
layer, not a source shard. Builds a random fp32 Llama (8 layers x 2048 wide, 200 MB a layer, about
1.6 GB) as safetensors shards and as pytorch .bin shards of ~500 MB, converts each in a
subprocess and reads the child's own ru_maxrss from wait4 (all resident pages, file-backed ones
included, so mapped shard pages would show).

    python benchmarks/prepare_memory.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "prepare_memory.json"
MODEL = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16)
SHARD_BYTES = 500_000_000
LAYOUTS = ("safetensors-sharded", "bin-sharded")


# Runs argv[1:] and prints its peak RSS. A child's ru_maxrss starts at its parent's RSS at fork time
# (the high-water mark survives exec), so the command is started from this small fresh interpreter,
# not from the benchmark process holding a freshly built checkpoint.
_LAUNCHER = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_pid, status, usage = os.wait4(process.pid, 0)
print(usage.ru_maxrss * 1024)  # Linux reports KiB
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss(command: list[str]) -> int:
    """Run `command` and return its peak RSS in bytes."""
    run = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr}")
    return int(run.stdout)


def weight_files(src: Path) -> list[Path]:
    return [p for p in src.iterdir() if p.suffix in (".safetensors", ".bin")]


def measure(workdir: Path) -> dict:
    from flexorch.orchestrator.demo import build_checkpoint
    from flexorch.contract.manifest import read_manifest

    flexorch = [sys.executable, "-m", "flexorch.orchestrator.cli"]
    tiny = build_checkpoint(workdir / "tiny", "llama", layout="safetensors")
    result = {
        "model": MODEL, "shard_bytes": SHARD_BYTES,
        "torch_baseline_rss": peak_rss([sys.executable, "-c", "import torch, safetensors"]),
        "tiny_prepare_rss": peak_rss([*flexorch, "prepare", str(tiny), str(workdir / "tiny.layers")]),
        "runs": [],
    }
    for layout in LAYOUTS:
        src = build_checkpoint(workdir / layout, "llama", layout=layout, shard_bytes=SHARD_BYTES, **MODEL)
        dst = workdir / f"{layout}.layers"
        rss = peak_rss([*flexorch, "prepare", str(src), str(dst)])
        manifest = read_manifest(dst)
        result["runs"].append({
            "layout": layout,
            "checkpoint_bytes": sum(p.stat().st_size for p in weight_files(src)),
            "largest_shard_bytes": max(p.stat().st_size for p in weight_files(src)),
            "largest_layer_bytes": manifest.largest_layer_bytes,
            "peak_rss": rss,
        })
        shutil.rmtree(src)
        shutil.rmtree(dst)
    return result


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from flexorch.orchestrator.hardware import format_bytes

    table = Table(title="flexorch prepare: peak RSS")
    table.add_column("layout", no_wrap=True)
    for column in ("checkpoint", "largest shard", "largest layer", "peak RSS", "peak - prepare baseline"):
        table.add_column(column, justify="right")
    for run in result["runs"]:
        table.add_row(run["layout"], *(format_bytes(run[key]) for key in (
            "checkpoint_bytes", "largest_shard_bytes", "largest_layer_bytes", "peak_rss")),
            format_bytes(run["peak_rss"] - result["tiny_prepare_rss"]))
    console = Console(width=120)
    console.print(table)
    console.print(f"baselines: python -c 'import torch, safetensors' {format_bytes(result['torch_baseline_rss'])}; "
                  f"flexorch prepare on a 0.8 MB checkpoint (torch + transformers) "
                  f"{format_bytes(result['tiny_prepare_rss'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where to build the checkpoints (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        result = measure(Path(workdir))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)


if __name__ == "__main__":
    main()
