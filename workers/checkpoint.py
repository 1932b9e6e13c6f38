"""Checkpoints of a round in progress, so a crash loses at most a few shards' work, not the pass.

The engine's schedule (workers/engine.py) calls `after_shard` at the end of every shard step and
`after_step` at the end of every generation step. Every `EngineSettings.checkpoint_shards` complete
shards (the planner's choice, from the job's checkpoint_interval; a streamed MoE layer or a head in
steps counts once, at its end, where the round's state is whole again), this writes it: the
activations every batch waits with for the next shard (the link's store), the KV cache
(generating), the scores of the steps done and the ids generated so far; a generate round's scores
are its sequences' state instead (workers/generate.py's `Generation`: their ids, log-probs and why
each ended), from which the resumed round rebuilds each step's batches of the prompts then running.
Sampling draws from seeds of (seed, prompt, suffix, step) alone: no random state is saved.

A boundary inside a shard cut into steps — a streamed MoE layer between its dense part and its last
expert group, a head between its vocabulary steps — holds state on the pass (`_Pass.streamed`,
`_Pass.head_steps`) and is skipped, never saved half. The disk tier's batch files are hard-linked,
not copied (workers/activations.py).

`restore` (at the round's start) puts the newest valid checkpoint back into the fresh stores and
says where the schedule resumes; one of another job or layout, or with a file missing or cut
short, is ignored and the round computed from its start. The worker removes the round's folder
once its part is committed (workers/worker.py). Pipeline stages take none: a batch's activations are spread over the
stages and the queues between them, so no one stage holds a consistent state.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flexorch.contract.checkpoints import CHECKPOINT_PREFIX, META_NAME, CheckpointMeta, round_folder
from flexorch.contract.protocol import EngineSettings, TokenizedPrompt
from flexorch.contract.shards import Shard
from flexorch.workers.activations import ActivationStore, name_key
from flexorch.workers.generate import Generation
from flexorch.workers.kvcache import KVCache
from flexorch.workers.scoring import StepResult

ACTIVATIONS, CACHE, SCORES, GENERATION = "act", "kv", "scores.safetensors", "generation.safetensors"


@dataclass(frozen=True)
class ResumePoint:
    """Where a round's schedule starts: (step, position) and the state before it (a fresh round: 0, 0)."""

    step: int = 0
    position: int = 0
    generated: list | None = None  # per prompt, per suffix: the ids generated before `step`
    scores: list | None = None  # per prompt: its StepResult of each step before `step`

    def skips(self, step: int, position: int) -> bool:
        """Whether shard `position` of `step` was done before the checkpoint."""
        return (step, position) < (self.step, self.position)


@dataclass
class CheckpointStats:
    written: int = 0
    seconds: float = 0.0
    bytes: int = 0
    resumed: int = 0  # shard steps the restored checkpoint spared
    taken_at: float | None = None  # time.perf_counter() when the newest was written


def layout_of(settings: EngineSettings, steps: int) -> str:
    """The settings a round's batches and shard positions follow: a checkpoint resumes under these only."""
    return (f"batch_tokens={settings.batch_tokens},layers_per_shard={settings.layers_per_shard},"
            f"experts_per_group={settings.experts_per_group},kv_cache={settings.kv_cache},steps={steps}")


class Checkpoints:
    """One round's checkpoints: `restore` at its start, `after_shard`/`after_step` as it runs.

    `activations`: the store batches wait in between shards; `cache`: the KV cache (None: no cache);
    `generation`: a generate round's sequences (None: another kind, whose scores are kept per step)."""

    def __init__(self, settings: EngineSettings, prompts: Sequence[TokenizedPrompt], shards: list[Shard],
                 steps: int, activations: ActivationStore, cache: KVCache | None,
                 generation: Generation | None = None):
        self.every = settings.checkpoint_shards
        self.folder = round_folder(settings.checkpoint_dir, [p.index for p in prompts])
        self.key, self.layout = settings.checkpoint_key, layout_of(settings, steps)
        self.shards, self.steps, self.prompts = shards, steps, len(prompts)
        self.activations, self.cache, self.generation = activations, cache, generation
        self.stats = CheckpointStats()
        self._since = 0  # shard steps computed since the last checkpoint (or the round's start)
        self._sequence = 0

    # -- resuming -------------------------------------------------------------------------------------
    def restore(self) -> ResumePoint:
        """The newest valid checkpoint's state, put back into the stores; a fresh start where none is."""
        candidates = sorted(self.folder.glob(f"{CHECKPOINT_PREFIX}*"), reverse=True) if self.folder.is_dir() else []
        for candidate in candidates:
            try:
                point = self._restore(candidate)
            except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises, the round is computed anew
                print(f"checkpoint {candidate} ignored: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            self._sequence = int(candidate.name[len(CHECKPOINT_PREFIX):])
            self.stats.resumed = point.step * len(self.shards) + point.position
            print(f"resumed from checkpoint {candidate}: step {point.step + 1}, shard position {point.position} "
                  f"({self.stats.resumed} of {self.steps * len(self.shards)} shard steps not recomputed)", flush=True)
            self._remove_others(keep=candidate)
            return point
        self._remove_others(keep=None)
        return ResumePoint()

    def _restore(self, path: Path) -> ResumePoint:
        meta = CheckpointMeta.from_json((path / META_NAME).read_text())
        if meta.key != self.key or meta.layout != self.layout:
            raise ValueError("of another job or batch layout")
        if len(meta.generated) != self.prompts:
            raise ValueError(f"holds {len(meta.generated)} prompts, the round {self.prompts}")
        if not (0 <= meta.step < self.steps and 0 <= meta.position < len(self.shards)):
            raise ValueError(f"resume point (step {meta.step}, shard {meta.position}) outside the round")
        for name, size in meta.files.items():
            if (path / name).stat().st_size != size:
                raise ValueError(f"{name}: {(path / name).stat().st_size} bytes, written {size}")
        act = self._files(path, meta, ACTIVATIONS)
        kv = self._files(path, meta, CACHE)
        if kv and self.cache is None:
            raise ValueError("holds a KV cache this round does not keep")
        if (GENERATION in meta.files) != (self.generation is not None):
            raise ValueError("of a generate round" if GENERATION in meta.files else "holds no generation state")
        for file in [*act.values(), *kv.values()]:
            with safe_open(file, "pt"):  # the header parses: the file is a whole safetensors file
                pass
        # a generate round keeps no scores per step: its sequences' state is all of them
        scores = _read_scores(path / SCORES, len(meta.generated), meta.step if self.generation is None else 0)
        if self.generation is not None:  # checked on a scratch copy before anything is put back
            state = load_file(path / GENERATION, "cpu")
            self.generation.check(state, meta.step)
        self.activations.restore(act)
        if self.cache is not None:
            self.cache.store.restore(kv)
            self.cache.layers.update(key[0] for key in kv)  # so a batch that leaves frees them: (layer, batch, block)
        if self.generation is not None:  # last: a round whose restore failed above starts with a fresh state
            self.generation.restore(state, meta.step)
        generated = [[tuple(ids) for ids in per_prompt] for per_prompt in meta.generated]
        return ResumePoint(meta.step, meta.position, generated, scores)

    @staticmethod
    def _files(path: Path, meta: CheckpointMeta, prefix: str) -> dict:
        return {name_key(name[len(prefix) + 1:]): path / name for name in meta.files if name.startswith(prefix + "-")}

    # -- taking them ----------------------------------------------------------------------------------
    def after_shard(self, step: int, position: int, complete: bool, generated: list, scores: list) -> None:
        """Shard `position` of `step` is done; `complete`: nothing of it waits on the pass (a whole
        shard, not a streamed layer's or a head's inner step). The step's end is `after_step`'s."""
        if not complete:  # counted at its end: the planner's interval is in whole shards
            return
        self._since += 1
        if self.every and position + 1 < len(self.shards) and self._since >= self.every:
            self._save(step, position + 1, generated, scores, with_activations=True)

    def after_step(self, step: int, generated: list, scores: list) -> None:
        """Generation step `step` is done, its scores and next ids with it (the activations are spent)."""
        if self.every and step + 1 < self.steps and self._since >= self.every:
            self._save(step + 1, 0, generated, scores, with_activations=False)

    def _save(self, step: int, position: int, generated: list, scores: list, with_activations: bool) -> None:
        start = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.folder))
        try:
            files = self.activations.save_held(tmp, ACTIVATIONS) if with_activations else {}
            if self.cache is not None:
                files |= self.cache.store.save_held(tmp, CACHE)
            files |= _write_scores(tmp / SCORES, scores)
            if self.generation is not None:
                save_file(self.generation.state(), tmp / GENERATION)
                files[GENERATION] = (tmp / GENERATION).stat().st_size
            meta = CheckpointMeta(self.key, self.layout, step, position,
                                  [[list(ids) for ids in per_prompt] for per_prompt in generated], files)
            (tmp / META_NAME).write_text(meta.to_json())
            for name in [*files, META_NAME]:
                _fsync(tmp / name)
            self._sequence += 1
            final = self.folder / f"{CHECKPOINT_PREFIX}{self._sequence:06d}"
            os.rename(tmp, final)  # complete or absent
            _fsync(self.folder)
        except OSError as exc:  # a checkpoint spares work; failing to take one must not lose the round
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"checkpoint at step {step + 1}, shard position {position} not taken: {exc}", flush=True)
            return
        self._remove_others(keep=final)
        self._since = 0
        self.stats.written += 1
        self.stats.bytes += sum(files.values())
        self.stats.taken_at = time.perf_counter()
        self.stats.seconds += self.stats.taken_at - start

    def _remove_others(self, keep: Path | None) -> None:
        """Older checkpoints and what a killed writer left: only the newest complete one is kept."""
        if not self.folder.is_dir():
            return
        for entry in self.folder.iterdir():
            if entry != keep:
                shutil.rmtree(entry, ignore_errors=True)


def _write_scores(path: Path, scores: list) -> dict[str, int]:
    """Per prompt i and step k, its StepResult's tensors as s{i}-{k}-{values|greedy|ids}."""
    tensors = {}
    for i, per_step in enumerate(scores):
        for k, result in enumerate(per_step):
            for part, tensor in (("values", result.values), ("greedy", result.is_greedy), ("ids", result.next_ids)):
                if tensor is not None:
                    tensors[f"s{i}-{k}-{part}"] = tensor.detach().cpu().contiguous().clone()
    save_file(tensors, path)
    return {path.name: path.stat().st_size}


def _read_scores(path: Path, prompts: int, steps: int) -> list[list[StepResult]]:
    tensors = load_file(path, "cpu")
    if len(tensors) and prompts == 0:
        raise ValueError("scores of no prompt")
    return [[StepResult(tensors[f"s{i}-{k}-values"], tensors.get(f"s{i}-{k}-greedy"), tensors.get(f"s{i}-{k}-ids"))
             for k in range(steps)] for i in range(prompts)]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
