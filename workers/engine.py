"""The per-device engine: stream a layerwise model through one device over a list of prompts.

Loop order is shard-major: a shard (a few decoder layers, or the embeddings, or norm + lm head)
is loaded once per pass and every batch of prompts goes through it before the next shard comes;
activations wait in an ActivationStore. Each prompt is one packed row — its prefix once, then
every suffix with positions restarting after the prefix and a mask that keeps suffixes apart — so
the prefix is computed once per layer, not once per suffix. With several generation steps the
first step keeps every layer's keys and values (workers/kvcache.py) and each later step computes
only the newest token of every suffix against them. `Engine.run` is that schedule alone (per step,
per shard: load, run over every batch, release, report); what running one kind of shard step means
is its runner's (workers/shardrun.py), and what a step's batches hold is the pass's (`_Pass`).

Where a batch's input comes from and its output goes is the `Link` (workers/link.py): in data mode
the one-stage `LocalLink` over the activation store; in pipeline mode (workers/pipeline.py) the
same loop runs on every stage over the same prompts and settings — so every stage builds the same
batches — but streams only the shards the stage owns, receiving from the previous stage and
sending to the next, and only the stage owning the head computes scores.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from flexorch.contract.choices import on_cpu
from flexorch.contract.protocol import (LAYOUT_CACHE_BYTES, EngineSettings, EngineSummary, ProgressEvent, PromptResult,
                                       ScoreKind, ScoreSpec, TokenizedPrompt)
from flexorch.contract.shards import owner, plan_shards
from flexorch.workers import devicememory
from flexorch.workers.activations import make_store
from flexorch.workers.adapter import LayerKind, ModelAdapter, PackedBatch, pack_rows
from flexorch.workers.checkpoint import Checkpoints, CheckpointStats, ResumePoint
from flexorch.workers.experts import StreamedExperts
from flexorch.workers.generate import Generation, sequence_seed
from flexorch.workers.heap import Heap
from flexorch.workers.kvcache import KVCache, NoCache, append_columns, pack_new_tokens
from flexorch.workers.layerfile import LayerwiseModel
from flexorch.workers.link import Link, LocalLink
from flexorch.workers.prefetch import LoadedShard, LoaderStats, ResidentShards, ShardLoader
from flexorch.workers.scoring import StepResult, StepScores, score_targets
from flexorch.workers.shardrun import BatchDone, ShardContext, ShardRun, shard_runs

Row = tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]  # (prefix_ids, suffix_ids) of one packed row


@dataclass(frozen=True)
class EngineHooks:
    """Test hooks for fault injection; each is called with (step, shard index[, batch index])."""

    before_batch: Callable[[int, int, int], None] | None = None
    after_shard: Callable[[int, int], None] | None = None


def make_batches(rows: Sequence[Row], batch_tokens: int) -> list[list[int]]:
    """Group row indices into batches of at most `batch_tokens` padded tokens, longest first, so
    rows of similar length share a batch and padding stays small. A row longer than the budget
    gets a batch of its own (the planner keeps batch_tokens above the longest prompt)."""
    lengths = [len(prefix) + sum(len(s) for s in suffixes) for prefix, suffixes in rows]
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(i)  # the batch's first row is its longest: it sets the padded length
        else:
            batches.append([i])
    return batches


def peak_rss() -> int:
    """Peak resident memory of this process, in bytes.

    VmHWM, not ru_maxrss: ru_maxrss survives fork + exec, so a worker spawned by a big controller
    (or a test process) would report its parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; bytes on macOS


class _Pass:
    """One pass over the model for one generation step: batches, their layout and scores.

    packed[b]: the tokens batch b computes, (rows, Q); keys[b]: the layout of every key they attend
    to, (rows, K): packed[b] itself when the pass computes the rows in full; against the KV cache,
    the cached columns followed by packed[b] (the newest token of each suffix)."""

    def __init__(self, rows: list[Row], batches: list[list[int]], kind: str, cached: list[PackedBatch] | None = None,
                 seeds: Callable[[int, int], int] | None = None, cache_batches: list[int] | None = None,
                 kept_rows: list[torch.Tensor | None] | None = None):
        self.rows, self.batches = rows, batches
        # the KV cache's batch each batch continues, and which of that batch's rows it keeps (None: all)
        self.cache_batches = cache_batches if cache_batches is not None else list(range(len(batches)))
        self.kept_rows = kept_rows if kept_rows is not None else [None] * len(batches)
        batch_rows = [[rows[i] for i in batch] for batch in batches]
        if cached is None:
            self.packed = [pack_rows(r) for r in batch_rows]
            self.keys = self.packed
            self.targets = [score_targets(r, kind) for r in batch_rows]
        else:
            self.packed = [pack_new_tokens(r) for r in batch_rows]
            self.keys = [append_columns(k, p) for k, p in zip(cached, self.packed)]
            # one column per suffix: scored as a row with no prefix and one-token suffixes
            self.targets = [score_targets([((), tuple(s[-1:] for s in suffixes)) for _, suffixes in r], kind)
                            for r in batch_rows]
        if seeds is not None:  # sampling: each scored position draws with its sequence's seed
            for b, batch in enumerate(batches):
                per_suffix = torch.tensor([seeds(i, j) for i in batch for j in range(len(rows[i][1]))], dtype=torch.long)
                self.targets[b] = dataclasses.replace(self.targets[b], seeds=per_suffix[self.targets[b].owner])
        self.tokens = sum(p.input_ids.numel() for p in self.packed)
        self._layouts: dict[tuple[int, LayerKind], tuple] = {}  # (batch, layer kind) → cached layout
        self._layout_bytes = 0
        self._ids_on_device: dict[int, tuple[torch.Tensor, PackedBatch]] = {}
        # What a shard cut into steps holds between them (workers/shardrun.py); None between shards.
        self.streamed: StreamedExperts | None = None
        self.head_steps: list[StepScores] | None = None
        self.results: list[StepResult | None] = [None] * len(batches)  # per batch, once the head ran

    @classmethod
    def of_rows(cls, rows: list[Row], batch_tokens: int, kind: str, live: Callable[[int], bool] | None = None,
                seeds: Callable[[int, int], int] | None = None) -> "_Pass":
        """The rows computed in full (those `live`, all without it), batched within `batch_tokens`."""
        indices = [i for i in range(len(rows)) if live is None or live(i)]
        batches = make_batches([rows[i] for i in indices], batch_tokens)
        return cls(rows, [[indices[r] for r in batch] for batch in batches], kind, seeds=seeds)

    def next_step(self, rows: list[Row], kind: str, live: Callable[[int], bool] | None = None,
                  seeds: Callable[[int, int], int] | None = None) -> "_Pass":
        """The next generation step against the KV cache: the same batches (the cache is kept per
        batch), each suffix one token longer in `rows`; rows not `live` leave (their cache freed),
        and a batch left empty is gone."""
        batches, cached, cache_batches, kept_rows = [], [], [], []
        for b, batch in enumerate(self.batches):
            kept = [r for r, i in enumerate(batch) if live is None or live(i)]
            if not kept:
                continue
            keys = self.keys[b]
            if len(kept) < len(batch):
                index = torch.tensor(kept, dtype=torch.long)
                keys = PackedBatch(keys.input_ids[index], keys.position_ids[index], keys.segment_ids[index])
            batches.append([batch[r] for r in kept])
            cached.append(keys)
            cache_batches.append(self.cache_batches[b])
            kept_rows.append(None if len(kept) == len(batch) else torch.tensor(kept, dtype=torch.long))
        return _Pass(rows, batches, kind, cached=cached, seeds=seeds, cache_batches=cache_batches,
                     kept_rows=kept_rows)

    def ids_on_device(self, b: int, device: torch.device) -> tuple[torch.Tensor, PackedBatch]:
        """(query position ids, key layout) of batch b on `device`, copied once per pass: a layout
        rebuilt per layer (beyond LAYOUT_CACHE_BYTES) then costs GPU kernels only, where copying
        from pageable host memory would wait for every queued kernel (a drained pipeline per layer).
        A few bytes per token, kept for the pass."""
        if b not in self._ids_on_device:
            packed, keys = self.packed[b], self.keys[b]
            self._ids_on_device[b] = (packed.position_ids.to(device), PackedBatch(
                keys.input_ids, keys.position_ids.to(device), keys.segment_ids.to(device)))
        return self._ids_on_device[b]

    def record(self, b: int, result: StepResult) -> None:
        self.results[b] = result

    def prompt_indices(self) -> list[int]:
        """The prompts this pass computes, batch by batch."""
        return [i for batch in self.batches for i in batch]

    def prompt_results(self) -> list[tuple[int, StepResult]]:
        """(prompt index, its share of its batch's result), for every prompt of the pass."""
        shares = []
        for batch, result in zip(self.batches, self.results):
            first = 0
            for i in batch:
                n = len(self.rows[i][1])
                shares.append((i, result.suffixes(slice(first, first + n))))
                first += n
        return shares

    def layout(self, b: int, kind: LayerKind, build: Callable[[], tuple]) -> tuple:
        """(mask, position_ids, position_embeddings) of batch b: the same for every layer of a pass,
        so kept while they fit LAYOUT_CACHE_BYTES (rebuilding them per layer cost ~7% of a
        1024-wide layer's time on CPU); beyond that, rebuilt."""
        key = (b, kind)
        if key in self._layouts:
            return self._layouts[key]
        layout = build()
        size = sum(t.numel() * t.element_size() for t in (layout[0], layout[1], *layout[2]))
        if self._layout_bytes + size <= LAYOUT_CACHE_BYTES:
            self._layouts[key] = layout
            self._layout_bytes += size
        return layout


def _rows(prompts: Sequence[TokenizedPrompt], generated: list[list[tuple[int, ...]]], step: int) -> list[Row]:
    """Each prompt's packed row at `step`: its suffixes extended by the ids generated before it (a
    round resumed from a checkpoint holds more: those of the steps it rebuilds the batches of)."""
    return [(p.prefix_ids, tuple(s + g[:step] for s, g in zip(p.suffix_ids, gen)))
            for p, gen in zip(prompts, generated)]


@dataclass(frozen=True)
class _Progress:
    """One run's progress events: after each batch within a shard (a shard of a big model over many
    batches takes minutes, and progress and its ETA should move within it) and at each shard's end.
    The worker throttles what it sends. Per run, never kept on the engine (no reference cycle keeps a
    finished engine's shard slots alive)."""

    report: Callable[[ProgressEvent], None]
    shards: int  # the shards this worker streams per pass
    steps: int
    prompts: int
    stats: LoaderStats
    start: float
    checkpoints: CheckpointStats | None  # what the round's checkpoints keep of its work (None: none taken)

    def within(self, position: int, step: int, tokens: int) -> BatchDone:
        """The callback shard `position` calls after each batch (stage: the shards done before it)."""
        def batch_done(batch: int, batches: int) -> None:
            self.report(self._event(position, step, 0, tokens, batch, batches))
        return batch_done

    def shard_done(self, position: int, step: int, tokens: int) -> None:
        last = position == self.shards - 1
        self.report(self._event(position + 1, step, self.prompts if last else 0, tokens))

    def ended_early(self) -> None:
        """Every sequence ended before the last step: the round is done, as after its last shard."""
        self.report(self._event(self.shards, self.steps - 1, self.prompts, 0))

    def _event(self, stage: int, step: int, prompts_done: int, tokens: int, batch: int = 0,
               batches: int = 0) -> ProgressEvent:
        return ProgressEvent(stage=stage, stages=self.shards, step=step + 1, steps=self.steps,
                             prompts_done=prompts_done, prompts=self.prompts, tokens_done=tokens,
                             bytes_read=self.stats.bytes_read, seconds=time.perf_counter() - self.start,
                             batch=batch, batches=batches, saved_seconds=self._saved(),
                             shards_resumed=self.checkpoints.resumed if self.checkpoints else 0)

    def _saved(self) -> float:
        taken = self.checkpoints.taken_at if self.checkpoints else None
        return taken - self.start if taken is not None else 0.0


class Engine:
    """Streams a layerwise model through one device: `run` is the schedule (per generation step, per
    shard: load, run over every batch, release, report); each kind of shard step's work is its runner's
    (workers/shardrun.py)."""

    def __init__(self, model_dir: str | Path, settings: EngineSettings, score: ScoreSpec,
                 on_progress: Callable[[ProgressEvent], None] | None = None, hooks: EngineHooks | None = None,
                 link: Link | None = None, resident: ResidentShards | None = None):
        self.settings, self.score, self.link = settings, score, link
        self.resident = resident
        self.device = torch.device(settings.device)
        self.dtype = getattr(torch, settings.dtype)
        self.model = LayerwiseModel(model_dir)
        self.adapter = ModelAdapter(model_dir, self.device, self.dtype, allow_untested=settings.allow_untested_models)
        # sized as the loader's slots hold them (data regions, aligned), so head steps fit them exactly
        self.shards = plan_shards(self.model.manifest, settings.layers_per_shard, settings.experts_per_group,
                                  size=lambda name: self.model.part_bytes(name, None))
        index, stages = (link.index, link.count) if link else (LocalLink.index, LocalLink.count)
        self.own_shards = [s for s in self.shards if owner(s.index, stages) == index]
        self.head = owner(self.shards[-1].index, stages)
        self.scores_here = index == self.head
        self.on_progress = on_progress or (lambda event: None)
        self.hooks = hooks or EngineHooks()
        self.peak_device_per_shard: list[int] = []
        self.heap = Heap()
        self.heap.configure()  # intermediates reuse their memory (workers/heap.py)
        self.device_fixed = devicememory.fixed_bytes(self.device)  # the context, beside torch's allocations

    def run(self, prompts: Sequence[TokenizedPrompt]) -> tuple[list[PromptResult], EngineSummary]:
        start = time.perf_counter()
        generation = self._generation(prompts)  # generate: every sequence's ids and state; else None
        steps = generation.steps if generation else self.score.generate_tokens
        generated = [[() for _ in p.suffix_ids] for p in prompts]  # per prompt, per suffix: the ids fed back
        scores: list[list[StepResult]] = [[] for _ in prompts]  # per prompt: its StepResult of each step
        link = self.link or LocalLink(make_store(self.settings.storage, self.device, self.settings.disk_folder))
        cache = self._kv_cache(steps)
        checkpoints = self._checkpoints(prompts, steps, link, cache, generation)
        resume = checkpoints.restore() if checkpoints else ResumePoint()
        if resume.generated is not None:
            generated, scores = resume.generated, resume.scores
        loader = ShardLoader(self.model, self.own_shards, self.device, self.dtype, passes=steps,
                             verify=self.settings.verify_checksums, resident=self.resident,
                             slots=2 if self.settings.double_buffer else 1, gather=True,
                             direct=self.settings.direct_reads, start=(resume.step, resume.position))
        runs = shard_runs(self.own_shards, self._context(link, cache))  # each shard's runner, by its kind
        progress = _Progress(self.on_progress, len(self.own_shards), steps, len(prompts), loader.stats, start,
                             checkpoints.stats if checkpoints else None)
        tokens, current = 0, None
        with torch.inference_mode(), loader, link, cache:
            for step in range(steps):
                if generation and generation.done:
                    progress.ended_early()  # the pass's last event, so the bar ends whole
                    break  # every sequence ended: the loader's read-ahead is dropped on close
                current = self._pass(_rows(prompts, generated, step), current, cache, generation, prompts, step)
                cache.select(current.cache_batches, current.kept_rows)
                if step < resume.step:  # done before the checkpoint: only its batches are rebuilt
                    continue
                if not resume.skips(step, 0):
                    loader.embed_ids(torch.cat([p.input_ids.flatten() for p in current.packed]))  # rows to gather
                for position, (shard, run) in enumerate(zip(self.own_shards, runs)):
                    if resume.skips(step, position):
                        continue
                    loaded = loader.next_shard()  # load weight (prefetched on the loader's thread)
                    # per batch: receive, compute, send (or score), report
                    self._measured(run, loaded, current, progress.within(position, step, current.tokens))
                    loader.release(loaded)  # the compute using it has been issued
                    done = current.tokens if shard.last_step else 0  # a streamed MoE layer: once, at its end
                    tokens += done
                    if checkpoints:  # where nothing of the shard waits on the pass, its state is whole
                        checkpoints.after_shard(step, position, shard.last_step and current.streamed is None
                                                and current.head_steps is None, generated, scores)
                    progress.shard_done(position, step, done)  # after the checkpoint: it says what is saved
                    if self.hooks.after_shard:
                        self.hooks.after_shard(step, shard.index)
                shares = dict(current.prompt_results()) if self.scores_here else {}
                if generation is None:
                    for i, result in shares.items():
                        scores[i].append(result)
                next_ids = link.finish_step(step, self.head, self._next_ids(shares, len(prompts)))
                if next_ids:
                    generated = [[g + (t,) for g, t in zip(gen, ids)] if ids else gen
                                 for gen, ids in zip(generated, next_ids)]
                if generation is not None:
                    for i in current.prompt_indices():
                        share = shares.get(i)
                        generation.advance(i, next_ids[i], share.values.tolist() if share else [0.0] * len(next_ids[i]))
                if checkpoints:
                    checkpoints.after_step(step, generated, scores)
        summary = self._summary(loader.stats, start, tokens, checkpoints, steps)
        if not self.scores_here:
            return [], summary
        if generation is not None:
            results = [PromptResult(p.index, generation.scores(i, self.score.logprobs), ())
                       for i, p in enumerate(prompts)]
        else:
            results = [self._result(p, s, g) for p, s, g in zip(prompts, scores, generated)]
        return results, summary

    def _checkpoints(self, prompts: Sequence[TokenizedPrompt], steps: int, link: Link, cache: KVCache,
                     generation: Generation | None) -> Checkpoints | None:
        """The round's checkpoints (workers/checkpoint.py), a generate round's with its sequences'
        state; none in a pipeline, whose state is spread over its stages, or without a folder for them."""
        if self.link is not None or not self.settings.checkpoint_dir:
            return None
        return Checkpoints(self.settings, prompts, self.own_shards, steps, link.store,
                           cache if cache.enabled else None, generation)

    def _generation(self, prompts: Sequence[TokenizedPrompt]) -> Generation | None:
        """generate: each sequence's state, with the tokenizer's decode where stop strings are looked for."""
        if self.score.kind is not ScoreKind.GENERATE:
            return None
        decode = None
        if any(p.stop for p in prompts):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self.model.path))
            decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        return Generation(prompts, self.score.eos_ids, decode)

    def _summary(self, stats: LoaderStats, start: float, tokens: int, checkpoints: Checkpoints | None,
                 steps: int) -> EngineSummary:
        seconds = time.perf_counter() - start
        taken = checkpoints.stats if checkpoints else None
        return EngineSummary(
            shards_resumed=taken.resumed if taken else 0, shard_steps=steps * len(self.own_shards),
            checkpoints=taken.written if taken else 0, checkpoint_seconds=taken.seconds if taken else 0.0,
            checkpoint_bytes=taken.bytes if taken else 0,
            seconds=seconds, load_seconds=stats.wait_seconds, read_seconds=stats.read_seconds,
            compute_seconds=seconds - stats.wait_seconds, bytes_read=stats.bytes_read, peak_rss=peak_rss(),
            peak_device_memory=max(self.peak_device_per_shard, default=0),
            peak_device_memory_per_shard=tuple(self.peak_device_per_shard), tokens=tokens,
            device_fixed_bytes=self.device_fixed)

    def _context(self, link: Link, cache: KVCache) -> ShardContext:
        """What this run's shard runners share. A streamed MoE layer's batches wait between its steps
        where the activations do."""
        keep_on = self.device if self.settings.storage.on_device else torch.device("cpu")
        return ShardContext(self.model, self.adapter, link, cache, self.score, keep_on, self.hooks.before_batch)

    def _pass(self, rows: list[Row], previous: _Pass | None, cache: KVCache, generation: Generation | None,
              prompts: Sequence[TokenizedPrompt], step: int) -> _Pass:
        """The first step (or every step without a cache): the rows in full; a later step with the
        cache: each suffix's newest token, in the previous step's batches. generate: only the prompts
        with a sequence still running, each drawing (sampling) with its own seed."""
        # a step rebuilt after a resume: the prompts running then (with the state at `step`, `live`)
        live = (lambda i: generation.ran(i, step)) if generation else None  # noqa: E731
        sampling = self.score.sampling
        seeds = None
        if generation and not sampling.greedy:
            seeds = lambda i, j: sequence_seed(sampling.seed, prompts[i].index, j, step)  # noqa: E731
        if previous is not None and cache.enabled:
            return previous.next_step(rows, self.score.kind, live, seeds)
        return _Pass.of_rows(rows, self.settings.batch_tokens, self.score.kind, live, seeds)

    def _kv_cache(self, steps: int) -> KVCache:
        """Keys and values kept between steps in the activations' tier; none for a single step (or a
        kind that appends no token: every step would compute the same rows)."""
        if steps == 1 or not self.settings.kv_cache or not self.score.kind.generates:
            return NoCache()
        return KVCache(make_store(self.settings.storage, self.device, self.settings.disk_folder), steps,
                       self.settings.kv_cache_compression)

    def _next_ids(self, shares: dict[int, StepResult], n_prompts: int) -> tuple[tuple[int, ...], ...] | None:
        """The id each suffix appends for the next step, per prompt (() for a kind that generates
        none, or a prompt not in this step); None where this stage does not score. In a pipeline
        every stage waits for the head's ids in `finish_step`, which also keeps any stage from
        running a step ahead."""
        if not self.scores_here:
            return None
        if not self.score.kind.generates:
            return ()
        return tuple(tuple(int(t) for t in shares[i].next_ids) if i in shares else () for i in range(n_prompts))

    def _measured(self, run: ShardRun, loaded: LoadedShard, current: _Pass, batch_done: BatchDone) -> None:
        """`run` over the pass, with the shard's peak device memory recorded and the heap trimmed."""
        cuda = not on_cpu(self.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        run.run(loaded, current, batch_done)
        self.heap.trim(self.settings.heap_slack)  # RSS stays flat across shards; the next shard's intermediates kept
        if cuda:
            self.peak_device_per_shard.append(self.device_fixed + torch.cuda.max_memory_allocated(self.device))

    def _result(self, prompt: TokenizedPrompt, per_step: list[StepResult], generated) -> PromptResult:
        if not self.score.kind.generates:  # suffix_logprob
            result = per_step[0]
            entry = {"logprob": result.values.numpy().astype(np.float64),
                     "is_greedy": result.is_greedy.numpy().astype(bool),
                     "n_tokens": np.array([len(s) for s in prompt.suffix_ids], dtype=np.int64)}
            return PromptResult(prompt.index, entry, ())
        values = np.stack([r.values.numpy() for r in per_step], axis=1).astype(np.float32)  # (n_suffixes, steps, k)
        return PromptResult(prompt.index, values, tuple(tuple(g) for g in generated))


def score_prompts(model_dir: str | Path, prompts: Sequence[TokenizedPrompt], score: ScoreSpec,
                  settings: EngineSettings, on_progress: Callable[[ProgressEvent], None] | None = None,
                  hooks: EngineHooks | None = None, link: Link | None = None,
                  resident: ResidentShards | None = None) -> tuple[list[PromptResult], EngineSummary]:
    """Scores of `prompts` (one pass over the model per generation step), in their order.

    `link`: None in data mode (a LocalLink over the settings' activation store); a pipeline stage
    streams only its shards and returns results only if it owns the head (the others return none).
    With `resident` (settings.resident), shards read once stay there for the next pass and call."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.resident and resident is None:
        resident = ResidentShards()  # one call: still read once for all its generation steps
    return Engine(model_dir, settings, score, on_progress, hooks, link, resident).run(prompts)
