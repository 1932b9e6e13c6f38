"""Benchmark 9 (issue 17): compressed weights (`flexorch prepare --compress int8|int4`) against the
uncompressed model: bytes read per pass, time of a pass, and how far the scores move.

Deviation is measured two ways on the same prompts: max |d log p| over the whole next-token
distribution (next_token_probs), and agreement of the multiple-choice answer, the suffix with the
highest log P(suffix | prefix) (suffix_logprob), with the uncompressed model's. Weights are read
cold (page cache evicted before each run) so the bytes saved show up as time saved.

    python benchmarks/bench_compress.py [--quick] [--warm] [--prompts 32]
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import common as c

from flexorch.contract.protocol import ScoreKind

SCHEMES = (None, "int8", "int4")


def ensure_compressed(shape: c.ModelShape, scheme: str | None) -> Path:
    from flexorch.orchestrator.prepare import prepare_checkpoint

    if scheme is None:
        return c.ensure_layerwise(shape)
    target = c.CACHE / shape.name / f"layerwise-{scheme}"
    if not target.exists():
        prepare_checkpoint(c.ensure_checkpoint(shape), target, compress=scheme)
    return target


def child_score(params: dict) -> dict:
    import time

    import numpy as np

    from flexorch.contract.protocol import EngineSettings, ScoreSpec
    from flexorch.workers.engine import score_prompts

    prompts = c.prompts_from_json(params["prompts"])
    settings = EngineSettings("cpu", "float32", 1, "cpu", params["batch_tokens"], verify_checksums=False)
    out = {}
    for kind in ("next_token_probs", "suffix_logprob"):
        if params["cold"]:
            c.evict_page_cache([Path(params["layerwise"])])
        before, start = c.disk_read_bytes(), time.perf_counter()
        results, summary = score_prompts(params["layerwise"], prompts, ScoreSpec(kind), settings)
        out[kind] = {"seconds": time.perf_counter() - start, "bytes_read": summary.bytes_read,
                     "disk_read_bytes": c.disk_read_bytes() - before, "load_seconds": summary.load_seconds}
        if ScoreKind(kind) is ScoreKind.NEXT_TOKEN_PROBS:
            np.save(params["probs"], np.concatenate([r.scores.reshape(-1) for r in results]))
        else:
            out["choices"] = [int(np.argmax(r.scores["logprob"])) for r in results]
    return out


def main() -> None:
    import numpy as np

    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--warm", action="store_true", help="keep the page cache (default: evict before each run)")
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--prompts", type=int, help="number of prompts (default: the prompt set's); few prompts "
                        "make the read a larger share of the time")
    args = parser.parse_args()
    shape = c.QUICK_SHAPE if args.quick else c.DEFAULT_SHAPE
    prompt_set = c.QUICK_PROMPTS if args.quick else c.PromptSet()
    if args.prompts:
        prompt_set = dataclasses.replace(prompt_set, n_prompts=args.prompts)
    machine = c.machine_info()
    prompts = c.tokenize(c.ensure_checkpoint(shape), c.make_texts(prompt_set))
    runs, rows = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for scheme in SCHEMES:
            name = scheme or "uncompressed"
            layerwise = ensure_compressed(shape, scheme)
            probs = Path(scratch) / f"{name}.npy"
            run = c.run_child(Path(__file__), {"method": "score", "layerwise": str(layerwise), "probs": str(probs),
                                               "prompts": c.prompts_to_json(prompts), "cold": not args.warm,
                                               "batch_tokens": args.batch_tokens})
            run["file_bytes"] = sum(p.stat().st_size for p in c.weight_files(layerwise))
            if probs.exists():
                base = np.log(np.maximum(np.load(Path(scratch) / "uncompressed.npy"), 1e-30))
                run["max_abs_d_logprob"] = float(np.abs(np.log(np.maximum(np.load(probs), 1e-30)) - base).max())
            runs[name] = run
    base = runs["uncompressed"]
    for name, run in runs.items():
        if "choices" not in run:
            rows.append([name, "-", "-", "-", "-", "-", run.get("error", "")[:60]])
            continue
        agree = float(np.mean(np.equal(run["choices"], base["choices"])))
        run["choice_agreement"] = agree
        ntp = run["next_token_probs"]
        rows.append([name, c.fmt_bytes(ntp["bytes_read"]), f"{base['next_token_probs']['bytes_read'] / ntp['bytes_read']:.2f}x",
                     c.fmt_seconds(ntp["seconds"]), f"{base['next_token_probs']['seconds'] / ntp['seconds']:.2f}x",
                     f"{run['max_abs_d_logprob']:.3g}", f"{agree:.0%}"])
    caption = (f"{shape.name}, {len(prompts)} prompts ({prompt_set.n_suffixes} suffixes), next_token_probs pass, "
               f"page cache {'warm' if args.warm else 'evicted before each run'}; random weights: the deviation is "
               "that of a random model's flat distributions")
    c.print_table("compressed weights vs uncompressed", ("weights", "bytes read", "fewer", "seconds", "faster",
                  "max |d log p|", "same MC answer"), rows, caption)
    path = c.write_results("compress", {"quick": args.quick, "model": shape.name, "prompt_set": vars(prompt_set),
                                        "cold": not args.warm, "runs": runs}, machine, args.machine)
    print(f"results: {path}")


if __name__ == "__main__":
    if c.is_child():
        c.child_main({"score": child_score})
    else:
        main()
