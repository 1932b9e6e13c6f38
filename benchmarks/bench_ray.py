"""The Ray executor's overhead against the local one (issue 15), on the same job.

A two-node Ray cluster is started on this machine (`ray.cluster_utils.Cluster`, one CPU per node),
and the same job (the demo model, two CPU workers, the same batches) is submitted alternately with
`executor: local` (`devices: [cpu, cpu]`) and `executor: ray` (`devices: [node0:cpu, node1:cpu]`).
Measured per submit: total wall seconds, and start-up: total less the slowest worker's time in the
engine (what remains is the controller's set-up, process or actor start, torch import, results
travelling back and the merge). The first ray submit also connects to the cluster.

    unshare -n sh -c 'ip link set lo up && python benchmarks/bench_ray.py [--repeats 3] [--prompts 64]'

(`unshare -n` keeps every Ray process on 127.0.0.1; without it Ray binds to this machine's address.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

RESULTS = Path(__file__).parent / "results"


def write_job(root: Path, model: Path, prompts: Path, name: str, **keys) -> Path:
    job = {"model": str(model), "prompts": str(prompts), "output": str(root / f"{name}.pkl"),
           "batch_tokens": 512, **keys}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def submit(job: Path) -> dict:
    from rich.console import Console

    from flexorch.orchestrator import controller

    start = time.perf_counter()
    status = controller.submit(job, Console(stderr=True, quiet=True), restart=True)
    total = time.perf_counter() - start
    report = json.loads((job.with_suffix(".job") / "report.json").read_text())
    engine = max(w["engine_seconds"] for w in report["workers"])
    return {"status": status, "total_s": round(total, 2), "engine_s": round(engine, 2),
            "startup_s": round(total - engine, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    from flexorch.orchestrator.demo import build_demo_model
    from flexorch.orchestrator.prepare import prepare_checkpoint

    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    model = root / "model.layers"
    prepare_checkpoint(build_demo_model(root / "demo"), model)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prefix": f"Question {i}: which of these is a colour? Answer:",
                                           "suffixes": [" red", " table", " seven", " run"]}) + "\n"
                               for i in range(args.prompts)))
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    cluster_s = time.perf_counter() - started
    jobs = {"local": write_job(root, model, prompts, "local", devices=["cpu", "cpu"]),
            "ray": write_job(root, model, prompts, "ray", devices=["node0:cpu", "node1:cpu"], executor="ray",
                             ray_address=cluster.address)}
    runs = {name: [] for name in jobs}
    for _ in range(args.repeats):
        for name, job in jobs.items():
            runs[name].append(submit(job))
            print(name, runs[name][-1], flush=True)
    same = (root / "local.pkl").read_bytes() == (root / "ray.pkl").read_bytes()
    summary = {name: {key: statistics.median(r[key] for r in rs) for key in ("total_s", "engine_s", "startup_s")}
               for name, rs in runs.items()}
    payload = {"prompts": args.prompts, "cluster_start_s": round(cluster_s, 2), "outputs_identical": same,
               "median": summary, "runs": runs}
    print(json.dumps(payload, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray-overhead-2c.json").write_text(json.dumps(payload, indent=1) + "\n")
    import ray

    ray.shutdown()  # the driver first: Ray refuses to remove the node a driver is connected to
    cluster.shutdown()


if __name__ == "__main__":
    main()
