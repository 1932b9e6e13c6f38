"""Benchmark 8 (issue 12): auto's settings against every combination, measured on this machine.

For each model shape (wide and shallow, narrow and deep, a large vocabulary whose embedding and head
outweigh a decoder layer) every combination of layers_per_shard x storage x batch_tokens is run on the
same prompts, then `auto` as the planner chooses it (with this machine's calibration) under two RAM
caps: none, and a tight one (1.15x the smallest peak any combination measured). Under each cap the
combinations whose peak fits are the candidates; reported: auto's time against the best found, auto's
peak against the smallest peak among combinations within 10% of the best time, and the planner's
predicted time and peak against auto's measured ones. The best of the grid is the least of many
noisy medians, so auto and it are also re-run in turns (REMATCH each) and their medians compared. Goals (issue 12): time <= 1.10x best, peak <=
1.2x, prediction within 15% (time) and 10% (peak).

Each shape's runs share one child process (torch and transformers imported once); the peak RSS of
each run is the process's high-water mark reset before it (/proc/self/clear_refs). Times are the
engine's, start-up excluded (the same for every setting), the median of REPEATS runs taken in turns
with the other settings of the child (round after round), each from cold
files (evicted from the page cache first, as a model larger than RAM always is). The machine is
calibrated afresh after each shape's grid, just before auto is planned and run (`flexorch probe
--calibrate`; its duration is reported), so the planner predicts with figures measured in the same
conditions as the runs it is compared with. This VM's speed still moves by +-20% over minutes, more
than the time model's own error, so the prediction is also taken in PAIRS: calibrate, plan and run
auto once, straight after each other, PAIRS times; the median of the pairs' predicted/measured time
is the figure held to the 15% goal ("paired"), the first comparison is shown beside it.

    python benchmarks/bench_autotune.py [--quick] [--machine NAME]
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import common as c

from flexorch.contract.choices import Storage

PROMPTS = c.PromptSet(n_prompts=16, prefix_words=150, n_suffixes=4)
BATCHES = (256, 512, 1024)
REPEATS = 3
REMATCH = 3
PAIRS = 3
STORAGES = ("cpu", "disk")
TIGHT_CAP_OVER_SMALLEST = 1.15
GOALS = {"time": 1.10, "peak": 1.2, "predicted_time": 0.15, "predicted_peak": 0.10}


@dataclass(frozen=True)
class Shape(c.ModelShape):
    vocab: int = 384  # the demo tokenizer's; larger only widens the embedding and head (ids stay < 384)

    @property
    def name(self) -> str:
        return f"llama-{self.layers}x{self.hidden}-v{self.vocab}-{self.dtype}"


SHAPES = {
    "wide-shallow": Shape(layers=4, hidden=1024, intermediate=2816, heads=16, kv_heads=16),
    "narrow-deep": Shape(layers=24, hidden=256, intermediate=688, heads=4, kv_heads=4),
    "large-vocab": Shape(layers=4, hidden=512, intermediate=1376, heads=8, kv_heads=8, vocab=32000),
}
QUICK = {"quick": Shape(layers=4, hidden=128, intermediate=344, heads=4, kv_heads=4, vocab=4096)}


def ensure_layerwise(shape: Shape) -> tuple[Path, Path]:
    from flexorch.orchestrator.demo import build_checkpoint
    from flexorch.orchestrator.prepare import prepare_checkpoint

    def build(path: Path) -> None:
        build_checkpoint(path, "llama", layout="safetensors", dtype=shape.dtype, seed=0, hidden_size=shape.hidden,
                         intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         vocab_size=shape.vocab, max_position_embeddings=4096)

    checkpoint = c._build_atomically(c.CACHE / shape.name / "hf", build)
    layerwise = c.CACHE / shape.name / "layerwise"
    if not layerwise.exists():
        prepare_checkpoint(checkpoint, layerwise)
    return checkpoint, layerwise


# -- the child: every run of one shape ----------------------------------------------------------------
def _vm(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(f"{key}:"))


def child_runs(params: dict) -> dict:
    import gc
    import statistics

    import numpy as np

    from flexorch.contract.protocol import EngineSettings, ScoreSpec
    from flexorch.workers.engine import score_prompts
    from flexorch.workers.heap import Heap
    from flexorch.workers.prefetch import ResidentShards

    prompts = c.prompts_from_json(params["prompts"])
    layerwise = params["layerwise"]
    score_prompts(layerwise, prompts[:1], ScoreSpec("suffix_logprob"),
                  EngineSettings(**params["runs"][0]["settings"]))  # warm-up: kernels, allocator
    # Repeats go round the runs (run 1, run 2, ..., run 1, ...): this VM runs faster and slower for minutes
    # at a time, and a setting's repeats back to back would all land in one such spell.
    measured = [{"times": [], "peaks": [], "growths": []} for _ in params["runs"]]
    for _ in range(params["repeats"]):
        for run, m in zip(params["runs"], measured):
            settings = EngineSettings(**run["settings"])
            resident = ResidentShards() if settings.resident else None
            gc.collect()
            Heap().trim(slack=0)
            c.evict_page_cache([Path(layerwise)])
            Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current RSS
            before = _vm("VmRSS")
            seconds, logprobs = 0.0, {}
            for indices in run["rounds"]:
                out, summary = score_prompts(layerwise, [prompts[i] for i in indices],
                                             ScoreSpec("suffix_logprob"), settings, resident=resident)
                seconds += summary.seconds
                logprobs |= {r.index: r.scores["logprob"] for r in out}
            m["times"].append(seconds)
            m["peaks"].append(_vm("VmHWM"))
            m["growths"].append(m["peaks"][-1] - before)
            m["scores"] = np.concatenate([logprobs[i] for i in sorted(logprobs)])
            del resident
    results, reference = [], measured[0]["scores"]
    for m in measured:
        results.append({"seconds": statistics.median(m["times"]), "times": m["times"], "peak_rss": max(m["peaks"]),
                        "growth": max(m["growths"]), "max_score_diff": float(np.abs(m["scores"] - reference).max())})
    return {"runs": results}


# -- the parent ---------------------------------------------------------------------------------------
def grid(shape: Shape, threads: int) -> list[dict]:
    lps_values = sorted({1, 2, 4, shape.layers})
    return [{"label": f"lps {lps}, {storage}, bt {batch}", "rounds": None,
             "settings": {"device": "cpu", "dtype": shape.dtype, "layers_per_shard": lps, "storage": storage,
                          "batch_tokens": batch, "threads": threads, "verify_checksums": True,
                          "disk_folder": str(c.CACHE / "autotune-activations") if Storage(storage).on_disk else None}}
            for lps, storage, batch in itertools.product(lps_values, STORAGES, BATCHES)]


def calibrate_now():
    """This machine's figures measured afresh (and cached, as `flexorch probe --calibrate` does)."""
    from flexorch.orchestrator.calibrate import calibrated
    from flexorch.orchestrator.hardware import probe
    from flexorch.orchestrator.modelstore import default_cache_dir

    return calibrated(probe(c.CACHE), default_cache_dir(), force=True)


def auto_plan(hardware, layerwise: Path, prompts, ram_cap: int | None):
    from flexorch.contract.manifest import read_manifest
    from flexorch.contract.protocol import ScoreKind
    from flexorch.orchestrator.planner import make_plan
    from flexorch.orchestrator.spec import JobSpec, Limits, ScoreSettings

    job_dir = c.CACHE / "autotune-job"
    spec = JobSpec(path=job_dir / "job.yaml", model=layerwise, prompts=job_dir / "p.jsonl", output=job_dir / "o.pkl",
                   job_dir=job_dir, devices=("cpu",), score=ScoreSettings(kind="suffix_logprob"),
                   limits=Limits(ram=ram_cap))
    kind = ScoreKind.SUFFIX_LOGPROB
    plan = make_plan(hardware, read_manifest(layerwise), spec, [p.n_tokens for p in prompts],
                     suffix_counts=[len(p.suffix_ids) for p in prompts],
                     scored_counts=[len(kind.positions(len(p.prefix_ids), tuple(map(len, p.suffix_ids))))
                                    for p in prompts])
    return plan.workers[0], hardware.calibration


def compare(grid_runs: list[dict], auto: dict, cap: int | None, worker_base: int) -> dict:
    """Peaks are this child's (one process for the shape's runs): compared with each other, and, for
    the prediction, as a worker's would be: its measured fixed memory plus what the run added."""
    feasible = [r for r in grid_runs if "error" not in r and (cap is None or r["peak_rss"] <= cap)]
    best = min(feasible, key=lambda r: r["seconds"])
    near = [r for r in feasible if r["seconds"] <= 1.10 * best["seconds"]]
    smallest = min(near, key=lambda r: r["peak_rss"])
    return {"cap": cap, "feasible": len(feasible), "best": best["label"], "best_seconds": best["seconds"],
            "smallest_near_best": smallest["label"], "smallest_peak": smallest["peak_rss"],
            "auto_over_best_time": auto["seconds"] / best["seconds"],
            "auto_over_smallest_peak": auto["peak_rss"] / smallest["peak_rss"],
            "auto_under_cap": cap is None or auto["peak_rss"] <= cap,
            "predicted_over_measured_time": auto["predicted_seconds"] / auto["seconds"],
            "predicted_over_measured_peak": auto["predicted_peak_ram"] / (worker_base + auto["growth"]),
            "predicted_over_child_peak": auto["predicted_peak_ram"] / auto["peak_rss"]}


def rematch(script: Path, params: dict, best: dict, auto: dict) -> dict:
    """The best of a grid of noisy runs is biased fast (the least of many medians): auto against it,
    re-run in turns, REMATCH times each; the ratio of their medians."""
    import statistics

    runs = [{k: run[k] for k in ("label", "settings", "rounds")} for _ in range(REMATCH) for run in (best, auto)]
    measured = c.run_child(script, {**params, "repeats": 1, "method": "runs", "runs": runs})
    if "error" in measured:
        return {"rematch_error": measured["error"]}
    best_times, auto_times = (measured["runs"][i::2] for i in (0, 1))
    return {"rematch_best_seconds": [r["seconds"] for r in best_times],
            "rematch_auto_seconds": [r["seconds"] for r in auto_times],
            "auto_over_best_time_rematch": statistics.median(r["seconds"] for r in auto_times)
            / statistics.median(r["seconds"] for r in best_times)}


def auto_runs(hardware, layerwise: Path, prompts, caps) -> list[dict]:
    """auto's plan under each RAM cap, as runs for the child, with the planner's predictions."""
    autos = []
    for cap in caps:
        worker, _ = auto_plan(hardware, layerwise, prompts, cap)
        autos.append({"label": f"auto (cap {c.fmt_bytes(cap) if cap else 'none'})", "cap": cap,
                      "settings": asdict(worker.settings), "rounds": [list(r) for r in worker.rounds],
                      "predicted_seconds": worker.predicted_seconds - worker.predicted_start_seconds,
                      "predicted_peak_ram": worker.predicted_peak_ram, "reasons": list(worker.reasons)})
    return autos


def paired(script: Path, params: dict, layerwise: Path, prompts, caps) -> list[dict]:
    """The time model apart from this VM's drift (its speed moves by +-20% for minutes at a time, so one
    calibration minutes before a run can be off by that much whatever the model): PAIRS times,
    calibrate, plan and run auto once at once; per cap, the median of the pairs' predicted/measured."""
    import statistics

    ratios = [[] for _ in caps]
    for _ in range(PAIRS):
        autos = auto_runs(calibrate_now(), layerwise, prompts, caps)
        measured = c.run_child(script, {**params, "repeats": 1, "method": "runs", "runs": autos})
        if "error" in measured:
            return [{"paired_error": measured["error"]} for _ in caps]
        for out, auto, run in zip(ratios, autos, measured["runs"]):
            out.append(auto["predicted_seconds"] / run["seconds"])
    return [{"predicted_over_measured_time_pairs": r, "predicted_over_measured_time_paired": statistics.median(r)}
            for r in ratios]


def bench_shape(name: str, shape: Shape, script: Path) -> dict:
    import os

    checkpoint, layerwise = ensure_layerwise(shape)
    prompts = c.tokenize(checkpoint, c.make_texts(PROMPTS))
    threads = len(os.sched_getaffinity(0))
    runs = grid(shape, threads)
    everything = list(range(len(prompts)))
    params = {"prompts": c.prompts_to_json(prompts), "layerwise": str(layerwise), "repeats": REPEATS}
    measured = c.run_child(script, {**params, "method": "runs",
                                    "runs": [{**r, "rounds": [everything]} for r in runs]})
    if "error" in measured:
        return {"shape": asdict(shape), "error": measured}
    grid_runs = [{**r, **m} for r, m in zip(runs, measured["runs"])]
    smallest_peak = min(r["peak_rss"] for r in grid_runs)
    hardware = calibrate_now()
    print(f"{name}: calibrated in {hardware.calibration.seconds:.1f} s")
    caps = (None, int(TIGHT_CAP_OVER_SMALLEST * smallest_peak))
    autos = auto_runs(hardware, layerwise, prompts, caps)
    calibration = hardware.calibration
    measured = c.run_child(script, {**params, "method": "runs", "runs": autos})
    if "error" in measured:
        return {"shape": asdict(shape), "grid": grid_runs, "error": measured}
    autos = [{**a, **m} for a, m in zip(autos, measured["runs"])]
    comparisons = [compare(grid_runs, a, a["cap"], hardware.calibration.worker_base_ram) for a in autos]
    for comparison, auto in zip(comparisons, autos):
        best = next(r for r in grid_runs if r["label"] == comparison["best"])
        comparison |= rematch(script, params, {**best, "rounds": [everything]}, auto)
    for comparison, pairs in zip(comparisons, paired(script, params, layerwise, prompts, caps)):
        comparison |= pairs
    return {"shape": {**asdict(shape), "name": name}, "grid": grid_runs, "auto": autos, "comparisons": comparisons,
            "calibration": asdict(calibration) if calibration else None}


def main() -> None:
    import os

    parser = c.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    shapes = QUICK if args.quick else SHAPES
    machine = c.machine_info()
    script = Path(__file__)
    start = time.perf_counter()
    results = {name: bench_shape(name, shape, script) for name, shape in shapes.items()}
    rows = []
    for name, result in results.items():
        for comp in result.get("comparisons", ()):
            rows.append([name, c.fmt_bytes(comp["cap"]) if comp["cap"] else "none", comp["best"],
                         c.fmt_ratio(comp["auto_over_best_time"]),
                         c.fmt_ratio(comp.get("auto_over_best_time_rematch")),
                         c.fmt_ratio(comp["auto_over_smallest_peak"]),
                         c.fmt_ratio(comp["predicted_over_measured_time"]),
                         c.fmt_ratio(comp.get("predicted_over_measured_time_paired")),
                         c.fmt_ratio(comp["predicted_over_measured_peak"])])
        if "error" in result:
            rows.append([name, "-", str(result["error"])[:60], "-", "-", "-", "-", "-", "-"])
    c.print_table("auto vs the best combination found", ("shape", "RAM cap", "best found", "auto/best time",
                                                          "re-run in turns", "auto/least peak", "pred/meas time",
                                                          "paired (median)", "pred/meas peak"),
                  rows, caption=f"goals: time <= {GOALS['time']}x, peak <= {GOALS['peak']}x, predictions within "
                                f"{GOALS['predicted_time']:.0%} (paired) / {GOALS['predicted_peak']:.0%}; paired: median of "
                                f"{PAIRS} x (calibrate, plan, run); measured peak for the prediction: a worker's fixed "
                                "memory (calibrated) + what the run added in this process")
    payload = {"goals": GOALS, "prompts": asdict(PROMPTS), "repeats": REPEATS, "results": results,
               "calibration_seconds": [r["calibration"]["seconds"] for r in results.values() if r.get("calibration")],
               "seconds": time.perf_counter() - start, "load_average_after": os.getloadavg()}
    print(c.write_results("autotune", {**payload, "quick": args.quick}, machine, args.machine))


if __name__ == "__main__":
    if c.is_child():
        c.child_main({"runs": child_runs})
    else:
        main()
