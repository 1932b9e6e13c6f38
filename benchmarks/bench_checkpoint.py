"""Benchmark 13 (issue 29 item 4): what checkpoints of a round in progress cost, and what a kill loses.

Per activation tier, in child processes on the same prompts: a round without checkpoints; the same
round checkpointed every K shards (the engine's own account of the seconds and bytes they took, as
a share of the round); and the round stopped after a random shard (seeded) and run again, which
resumes from its last checkpoint: shard steps recomputed after the restart, against the round's
total, and the scores compared byte for byte with the uninterrupted run's.

    python benchmarks/bench_checkpoint.py [--quick] [--every 4] [--storages cpu,disk] [--prompts 8] [--steps 1]
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from pathlib import Path

import common as c

GOAL_COST = 0.05  # checkpoints' share of the round's time (the planner's cap)


class _Stop(Exception):
    """Stands for the kill."""


def child_round(params: dict) -> dict:
    import time

    import numpy as np

    from flexorch.contract.protocol import EngineSettings, ScoreSpec
    from flexorch.workers.engine import EngineHooks, score_prompts

    prompts = c.prompts_from_json(params["prompts"])
    ran = []

    def after_shard(step: int, shard: int) -> None:
        ran.append((step, shard))
        if params["stop_after"] and len(ran) == params["stop_after"]:
            raise _Stop()

    settings = EngineSettings("cpu", "float32", 1, params["storage"], params["batch_tokens"],
                              disk_folder=params["scratch"], verify_checksums=False,
                              checkpoint_dir=params["checkpoint_dir"], checkpoint_key="bench",
                              checkpoint_shards=params["every"])
    score = ScoreSpec("next_token_probs" if params["steps"] > 1 else "suffix_logprob", generate_tokens=params["steps"])
    warm = dataclasses.replace(settings, checkpoint_dir=None)
    score_prompts(params["layerwise"], prompts[:1], ScoreSpec(), warm)  # warm-up: kernels, allocator, imports
    start = time.perf_counter()
    try:
        results, summary = score_prompts(params["layerwise"], prompts, score, settings,
                                         hooks=EngineHooks(after_shard=after_shard))
    except _Stop:
        return {"stopped_after": len(ran), "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    flat = [r.scores["logprob"] if isinstance(r.scores, dict) else r.scores.reshape(-1) for r in results]
    np.save(params["scores"], np.concatenate(flat))
    return {"seconds": seconds, "shards_run": len(ran), "shard_steps": summary.shard_steps,
            "shards_resumed": summary.shards_resumed, "checkpoints": summary.checkpoints,
            "checkpoint_seconds": summary.checkpoint_seconds, "checkpoint_bytes": summary.checkpoint_bytes}


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=4, help="shards between checkpoints")
    parser.add_argument("--storages", default="cpu,disk")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=29)
    args = parser.parse_args()
    shape = c.QUICK_SHAPE if args.quick else c.DEFAULT_SHAPE
    prompt_set = dataclasses.replace(c.QUICK_PROMPTS if args.quick else c.PromptSet(), n_prompts=args.prompts)
    machine = c.machine_info()
    checkpoint, layerwise = c.ensure_checkpoint(shape), c.ensure_layerwise(shape)
    prompts = c.tokenize(checkpoint, c.make_texts(prompt_set))
    c.warm_page_cache([layerwise])
    rng = random.Random(args.seed)
    runs, rows = {}, []
    for storage in args.storages.split(","):
        with tempfile.TemporaryDirectory() as scratch:
            def run(name: str, every: int, checkpoints: bool, stop_after: int = 0) -> dict:
                return c.run_child(Path(__file__), {
                    "method": "round", "layerwise": str(layerwise), "prompts": c.prompts_to_json(prompts),
                    "storage": storage, "batch_tokens": args.batch_tokens, "steps": args.steps, "every": every,
                    "scratch": scratch, "checkpoint_dir": f"{scratch}/checkpoints-{name}" if checkpoints else None,
                    "stop_after": stop_after, "scores": f"{scratch}/{name}.npy"})

            plain = run("plain", 0, False)
            checked = run("checked", args.every, True)
            stop_after = rng.randint(2, plain["shard_steps"] - 1)
            stopped = run("resumed", args.every, True, stop_after)
            resumed = run("resumed", args.every, True)
            same = (Path(scratch, "plain.npy").read_bytes() == Path(scratch, "checked.npy").read_bytes()
                    == Path(scratch, "resumed.npy").read_bytes())
        cost = checked["checkpoint_seconds"] / checked["seconds"]
        runs[storage] = {"plain": plain, "checkpointed": checked, "stopped": stopped, "resumed": resumed,
                         "cost_share": cost, "time_ratio": checked["seconds"] / plain["seconds"],
                         "recomputed_after_restart": stop_after - resumed["shards_resumed"],
                         "identical_scores": same}
        print(f"{storage}: {runs[storage]}", flush=True)  # a long run's numbers, before the table
        rows.append([storage, c.fmt_seconds(plain["seconds"]), c.fmt_seconds(checked["seconds"]),
                     f"{checked['checkpoints']} x "
                     f"{c.fmt_bytes(checked['checkpoint_bytes'] / max(1, checked['checkpoints']))}",
                     f"{cost:.1%} (<= {GOAL_COST:.0%})",
                     f"{stop_after} / {plain['shard_steps']}", f"{resumed['shards_resumed']}",
                     f"{stop_after - resumed['shards_resumed']} (<= {args.every})", "yes" if same else "NO"])
    tokens = sum(p.n_tokens for p in prompts)
    caption = (f"{shape.name}, {len(prompts)} prompts of ~{tokens // len(prompts)} tokens, {args.steps} step(s), "
               f"1 layer per shard, a checkpoint every {args.every} shards, warm page cache")
    c.print_table("checkpoints of a round in progress", ("storage", "plain s", "checkpointed s", "checkpoints",
                  "their cost", "stopped after", "resumed after", "recomputed", "same bytes"), rows, caption)
    path = c.write_results("checkpoint", {"quick": args.quick, "model": shape.name, "prompt_set": vars(prompt_set),
                                          "every": args.every, "steps": args.steps, "goal_cost_share": GOAL_COST,
                                          "runs": runs}, machine, args.machine)
    print(f"results: {path}")


if __name__ == "__main__":
    if c.is_child():
        c.child_main({"round": child_round})
    else:
        main()
