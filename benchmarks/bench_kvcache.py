"""KV cache compression (issue 28 item 2): how far int8 and int4 move a greedy generation on a real
trained checkpoint, Gemma 3 270M base (tests/realmodel.py; Gemma terms of use), and what they cost in
time on this machine.

The engine generates greedily, one CPU worker, float32, the whole model in one shard, for 8 short
prompts x N new tokens, with the cache kept as computed and compressed (workers/kvcache.py). Per
scheme: tokens equal to the uncompressed run's before each sequence first differs (the agreement),
the largest |d log p| of the generated tokens up to and including that first different one (the same
context on both sides), and the wall time.

    python benchmarks/bench_kvcache.py [--new-tokens 8] [--machine NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import common as c

sys.path.insert(0, str(c.REPO / "tests"))
import realmodel  # noqa: E402  (tests/realmodel.py: builds the checkpoint once into the test cache)

PROMPTS = ["The capital of France is", "Two plus two equals", "The opposite of hot is", "On a clear day the sky is",
           "A cow says", "The day after Monday is", "Romeo and Juliet was written by William",
           "Water is made of hydrogen and"]


def generate(model_dir, prompts, compression: str) -> tuple[list, float]:
    from flexorch.contract.protocol import EngineSettings, ScoreSpec
    from flexorch.workers.engine import score_prompts

    settings = EngineSettings(device="cpu", dtype="float32", layers_per_shard=18, storage="cpu", batch_tokens=1024,
                              kv_cache_compression=compression)
    start = time.perf_counter()
    results, _ = score_prompts(model_dir, prompts, ScoreSpec("generate", logprobs=True), settings)
    seconds = time.perf_counter() - start
    return [(r.scores["ids"][0][:r.scores["n_new"][0]].tolist(), r.scores["logprobs"][0]) for r in results], seconds


def deviation(exact: list, got: list) -> dict:
    kept, total, worst = 0, 0, 0.0
    for (want, want_lp), (ids, lp) in zip(exact, got):
        same = next((k for k, (a, b) in enumerate(zip(want, ids)) if a != b), min(len(want), len(ids)))
        shared = min(same + 1, len(want), len(ids))
        kept, total = kept + same, total + len(want)
        worst = max(worst, float(np.abs(want_lp[:shared] - lp[:shared]).max()))
    return {"tokens_agreeing": kept, "tokens": total, "max_abs_logprob_deviation": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--machine", default=None)
    args = parser.parse_args()
    if (missing := realmodel.missing_reason()) is not None:
        sys.exit(missing)
    from transformers import AutoTokenizer

    from flexorch.contract.protocol import TokenizedPrompt
    from flexorch.orchestrator.modelstore import resolve_model

    checkpoint = realmodel.gemma3_270m()
    model_dir = resolve_model(checkpoint, cache_dir=checkpoint.parent / "flexorch-cache")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [TokenizedPrompt(i, tuple(tokenizer(t).input_ids), ((),), max_new_tokens=args.new_tokens)
               for i, t in enumerate(PROMPTS)]
    exact, seconds = generate(model_dir, prompts, "none")
    out = {"machine": c.machine_info(), "new_tokens": args.new_tokens, "prompts": len(prompts),
           "none": {"seconds": seconds, "texts": [tokenizer.decode(ids) for ids, _ in exact]}}
    for scheme in ("int8", "int4"):
        got, seconds = generate(model_dir, prompts, scheme)
        out[scheme] = {"seconds": seconds, **deviation(exact, got)}
        print(scheme, out[scheme], flush=True)
    path = c.RESULTS / f"kvcache-{args.machine or c.machine_slug(out['machine'])}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{c.RESULT_MARKER}{path}")


if __name__ == "__main__":
    main()
