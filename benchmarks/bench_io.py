"""Benchmark 4 (issues 7 and 12): reading weights from cold files.

1. The disk's own sequential read rate, measured in the same run: a large file of random bytes,
   evicted from the page cache, read by one thread in 16 MiB chunks after POSIX_FADV_SEQUENTIAL (as
   flexorch reads; also without it, for the kernel's default read-ahead); the same file pulled by
   sendfile() to /dev/null (the same read-ahead with no copy to user space); the same file read
   around the page cache (O_DIRECT) into one reused buffer, as flexorch's direct reads go; and the
   file read again from the page cache, which says whether one thread waited for the disk or for the
   CPU. Every cold read through the page cache (probes, bare loops, flexorch) starts once the memory
   its eviction freed has settled (common.evict_page_cache(settle=True)): on a VM whose host takes
   freed memory back, a read right after the eviction lands in pages still backed and ran 2-4x faster
   than a cold job's (1.3-2.5 GB/s against 0.5-0.6 GB/s for the same 2 GB file).
2. flexorch streaming from cold layer files, I/O bound: a prompt of a few tokens and one compute
   thread, so a pass computes in a fraction of its read time and the loader has a core. Weight bytes
   per second of wall time against the disk's rate through the same path (goal: >= 0.9x, issue 12):
   through the page cache with checksums off, on with files no job has verified yet (each is hashed
   as it is read: a copied model's first job), and on with files verified before (marked unchanged
   since, contract/verified.py: every later job, and the first after `flexorch prepare`), against
   the one-thread probe; and read direct (EngineSettings.direct_reads: the planner's choice for a
   model larger than the RAM), against the direct probe. Two models: the default shape (51 MB
   layers) and LARGE_LAYERS (453 MB layers, about a 7B's in fp16): a reader of many small files loses
   a few ms at each file's start (its read-ahead starts afresh), which the larger layers make small.
   Rounds of disk probes + every run are interleaved and each ratio is taken against its own round's
   probes, so load from others on a shared machine touches both alike; the table shows medians. Each
   round also reads each model's layer files back to back with a bare loop (the same reads as the
   probe's, one file after another), and flexorch's rate is also given against it.
3. For scale, the one-prompt and full prompt-set runs on all cores (on a small CPU these are bound by
   the compute, not the disk: "compute waited" says which).
4. Two workers (two processes, each streaming the whole model over half the prompts, released at the
   same instant) against one worker over all prompts, both from cold files: bytes read from the
   disk (/proc/<pid>/io read_bytes, page-cache hits excluded). Workers walking the layers in step
   should read each layer from disk about once between them (ratio near 1, at most 2).

    python benchmarks/bench_io.py [--quick] [--probe-bytes N] [--rounds N] [--small-layers-only]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import common as c
from flexorch.contract.verified import VERIFIED_DIR

KINDS = {"plain": False, "first": True, "verified": True, "direct": False}  # I/O-bound runs per round: verify_checksums
KIND_LABELS = {"plain": "off", "first": "on, files not verified yet", "verified": "on, files verified before",
               "direct": "off, read direct (O_DIRECT)"}
PROBE_OF = {"direct": "disk_direct"}  # each kind's rate against the probe of its own read path (else "disk")


def extents(paths) -> dict | None:
    """Extents per file (filefrag; None without it): a file in many pieces reads slower cold, so the
    layer files and the disk probe are compared only where both are about as contiguous (layer files
    written by an older prepare into a fuller disk had 6-7 extents each and read ~15% slower than
    the same bytes copied into 1 extent)."""
    if not shutil.which("filefrag"):
        return None
    counts = [int(subprocess.run(["filefrag", str(p)], capture_output=True, text=True).stdout.split(":")[-1].split()[0])
              for p in paths]
    return {"median": statistics.median(counts), "max": max(counts), "files": len(counts)}


def child_flexorch(params: dict) -> dict:
    prompts = c.prompts_from_json(params["prompts"])
    import flexorch.workers.engine  # noqa: F401  (imports done before the start signal, so workers start in step)

    if params.get("wait_for_start"):
        print("READY", flush=True)
        sys.stdin.readline()
    return c.flexorch_run(Path(params["layerwise"]), prompts, verify=params.get("verify", False),
                          threads=params.get("threads", 0), direct_reads=params.get("direct", False))


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


GOAL = 0.9  # cold read rate / the disk's (issue 12)
IO_BOUND_PROMPT = c.PromptSet(n_prompts=1, prefix_words=2, n_suffixes=1)  # ~10 tokens
# Layers the size of a 7B's in fp16 (404 MB): 8 x 453 MB fp32 (3.6 GB). The default shape's 51 MB layers show
# what a reader of many small files loses at each file's start; these show what a user's model gets.
LARGE_LAYERS = c.ModelShape(layers=8, hidden=3072, intermediate=8192, heads=24, kv_heads=24)


def rate(run: dict, key: str) -> float | None:
    return run["bytes_read"] / run[key] if run.get(key) else None


def io_bound_rounds(script: Path, models: dict[str, tuple[Path, list]], probe: Path, probe_bytes: int,
                    rounds: int) -> list[dict]:
    """Per round: the disk's cold rate (read, advised and not, and sendfile), then per model (name →
    layerwise dir, its I/O-bound prompt): a bare loop over its files, and flexorch I/O bound from
    cold files, checksums off, on over unverified files (their marks removed) and on over the files
    it marked."""
    out = []
    for _ in range(rounds):
        row = {"disk": c.sequential_read_rate(probe, probe_bytes),
               "disk_default_readahead": c.sequential_read_rate(probe, probe_bytes, advise=False),
               "disk_sendfile": c.sendfile_read_rate(probe),
               "disk_direct": c.direct_read_rate(probe)}
        for name, (layerwise, prompt) in models.items():
            runs = {"layer_files": c.files_read_rate(c.weight_files(layerwise))}
            for kind, verify in KINDS.items():
                if kind == "first":
                    shutil.rmtree(layerwise / VERIFIED_DIR, ignore_errors=True)
                c.evict_page_cache([layerwise], settle=True)
                runs[kind] = c.run_child(script, {"method": "flexorch", "layerwise": str(layerwise),
                                                  "prompts": prompt, "threads": 1, "verify": verify,
                                                  "direct": kind == "direct"})
            row[name] = runs
        out.append(row)
    return out


def summarize(rounds: list[dict], model: str, kind: str) -> dict:
    """Medians over the rounds of `model`'s run `kind`: its wall and read rates and their ratios to
    the disk's (each against its own round's probes)."""
    done = [(r, r[model][kind]) for r in rounds if rate(r[model][kind], "seconds")]
    if not done:
        return {"error": rounds[-1][model][kind].get("error", "no run finished")}
    def median(values):
        return statistics.median(values)
    return {"bytes_read": done[0][1]["bytes_read"], "seconds": median([run["seconds"] for _, run in done]),
            "bytes_per_s": median([rate(run, "seconds") for _, run in done]),
            "read_bytes_per_s": median([rate(run, "read_seconds") for _, run in done]),
            "ratio": median([rate(run, "seconds") / r[PROBE_OF.get(kind, "disk")]["bytes_per_s"] for r, run in done]),
            "fastest_probe_ratio": median([rate(run, "seconds") / max(r["disk"]["bytes_per_s"], r["disk_direct"]["bytes_per_s"])
                                           for r, run in done]),
            "sendfile_ratio": median([rate(run, "seconds") / r["disk_sendfile"]["bytes_per_s"] for r, run in done]),
            "read_ratio": median([rate(run, "read_seconds") / r["disk"]["bytes_per_s"] for r, run in done]),
            "files_ratio": median([rate(run, "seconds") / r[model]["layer_files"]["bytes_per_s"] for r, run in done]),
            "waited_share": median([run["load_seconds"] / run["seconds"] for _, run in done]),
            "disk_read_bytes": median([run["disk_read_bytes"] for _, run in done]), "rounds": len(done)}


def median_round(rounds: list[dict], key: str) -> dict:
    """The probe `key` of the round whose rate is the median."""
    middle = statistics.median(r[key]["bytes_per_s"] for r in rounds)
    return min((r[key] for r in rounds), key=lambda d: abs(d["bytes_per_s"] - middle))


def goal_cell(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f">= {GOAL:.2f}x: " + ("met" if ratio >= GOAL else "not met")


def cpu_note(disk_rate: float, cached_rate: float) -> str:
    """Whether the one-thread 'disk rate' is the disk's or the CPU's (see page_cache_read_rate)."""
    if cached_rate < 1.5 * disk_rate:
        return (f"one thread copies from the page cache at only {cached_rate / disk_rate:.1f}x the cold rate: "
                "the disk is about as fast as one thread of Python can move bytes, so reading is CPU-bound "
                "here and the loader competes for the cores with compute and with other load")
    return f"one thread copies from the page cache at {cached_rate / disk_rate:.1f}x the cold rate: the disk is the limit"


def read_table(disks: dict[str, dict], io_bound: dict[str, dict], files: dict[str, dict], context: dict,
               rounds: int, load: tuple) -> None:
    """disks: probe label → its median round; io_bound: model → kind → summary; files: model → its
    bare loop's median round; context: label → a full run (ratios against the median probe)."""
    disk_rate = disks["disk sequential read (cold file, 1 thread, advised)"]["bytes_per_s"]
    sendfile_rate = disks["the same, sendfile to /dev/null (no copy to user space)"]["bytes_per_s"]
    def probe_row(label, d):
        return [label, c.fmt_bytes(d["bytes"]), c.fmt_seconds(d["seconds"]), c.fmt_bytes(d["bytes_per_s"]) + "/s",
                c.fmt_ratio(d["bytes_per_s"] / disk_rate), c.fmt_ratio(d["bytes_per_s"] / sendfile_rate), "", "", "",
                c.fmt_bytes(d["disk_read_bytes"])]
    rows = [probe_row(label, d) for label, d in disks.items()]
    for model, kinds in io_bound.items():
        rows.append(probe_row(f"{model}: its layer files back to back (bare loop, 1 thread, advised)", files[model]))
        for kind, run in kinds.items():
            rows.append([f"{model}: flexorch I/O bound, checksums {KIND_LABELS[kind]}", c.fmt_bytes(run.get("bytes_read")),
                         c.fmt_seconds(run.get("seconds")), c.fmt_bytes(run.get("bytes_per_s")) + "/s",
                         c.fmt_ratio(run.get("ratio")), c.fmt_ratio(run.get("sendfile_ratio")),
                         goal_cell(run.get("ratio")) + (f" ({run['files_ratio']:.2f}x the bare loop)"
                                                        if "files_ratio" in run else ""),
                         c.fmt_ratio(run.get("read_ratio")),
                         f"{run['waited_share']:.0%}" if "waited_share" in run else run.get("error", "")[:40],
                         c.fmt_bytes(run.get("disk_read_bytes"))])
    for label, run in context.items():
        wall, read = rate(run, "seconds"), rate(run, "read_seconds")
        rows.append([label, c.fmt_bytes(run.get("bytes_read")), c.fmt_seconds(run.get("seconds")),
                     f"{c.fmt_bytes(wall)}/s", c.fmt_ratio(wall / disk_rate if wall else None),
                     c.fmt_ratio(wall / sendfile_rate if wall else None), "",
                     c.fmt_ratio(read / disk_rate if read else None),
                     f"{run['load_seconds'] / run['seconds']:.0%}" if wall else run.get("error", "")[:40],
                     c.fmt_bytes(run.get("disk_read_bytes"))])
    cached = disks["same file from the page cache (1 thread)"]
    c.print_table("weights read from cold files vs the disk", (
        "run", "weight bytes", "seconds", "rate (wall)", "rate / disk", "rate / sendfile", "goal",
        "loader's read rate / disk", "compute waited", "from disk"), rows,
        f"disk and I/O-bound rows: medians of {rounds} interleaved rounds, each ratio against its round's "
        f"probes ('disk': one thread reading the probe file; 'sendfile': the same file pulled with no copy); "
        f"'compute waited': share of the wall time the compute waited for weights (near 100%: I/O bound); "
        f"'from disk' = /proc/<pid>/io read_bytes; load average {load[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end.\n{cpu_note(disk_rate, cached['bytes_per_s'])}")


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--probe-bytes", type=int, default=None,
                        help="size of the file read to measure the disk (default 2 GB; --quick 64 MB)")
    parser.add_argument("--rounds", type=int, default=None, help="disk probe + I/O-bound runs (default 3; --quick 1)")
    parser.add_argument("--small-layers-only", action="store_true",
                        help=f"skip the I/O-bound runs of {LARGE_LAYERS.name} (3.6 GB, built once)")
    args = parser.parse_args()
    shape = c.QUICK_SHAPE if args.quick else c.DEFAULT_SHAPE
    prompt_set = c.QUICK_PROMPTS if args.quick else c.PromptSet()
    machine, script = c.machine_info(), Path(__file__)
    checkpoint, layerwise = c.ensure_checkpoint(shape), c.ensure_layerwise(shape)
    prompts = c.prompts_to_json(c.tokenize(checkpoint, c.make_texts(prompt_set)))
    tiny = c.prompts_to_json(c.tokenize(checkpoint, c.make_texts(IO_BOUND_PROMPT)))
    probe, probe_bytes = c.CACHE / "disk-probe.bin", args.probe_bytes or ((64 << 20) if args.quick else 2_000_000_000)
    base = {"method": "flexorch", "layerwise": str(layerwise)}
    models = {shape.name: (layerwise, tiny)}
    if not args.quick and not args.small_layers_only:
        large = c.ensure_checkpoint(LARGE_LAYERS)
        models[LARGE_LAYERS.name] = (c.ensure_layerwise(LARGE_LAYERS),
                                     c.prompts_to_json(c.tokenize(large, c.make_texts(IO_BOUND_PROMPT))))

    rounds = io_bound_rounds(script, models, probe, probe_bytes, args.rounds or (1 if args.quick else 3))
    disks = {label: median_round(rounds, key) for label, key in (
        ("disk sequential read (cold file, 1 thread, advised)", "disk"),
        ("the same, the kernel's default read-ahead", "disk_default_readahead"),
        ("the same, sendfile to /dev/null (no copy to user space)", "disk_sendfile"),
        ("the same, read direct (O_DIRECT: no page cache, no copy)", "disk_direct"))}
    disks["same file from the page cache (1 thread)"] = c.page_cache_read_rate(probe)
    io_bound = {name: {kind: summarize(rounds, name, kind) for kind in KINDS} for name in models}
    files = {name: median_round([r[name] for r in rounds], "layer_files") for name in models}
    disk = disks["disk sequential read (cold file, 1 thread, advised)"]
    c.evict_page_cache([layerwise], settle=True)
    one_prompt = c.run_child(script, {**base, "prompts": prompts[:1]})
    c.evict_page_cache([layerwise], settle=True)
    full = c.run_child(script, {**base, "prompts": prompts})
    read_table(disks, io_bound, files, {f"{shape.name}: flexorch, 1 prompt, all cores": one_prompt,
                                        f"{shape.name}: flexorch, {len(prompts)} prompts, all cores": full},
               len(rounds), machine["load_average"])

    c.evict_page_cache([layerwise], settle=True)
    (one,) = run_together(script, [{**base, "prompts": prompts, "threads": machine["cores"]}])
    half = len(prompts) // 2
    c.evict_page_cache([layerwise], settle=True)
    two = run_together(script, [{**base, "prompts": part, "threads": max(1, machine["cores"] // 2)}
                                for part in (prompts[:half], prompts[half:])])

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
    for name in models:
        for kind in ("plain", "verified", "direct"):
            ratio = io_bound[name][kind].get("ratio")
            print(f"goal (issue 12): cold read rate >= {GOAL}x the disk's, {name}, checksums {KIND_LABELS[kind]}: "
                  + ("-" if ratio is None else f"{ratio:.2f}x, {'met' if ratio >= GOAL else 'not met'}"))
    layout = {"probe": extents([probe]), **{name: extents(c.weight_files(path)) for name, (path, _) in models.items()}}
    print(f"extents per file (filefrag): {layout}")
    path = c.write_results("io", {
        "quick": args.quick, "model": shape.name, "model_bytes": model_bytes, "prompt_set": vars(prompt_set),
        "goal_ratio": GOAL, "disks": disks, "io_bound_prompt": vars(IO_BOUND_PROMPT),
        "io_bound_models": {name: str(path) for name, (path, _) in models.items()}, "io_bound": io_bound,
        "layer_files": files, "io_bound_rounds": rounds, "flexorch_one_prompt": one_prompt, "flexorch_full": full,
        "one_worker": one, "two_workers": two, "load_average_end": os.getloadavg(),
        "two_worker_disk_bytes_ratio": two_disk / one_disk if one_disk > 0 else None, "prediction": prediction,
        "extents": layout},
        machine, args.machine)
    print(f"results: {path}")


if __name__ == "__main__":
    if c.is_child():
        c.child_main({"flexorch": child_flexorch})
    else:
        main()
