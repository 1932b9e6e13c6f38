"""Benchmark 3 (issue 7): peak memory as the model gets deeper.

Models 1x, 2x and 4x as deep (same width), each method in its own process: flexorch streaming
(storage cpu, one layer per shard) should stay flat; the in-memory baseline (AutoModelForCausalLM
held whole, bench_limit's (b)) grows linearly with the weights. Peak RSS per process (and peak GPU
memory where the run is on CUDA). Writes a PNG plot next to the JSON.

    python benchmarks/bench_memory.py [--quick] [--depths 1,2,4]
"""

from __future__ import annotations

import time
from pathlib import Path

import common as c


def child_flexorch(params: dict) -> dict:
    return c.flexorch_run(Path(params["layerwise"]), c.prompts_from_json(params["prompts"]), verify=False)


def child_in_memory(params: dict) -> dict:
    start = time.perf_counter()
    model = c.load_hf_model(Path(params["checkpoint"]))
    load_seconds = time.perf_counter() - start
    seconds = c.score_in_memory(model, c.prompts_from_json(params["prompts"]))
    return {"seconds": seconds, "load_seconds": load_seconds}


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    weights = [p["weight_bytes"] / 1e9 for p in points]
    for key, label in (("flexorch_peak_rss", "flexorch (streaming)"), ("in_memory_peak_rss", "in-memory model")):
        axes.plot(weights, [(p[key] or 0) / 1e9 for p in points], marker="o", label=label)
    axes.plot(weights, weights, linestyle=":", color="grey", label="weight bytes")
    for p, x in zip(points, weights):
        axes.annotate(f"{p['layers']} layers", (x, 0), textcoords="offset points", xytext=(0, 4), fontsize=8)
    axes.set_xlabel("model weights (GB)")
    axes.set_ylabel("peak RSS (GB)")
    axes.set_title(title, fontsize=10)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1,2,4", help="depth multiples of the base model")
    args = parser.parse_args()
    shape = c.QUICK_SHAPE if args.quick else c.DEFAULT_SHAPE
    prompt_set = c.QUICK_PROMPTS if args.quick else c.PromptSet()
    machine, script = c.machine_info(), Path(__file__)
    points, rows = [], []
    for factor in (int(x) for x in args.depths.split(",")):
        model = shape.deeper(factor)
        checkpoint, layerwise = c.ensure_checkpoint(model), c.ensure_layerwise(model)
        prompts = c.prompts_to_json(c.tokenize(checkpoint, c.make_texts(prompt_set)))
        c.warm_page_cache([checkpoint, layerwise])
        ours = c.run_child(script, {"method": "flexorch", "prompts": prompts, "layerwise": str(layerwise)})
        theirs = c.run_child(script, {"method": "in_memory", "prompts": prompts, "checkpoint": str(checkpoint)})
        size = sum(p.stat().st_size for p in c.weight_files(layerwise))
        points.append({"model": model.name, "layers": model.layers, "weight_bytes": size,
                       "flexorch_peak_rss": ours.get("peak_rss"), "in_memory_peak_rss": theirs.get("peak_rss"),
                       "flexorch_peak_device_memory": ours.get("peak_device_memory"),
                       "flexorch": ours, "in_memory": theirs})
        rows.append([model.name, c.fmt_bytes(size), c.fmt_bytes(ours.get("peak_rss")),
                     c.fmt_bytes(theirs.get("peak_rss")), c.fmt_seconds(ours.get("seconds")),
                     c.fmt_seconds(theirs.get("seconds")), (ours.get("error") or theirs.get("error") or "")[:60]])
    slope = None
    if len(points) > 1 and all(p["flexorch_peak_rss"] and p["in_memory_peak_rss"] for p in points):
        grow = points[-1]["weight_bytes"] - points[0]["weight_bytes"]
        slope = {key: (points[-1][key] - points[0][key]) / grow
                 for key in ("flexorch_peak_rss", "in_memory_peak_rss")}
    caption = ("peak RSS per process (Python + torch included); slope = extra peak RSS per extra weight byte: "
               + (", ".join(f"{k.split('_peak')[0]} {v:.2f}" for k, v in slope.items()) if slope else "-"))
    c.print_table("peak memory vs model depth", ("model", "weights", "flexorch peak RSS", "in-memory peak RSS",
                  "flexorch s", "in-memory s", "note"), rows, caption)
    path = c.write_results("memory", {"quick": args.quick, "prompt_set": vars(prompt_set), "points": points,
                                      "slope_rss_per_weight_byte": slope}, machine, args.machine)
    png = path.with_suffix(".png")
    plot(points, png, f"peak RSS vs depth ({shape.hidden} wide, {machine['cpu']})")
    print(f"results: {path}\nplot: {png}")


if __name__ == "__main__":
    if c.is_child():
        c.child_main({"flexorch": child_flexorch, "in_memory": child_in_memory})
    else:
        main()
