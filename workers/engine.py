"""The per-device engine: stream a layerwise model through one device over a list of prompts.

Loop order is shard-major: a shard (a few decoder layers, or the embeddings, or norm + lm head)
is loaded once per pass and every batch of prompts goes through it before the next shard comes;
activations wait in an ActivationStore. Each prompt is one packed row — its prefix once, then
every suffix with positions restarting after the prefix and a mask that keeps suffixes apart — so
the prefix is computed once per layer, not once per suffix. With several generation steps the
first step keeps every layer's keys and values (workers/kvcache.py) and each later step computes
only the newest token of every suffix against them.

Where a batch's input comes from and its output goes is the `Link` (workers/link.py): in data mode
the one-stage `LocalLink` over the activation store; in pipeline mode (workers/pipeline.py) the
same loop runs on every stage over the same prompts and settings — so every stage builds the same
batches — but streams only the shards the stage owns, receiving from the previous stage and
sending to the next, and only the stage owning the head computes scores.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from flexorch.workers import devicememory
from flexorch.workers.activations import make_store
from flexorch.workers.adapter import LayerKind, ModelAdapter, PackedBatch, additive_mask, attention_allowed, pack_rows
from flexorch.workers.kvcache import KVCache, NoCache, append_columns, pack_new_tokens
from flexorch.workers.layerfile import LayerwiseModel
from flexorch.contract.manifest import DECODER, EMBED, LM_HEAD, NORM
from flexorch.contract.shards import DENSE_PART, owner, plan_shards
from flexorch.workers.experts import StreamedExperts
from flexorch.workers.heap import Heap
from flexorch.workers.link import Link, LocalLink
from flexorch.workers.prefetch import LoadedShard, ResidentShards, ShardLoader
from flexorch.contract.protocol import LAYOUT_CACHE_BYTES, EngineSettings, EngineSummary, ProgressEvent, PromptResult, ScoreSpec, TokenizedPrompt
from flexorch.workers.scoring import BatchScores, StepScores, compute_scores, score_targets, scored_positions

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

    def __init__(self, rows: list[Row], batches: list[list[int]], kind: str, cached: list[PackedBatch] | None = None):
        self.rows, self.batches = rows, batches
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
        self.tokens = sum(p.input_ids.numel() for p in self.packed)
        self._layouts: dict[tuple[int, LayerKind], tuple] = {}  # (batch, layer kind) → cached layout
        self._layout_bytes = 0
        self._ids_on_device: dict[int, tuple[torch.Tensor, PackedBatch]] = {}

    @classmethod
    def of_rows(cls, rows: list[Row], batch_tokens: int, kind: str) -> "_Pass":
        """The rows computed in full, batched within `batch_tokens`."""
        return cls(rows, make_batches(rows, batch_tokens), kind)

    def next_step(self, rows: list[Row], kind: str) -> "_Pass":
        """The next generation step against the KV cache: the same batches (the cache is kept per
        batch), each suffix one token longer in `rows`."""
        return _Pass(rows, self.batches, kind, cached=self.keys)

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


class Engine:
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
        self.vocab_size = self.adapter.config.vocab_size
        self.peak_device_per_shard: list[int] = []
        # A streamed MoE layer between its steps, and where its batches wait: with the activations.
        self._streamed: StreamedExperts | None = None
        self._keep_on = self.device if settings.storage == "gpu" else torch.device("cpu")
        self._head_steps: list[StepScores] | None = None  # a head in vocabulary steps: per batch, between them
        self.heap = Heap()
        self.heap.configure()  # intermediates reuse their memory (workers/heap.py)
        self.device_fixed = devicememory.fixed_bytes(self.device)  # the context, beside torch's allocations

    def run(self, prompts: Sequence[TokenizedPrompt]) -> tuple[list[PromptResult], EngineSummary]:
        start = time.perf_counter()
        steps = self.score.generate_tokens
        generated = [[() for _ in p.suffix_ids] for p in prompts]  # per prompt, per suffix
        scores = [[] for _ in prompts]  # per prompt: one BatchScores slice per step
        link = self.link or LocalLink(make_store(self.settings.storage, self.device, self.settings.disk_folder))
        cache = self._kv_cache(steps)
        loader = ShardLoader(self.model, self.own_shards, self.device, self.dtype, passes=steps,
                             verify=self.settings.verify_checksums, resident=self.resident,
                             slots=2 if self.settings.double_buffer else 1, gather=True,
                             direct=self.settings.direct_reads)
        tokens, current = 0, None
        with torch.inference_mode(), loader, link, cache:
            for step in range(steps):
                rows = [(p.prefix_ids, tuple(s + g for s, g in zip(p.suffix_ids, gen)))
                        for p, gen in zip(prompts, generated)]
                current = self._pass(rows, current, cache)  # the step's batches, their layout and targets
                loader.embed_ids(torch.cat([p.input_ids.flatten() for p in current.packed]))  # rows to gather
                for position, shard in enumerate(self.own_shards):
                    loaded = loader.next_shard()  # load weight (prefetched on the loader's thread)
                    # per batch: receive, compute, send (or score), report
                    batch_done = self._progress_within(position, step, steps, len(prompts), current.tokens, loader,
                                                       start)
                    self._run_shard(loaded, current, link, cache, scores, batch_done)
                    loader.release(loaded)  # the compute using it has been issued
                    done = current.tokens if shard.last_step else 0  # a streamed MoE layer: once, at its end
                    tokens += done
                    last = position == len(self.own_shards) - 1
                    self.on_progress(ProgressEvent(
                        stage=position + 1, stages=len(self.own_shards), step=step + 1, steps=steps,
                        prompts_done=len(prompts) if last else 0,
                        prompts=len(prompts), tokens_done=done,
                        bytes_read=loader.stats.bytes_read, seconds=time.perf_counter() - start))
                    if self.hooks.after_shard:
                        self.hooks.after_shard(step, shard.index)
                next_ids = link.finish_step(step, self.head, self._next_ids(scores))
                if next_ids:
                    generated = [[g + (t,) for g, t in zip(gen, ids)] for gen, ids in zip(generated, next_ids)]
        results = [self._result(p, s, g) for p, s, g in zip(prompts, scores, generated)] if self.scores_here else []
        seconds = time.perf_counter() - start
        stats = loader.stats
        summary = EngineSummary(
            seconds=seconds, load_seconds=stats.wait_seconds, read_seconds=stats.read_seconds,
            compute_seconds=seconds - stats.wait_seconds, bytes_read=stats.bytes_read, peak_rss=peak_rss(),
            peak_device_memory=max(self.peak_device_per_shard, default=0),
            peak_device_memory_per_shard=tuple(self.peak_device_per_shard), tokens=tokens,
            device_fixed_bytes=self.device_fixed)
        return results, summary

    def _progress_within(self, position: int, step: int, steps: int, prompts: int, tokens: int,
                         loader: ShardLoader, start: float) -> Callable[[int, int], None]:
        """The callback a shard calls after each batch: a shard of a big model over many batches takes
        minutes, and progress (and its ETA) should move within it. The worker throttles what it sends.
        Passed down, never kept on the engine: a closure over `self` stored on it is a reference cycle
        that would keep the engine's shard slots alive after `run` until the garbage collector ran."""
        def batch_done(batch: int, batches: int) -> None:
            self.on_progress(ProgressEvent(
                stage=position, stages=len(self.own_shards), step=step + 1, steps=steps, prompts_done=0,
                prompts=prompts, tokens_done=tokens, bytes_read=loader.stats.bytes_read,
                seconds=time.perf_counter() - start, batch=batch, batches=batches))
        return batch_done

    def _pass(self, rows: list[Row], previous: _Pass | None, cache: KVCache) -> _Pass:
        """The first step (or every step without a cache): the rows in full; a later step with the
        cache: each suffix's newest token, in the previous step's batches."""
        if previous is not None and cache.enabled:
            return previous.next_step(rows, self.score.kind)
        return _Pass.of_rows(rows, self.settings.batch_tokens, self.score.kind)

    def _kv_cache(self, steps: int) -> KVCache:
        """Keys and values kept between steps in the activations' tier; none for a single step (or a
        kind that appends no token: every step would compute the same rows)."""
        if steps == 1 or not self.settings.kv_cache or not self.score.kind.generates:
            return NoCache()
        return KVCache(make_store(self.settings.storage, self.device, self.settings.disk_folder), steps)

    def _next_ids(self, scores) -> tuple[tuple[int, ...], ...] | None:
        """The argmax id each suffix appends for the next step, per prompt (() for a kind that
        generates none); None where this stage does not score. In a pipeline every stage waits for
        the head's ids in `finish_step`, which also keeps any stage from running a step ahead."""
        if not self.scores_here:
            return None
        if not self.score.kind.generates:
            return ()
        return tuple(tuple(int(t) for t in prompt_scores[-1][1]) for prompt_scores in scores)

    def _run_shard(self, loaded: LoadedShard, current: _Pass, link: Link, cache: KVCache, scores,
                   batch_done: Callable[[int, int], None]) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        if loaded.shard.rows is not None:
            self._run_head_step(loaded, current, link, scores, batch_done)
        elif loaded.shard.experts is None:
            self._run_layers(loaded, current, link, cache, scores, batch_done)
        elif loaded.shard.experts == DENSE_PART:
            self._run_dense_part(loaded, current, link, cache)
        else:
            self._run_expert_group(loaded, link, len(current.packed))
        self.heap.trim(self.settings.heap_slack)  # RSS stays flat across shards; the next shard's intermediates kept
        if cuda:
            self.peak_device_per_shard.append(self.device_fixed + torch.cuda.max_memory_allocated(self.device))

    def _run_layers(self, loaded: LoadedShard, current: _Pass, link: Link, cache: KVCache, scores,
                    batch_done: Callable[[int, int], None]) -> None:
        """Whole layers: per batch, receive, compute, send (or score)."""
        modules = []
        for name in loaded.shard.names:
            entry = self.model.entry(name)
            module = self.adapter.module(entry.kind, entry.index)
            if loaded.embed_ids is not None:  # the rows of the pass's tokens
                self.adapter.assign_rows(module, loaded.tensors[name]["weight"])
            else:
                self.adapter.assign(module, loaded.tensors[name])
            modules.append((entry, module))
        kinds = {entry.kind for entry, _ in modules}
        layer_indices = [entry.index for entry, _ in modules if entry.kind == DECODER]
        for b, packed in enumerate(current.packed):
            if self.hooks.before_batch:
                self.hooks.before_batch(loaded.step, loaded.shard.index, b)
            if EMBED in kinds:
                ids = packed.input_ids
                if loaded.embed_ids is not None:  # vocabulary id → its row among the gathered ones
                    ids = torch.searchsorted(loaded.embed_ids, ids)
                hidden = self.adapter.embed(ids.to(self.device))
            else:
                hidden = link.receive(loaded.step, loaded.shard.index, b).to(self.device)
                if b + 1 < len(current.packed):
                    link.prefetch(loaded.step, loaded.shard.index, b + 1)
            if layer_indices:
                if b + 1 < len(current.packed):
                    cache.prefetch(loaded.step, layer_indices, b + 1)
                hidden = self._decoder_layers(layer_indices, hidden, current, b, cache, loaded.step)
            if LM_HEAD in kinds:
                self._score_batch(hidden, current, b, scores)
            else:
                link.send(loaded.step, loaded.shard.index + 1, b, hidden)
            del hidden
            if b + 1 < len(current.packed):  # the shard's end is reported by the loop
                batch_done(b + 1, len(current.packed))
        for _, module in modules:
            self.adapter.release(module)

    def _run_dense_part(self, loaded: LoadedShard, current: _Pass, link: Link, cache: KVCache) -> None:
        """A streamed MoE layer's first step (workers/experts.py): attention and router over every
        batch; the outputs wait, without the experts' share, for the groups of experts."""
        entry = self.model.entry(loaded.shard.names[0])
        layer = self.adapter.module(DECODER, entry.index)
        self._streamed = StreamedExperts(layer, entry.expert_tensors, self._keep_on)
        self.adapter.assign(layer, loaded.tensors[entry.name])  # the layer's tensors but the experts'
        for b in range(len(current.packed)):
            hidden = self._receive(loaded, current, link, b)
            self._streamed.keep(self._decoder_layers([entry.index], hidden, current, b, cache, loaded.step))
        self.adapter.release(layer)

    def _receive(self, loaded: LoadedShard, current: _Pass, link: Link, b: int) -> torch.Tensor:
        """Batch b's input to this shard from the link, on the device (the next batch's prefetched),
        after the before_batch hook."""
        if self.hooks.before_batch:
            self.hooks.before_batch(loaded.step, loaded.shard.index, b)
        hidden = link.receive(loaded.step, loaded.shard.index, b).to(self.device)
        if b + 1 < len(current.packed):
            link.prefetch(loaded.step, loaded.shard.index, b + 1)
        return hidden

    def _run_expert_group(self, loaded: LoadedShard, link: Link, batches: int) -> None:
        """One group of a streamed MoE layer's experts over every batch; after the last, the layer's
        outputs go on."""
        shard = loaded.shard
        first, end = shard.experts
        self._streamed.add_group(first, end, loaded.tensors[shard.names[0]], self.device)
        if shard.last_step:
            for b in range(batches):
                link.send(loaded.step, shard.index + 1, b, self._streamed.output(b))
            self._streamed.restore()
            self._streamed = None

    def _run_head_step(self, loaded: LoadedShard, current: _Pass, link: Link, scores,
                       batch_done: Callable[[int, int], None]) -> None:
        """One step of a head in vocabulary rows (contract/shards.py). The first (which holds the norm)
        receives every batch and keeps its scored positions' final-norm outputs; every step adds its
        rows' logits to each batch's running scores; after the last they are recorded."""
        shard, (first, end) = loaded.shard, loaded.shard.rows
        if first == 0:
            norm = self.adapter.module(NORM)
            self.adapter.assign(norm, loaded.tensors[shard.names[0]])
            self._head_steps = []
            for b in range(len(current.packed)):
                hidden = self._receive(loaded, current, link, b)
                normed = self.adapter.final_norm(scored_positions(hidden, current.targets[b]))
                self._head_steps.append(StepScores(normed, current.targets[b], self.score))
                del hidden
            self.adapter.release(norm)
        head = self.adapter.module(LM_HEAD)
        self.adapter.assign_rows(head, loaded.tensors[shard.names[-1]]["weight"])
        for b, running in enumerate(self._head_steps):
            running.add(first, end, self.adapter.head_logits)
            if b + 1 < len(self._head_steps):  # the step's end is reported by the loop
                batch_done(b + 1, len(self._head_steps))
        self.adapter.release(head)
        if shard.last_step:
            for b, running in enumerate(self._head_steps):
                self._record(b, running.finish(), current, scores)
            self._head_steps = None

    def _decoder_layers(self, indices: list[int], hidden: torch.Tensor, current: _Pass, b: int,
                        cache: KVCache, step: int) -> torch.Tensor:
        """hidden: (rows, Q, d_model) of batch b at `step` through decoder layers `indices`, each
        with its keys and values of the earlier steps from `cache`."""
        packed = current.packed[b]

        def build(kind: LayerKind) -> tuple:
            position_ids, layout = current.ids_on_device(b, self.device)
            mask = additive_mask(attention_allowed(layout, kind.window, queries=packed.shape[1]), self.dtype)
            return mask, position_ids, self.adapter.position_embeddings(hidden, position_ids, kind)

        for i in indices:
            kind = self.adapter.layer_kinds[i]
            mask, position_ids, position_embeddings = current.layout(b, kind, lambda: build(kind))
            hidden = self.adapter.decoder_layer(i, hidden, mask, position_ids, position_embeddings,
                                                cache.layer(step, i, b))
        return hidden

    def _score_batch(self, hidden: torch.Tensor, current: _Pass, b: int, scores) -> None:
        self._record(b, compute_scores(hidden, current.targets[b], self.adapter.logits, self.score, self.vocab_size),
                     current, scores)

    def _record(self, b: int, batch_scores: BatchScores, current: _Pass, scores) -> None:
        """Batch b's scores into `scores`, per prompt."""
        first = 0
        for i in current.batches[b]:
            n = len(current.rows[i][1])
            part = slice(first, first + n)
            flags = batch_scores.next_ids if self.score.kind.generates else batch_scores.is_greedy
            scores[i].append((batch_scores.values[part], flags[part]))
            first += n

    def _result(self, prompt: TokenizedPrompt, per_step: list, generated) -> PromptResult:
        if not self.score.kind.generates:  # suffix_logprob
            logprob, is_greedy = per_step[0]
            entry = {"logprob": logprob.numpy().astype(np.float64), "is_greedy": is_greedy.numpy().astype(bool),
                     "n_tokens": np.array([len(s) for s in prompt.suffix_ids], dtype=np.int64)}
            return PromptResult(prompt.index, entry, ())
        values = np.stack([v.numpy() for v, _ in per_step], axis=1).astype(np.float32)  # (n_suffixes, steps, k)
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
