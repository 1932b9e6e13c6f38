"""Benchmark 4 (issue 7): reading weights from cold files.

1. The disk's own sequential read rate, measured in the same run: a large file of random bytes,
   evicted from the page cache, read in 16 MiB chunks.
2. flexorch streaming from cold layer files: weight bytes per second of wall time on an I/O-bound run
   (one prompt) and on the full prompt set, and of the loader thread's own read time.
3. Two workers (two processes, each streaming the whole model over half the prompts, released at the
   same instant) against one worker over all prompts, both from cold files: bytes read from the
   disk (/proc/<pid>/io read_bytes, page-cache hits excluded). Workers walking the layers in step
   should read each layer from disk about once between them (ratio near 1, at most 2).

    python benchmarks/bench_io.py [--quick] [--probe-bytes N]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import common as c


def child_flexorch(params: dict) -> dict:
    prompts = c.prompts_from_json(params["prompts"])
    import flexorch.workers.engine  # noqa: F401  (imports done before the start signal, so workers start in step)

    if params.get("wait_for_start"):
        print("READY", flush=True)
        sys.stdin.readline()
    return c.flexorch_run(Path(params["layerwise"]), prompts, verify=False, threads=params.get("threads", 0))


def run_together(script: Path, params_list: list[dict]) -> list[dict]:
    """Start one child per params, wait until each has imported torch, then release them at once."""
    processes = [subprocess.Popen([sys.executable, str(script), "--child", c.json.dumps({**p, "wait_for_start": True})],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for p in params_list]
    try:
        for process in processes:
            line = process.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"worker did not start: {line!r} {process.stderr.read()[-2000:]}")
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        return [c.finish_child(process) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def rate(run: dict, key: str) -> float | None:
    return run["bytes_read"] / run[key] if run.get(key) else None


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--probe-bytes", type=int, default=None,
                        help="size of the file read to measure the disk (default 2 GB; --quick 64 MB)")
    args = parser.parse_args()
    shape = c.QUICK_SHAPE if args.quick else c.DEFAULT_SHAPE
    prompt_set = c.QUICK_PROMPTS if args.quick else c.PromptSet()
    machine, script = c.machine_info(), Path(__file__)
    checkpoint, layerwise = c.ensure_checkpoint(shape), c.ensure_layerwise(shape)
    prompts = c.prompts_to_json(c.tokenize(checkpoint, c.make_texts(prompt_set)))
    probe_bytes = args.probe_bytes or ((64 << 20) if args.quick else 2_000_000_000)
    disk = c.sequential_read_rate(c.CACHE / "disk-probe.bin", probe_bytes)
    base = {"method": "flexorch", "layerwise": str(layerwise)}

    c.evict_page_cache([layerwise])
    io_bound = c.run_child(script, {**base, "prompts": prompts[:1]})
    c.evict_page_cache([layerwise])
    full = c.run_child(script, {**base, "prompts": prompts})
    c.evict_page_cache([layerwise])
    (one,) = run_together(script, [{**base, "prompts": prompts, "threads": machine["cores"]}])
    half = len(prompts) // 2
    c.evict_page_cache([layerwise])
    two = run_together(script, [{**base, "prompts": part, "threads": max(1, machine["cores"] // 2)}
                                for part in (prompts[:half], prompts[half:])])

    rows = [["disk sequential read (cold file)", c.fmt_bytes(disk["bytes"]), c.fmt_seconds(disk["seconds"]),
             c.fmt_bytes(disk["bytes_per_s"]) + "/s", "1.00x", c.fmt_bytes(disk["disk_read_bytes"])]]
    for label, run in (("flexorch, 1 prompt (I/O bound)", io_bound), (f"flexorch, {len(prompts)} prompts", full)):
        wall = rate(run, "seconds")
        rows.append([label, c.fmt_bytes(run.get("bytes_read")), c.fmt_seconds(run.get("seconds")),
                     f"{c.fmt_bytes(wall)}/s wall, {c.fmt_bytes(rate(run, 'read_seconds'))}/s reading",
                     c.fmt_ratio(wall / disk["bytes_per_s"] if wall else None), c.fmt_bytes(run.get("disk_read_bytes"))])
    c.print_table("weights read from cold files vs the disk", ("run", "weight bytes", "seconds", "rate",
                  "rate / disk", "from disk"), rows, f"{shape.name}; 'from disk' = /proc/<pid>/io read_bytes")

    model_bytes = sum(p.stat().st_size for p in c.weight_files(layerwise))
    one_disk = one.get("disk_read_bytes", 0)
    two_disk = sum(run.get("disk_read_bytes", 0) for run in two)
    worker_rows = [["1 worker, all prompts", c.fmt_seconds(one.get("seconds")), c.fmt_bytes(one.get("bytes_read")),
                    c.fmt_bytes(one_disk), "1.00x", one.get("error", "")[:60]]]
    worker_rows.append(["2 workers, half each", " / ".join(c.fmt_seconds(r.get("seconds")) for r in two),
                        c.fmt_bytes(sum(r.get("bytes_read", 0) for r in two)), c.fmt_bytes(two_disk),
                        c.fmt_ratio(two_disk / one_disk if one_disk > 0 else None),
                        " ".join(r.get("error", "") for r in two)[:60]])
    c.print_table("one worker vs two on one machine (cold files)", ("workers", "seconds", "weight bytes read",
                  "read from disk", "disk bytes vs 1 worker", "note"), worker_rows,
                  f"model files {c.fmt_bytes(model_bytes)}: ~1.00x means each layer came off the disk once")

    prediction = {}
    if "settings" in full:
        prediction = c.compare_prediction(c.planner_prediction(layerwise, c.prompts_from_json(prompts), full["settings"],
                                                               disk_read_bytes_per_s=disk["bytes_per_s"]), full)
        c.print_table("planner predictions vs measured (cold run, measured disk rate)", c.PREDICTION_COLUMNS,
                      c.prediction_rows(f"{shape.name} cold", prediction))
    path = c.write_results("io", {
        "quick": args.quick, "model": shape.name, "model_bytes": model_bytes, "prompt_set": vars(prompt_set),
        "disk": disk, "flexorch_io_bound": io_bound, "flexorch_full": full, "one_worker": one, "two_workers": two,
        "two_worker_disk_bytes_ratio": two_disk / one_disk if one_disk > 0 else None, "prediction": prediction},
        machine, args.machine)
    print(f"results: {path}")


if __name__ == "__main__":
    if c.is_child():
        c.child_main({"flexorch": child_flexorch})
    else:
        main()
