"""What a model and its prompts cost, before any setting is chosen: the manifest's shapes and sizes
(`_Model`, `_Experts`) and each prompt's load (`_Load`), gathered with the job's facts in `_Job`.

Sizes come from the manifest, converted from the checkpoint dtype to the compute dtype where the
engine converts. A pass streams the model shard by shard: the embedding alone, then
`layers_per_shard` decoder layers at a time, then norm + lm head (flexorch/contract/shards.py).
A shard is layers_per_shard x the largest decoder layer: the edges do not size it. The embedding is
read per pass as the rows of the pass's tokens; a head larger than a decoder shard (a 128k-vocab
70B's is 2.1 GB in fp16, a layer 1.7 GB) comes in steps of vocabulary rows that fit one. Only an edge
that cannot be cut (an embedding or head with more than its one weight) still counts whole.

A MoE model whose layers do not fit whole streams its experts (one layer per shard): the slot
unit is then the largest of a MoE layer's dense part, experts_per_group experts and a dense
layer, and a streamed layer keeps per token its output, its experts' input and k routes between
its steps, with the activations (`_Model.streamed`).

The KV cache (generating) keeps per token and decoder layer what transformers' attention hands its
cache: keys and values of kv_heads x head_dim each, or for MLA (DeepSeek-V3: a config with
kv_lora_rank) one latent of kv_lora_rank beside the rotary key of qk_rope_head_dim
(workers/kvcache.py keeps whatever `update` receives); compressed, the codes and each group's
minimum and step (contract/choices.KVCompression).

A prompt is one packed row. FLOPs per forward: a decoder group 2 x its params per token plus
attention's 4 x row length x hidden per token (one row per prompt; a later generation step computes
one token per suffix against the cached row), the lm head on the scored positions, the embedding a
lookup; a MoE layer's compute counts only the num_experts_per_tok experts a token is routed to.
Round results: the scores of the round's prompts, held in RAM until the round is committed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from flexorch.contract.choices import KVCompression, Storage
from flexorch.contract.protocol import ScoreKind
from flexorch.contract.errors import UserError
from flexorch.contract.manifest import DECODER, DTYPE_BYTES, EMBED, LM_HEAD, NORM, Manifest
from flexorch.contract.shards import gathered, head_row_bytes, head_rows, head_step_rows, owner, shard_bytes
from flexorch.orchestrator.figures import Figures, figures_of
from flexorch.orchestrator.hardware import Hardware
from flexorch.orchestrator.spec import JobSpec

# Batches are sorted by length (engine.make_batches), so padding is small for similar prompts;
# 25% more tokens covers mixed lengths.
PADDING_ALLOWANCE = 1.25

# Stored bytes per weight of the schemes checkpoints ship in (workers/quantized.py): FP8, a byte and a
# float32 scale per 128 x 128 block; MXFP4, half a byte and an E8M0 byte per 32.
SHIPPED_BYTES_PER_WEIGHT = {"fp8": 1 + 4 / 128**2, "mxfp4": 0.5 + 1 / 32}

# When the caller does not pass suffix counts: the multiple-choice case flexorch targets (4 options).
DEFAULT_SUFFIXES_PER_PROMPT = 4

# Bytes kept per suffix and step by suffix_logprob: logprob float64, is_greedy bool, n_tokens int64.
LOGPROB_RESULT_BYTES = 17

# Before the storage is chosen: round activations are counted nowhere (only the batch in flight).
NO_STORAGE = None

# Shard slots: the shard computing and the one prefetching (the double buffer); one where only that
# fits (EngineSettings.double_buffer off: a shard less memory, every read waited for).
DOUBLE_BUFFER, SINGLE_BUFFER = 2, 1


@dataclass(frozen=True)
class _Model:
    """What the planner needs of a manifest, weights in bytes of the compute dtype."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    dtype_bytes: int  # compute dtype
    kv_bytes: int  # keys + values of one token in one decoder layer, compute dtype (the KV cache)
    layer: int  # largest decoder layer, compute dtype
    edge: int  # the larger edge that is read whole (an embedding or head that cannot be cut; else 0), compute dtype
    stored_layer: int  # the same two, as stored in the files (what the slots and staging hold)
    stored_edge: int
    converted: bool  # compute dtype differs from the checkpoint's: the loader makes a converted copy
    bytes_per_pass: int  # bytes read by one pass over the model
    stored_shards: tuple[int, ...]  # as stored: the embedding, each decoder layer, norm + head (plan_shards)
    decoder_params: int
    head_params: int
    total: int  # every shard, compute dtype: a resident model
    moe: _Experts | None = None  # the MoE layers' sizes (None: a dense model)
    experts_per_group: int = 0  # > 0: MoE layers stream their experts this many at a time
    pending_per_token: int = 0  # bytes a streamed MoE layer keeps per token between its steps
    stored_tail: int = 0  # norm + head as stored (a tied head: the embedding's bytes)
    stored_norm: int = 0
    stored_row: int = 0  # one row of the head's weight as stored; 0: the head cannot come in steps
    embed_row: int = 0  # one row of a gathered embedding, compute dtype; 0: read whole
    eager_attention: bool = False  # attention sdpa cannot express (soft-capped logits): scores materialised
    # what a layer's cache keeps per token: kv_heads x (key_dim + value_dim) values (0: kv_bytes only, a
    # hand-sized model)
    kv_heads: int = 0
    key_dim: int = 0
    value_dim: int = 0

    def kv_parts(self, compression: KVCompression) -> tuple[float, ...]:
        """Bytes per token in one layer's cache of each tensor a block is kept as: the keys and
        values; compressed, their codes and their groups' ranges."""
        if compression is KVCompression.NONE or not self.key_dim:
            return (self.kv_bytes,)
        return compression.token_parts(self.kv_heads, self.key_dim, self.value_dim, self.dtype_bytes)

    def kv_token_bytes(self, compression: KVCompression) -> float:
        """Bytes one token's keys and values take in one layer's cache, as kept in its tier."""
        return sum(self.kv_parts(compression))

    def streamed(self, group: int) -> "_Model":
        """This model with its MoE layers run as steps (contract/shards.py): the unit a slot holds is
        the largest of a dense decoder layer, a MoE layer's dense part and `group` experts. Between
        its steps a streamed layer keeps every token's output and experts' input (2 x hidden) and its
        k routes (an int64 id and a float32 weight each)."""
        e = self.moe
        stored = max(e.stored_dense_layer, e.stored_dense_part, group * e.stored_expert)
        return replace(self, experts_per_group=group, stored_layer=stored,
                       layer=math.ceil(stored * self.layer / self.stored_layer),
                       pending_per_token=2 * self.hidden * self.dtype_bytes + e.per_token * (8 + 4))

    def stage_bytes(self, lps: int, stages: int, embed: float | None = None) -> float:
        """Bytes per pass read by the busiest pipeline stage (shard s on stage s % stages); `embed`:
        what the embedding's stage reads of the table (its gathered rows), else all of it."""
        edge_in, *decoders, edge_out = self.stored_shards
        shards = shard_bytes(edge_in if embed is None else embed, decoders, edge_out, lps)
        return max(sum(b for s, b in enumerate(shards) if owner(s, stages) == stage) for stage in range(stages))

    def embed_read(self, tokens: float, resident: bool = False) -> float:
        """Stored bytes of the embedding one pass over `tokens` padded tokens reads: the rows of its
        tokens where it is gathered (at most one per token), else (or resident) the whole table."""
        if resident or not self.embed_row:
            return self.stored_shards[0]
        return self.stored_shards[0] * min(1.0, tokens / self.vocab)

    def head_split(self, lps: int) -> bool:
        """Whether norm + head come in vocabulary steps (contract/shards.py): larger than a decoder shard."""
        return bool(self.stored_row) and self.stored_tail > lps * self.stored_layer

    def head_columns(self, lps: int) -> int:
        """Logit columns of one head call: a step's rows, or the whole vocabulary."""
        if not self.head_split(lps):
            return self.vocab
        return min(self.vocab, head_step_rows(lps * self.stored_layer, self.stored_norm, self.stored_row))

    def shard(self, lps: int) -> int:
        return max(self.edge, lps * self.layer)

    def stored_shard(self, lps: int) -> int:
        return max(self.stored_edge, lps * self.stored_layer)

    def resident_weights(self, lps: int, resident: bool = False, slots: int = DOUBLE_BUFFER) -> int:
        """Device bytes of the shard slots (plus their converted copies); resident: every shard in
        the compute dtype, and the one being read as stored while it is converted."""
        if resident:
            return self.total + (self.stored_shard(1) if self.converted else 0)
        return slots * (self.stored_shard(lps) + (self.shard(lps) if self.converted else 0))


@dataclass(frozen=True)
class _Experts:
    """The sizes of a MoE model's layers, as stored (manifest: experts, expert_bytes)."""

    experts: int  # per MoE layer (the most of any layer)
    per_token: int  # num_experts_per_tok: the experts each token is routed to
    stored_expert: int  # one expert's bytes across its fused tensors
    stored_dense_part: int  # a MoE layer without its experts: attention, router, norms, shared expert
    stored_dense_layer: int  # the largest decoder layer without experts (0: none)


@dataclass(slots=True)  # not frozen: built ~10^6 times on big jobs, and frozen init is 3x slower; never mutated
class _Load:
    """Additive cost of some prompts (one prompt, a round, a slice)."""

    act_tokens: float = 0.0  # padded tokens waiting between shards (the first step's: the most)
    result_bytes: int = 0  # scores held in RAM until the round is committed
    layer_flops: float = 0.0  # every decoder layer together, first generation step
    head_flops: float = 0.0  # the lm head on the scored positions, first step
    later_layer_flops: float = 0.0  # each later generation step (against the KV cache), per step
    later_head_flops: float = 0.0
    cache_tokens: float = 0.0  # padded tokens whose keys and values the KV cache keeps (per layer)
    cache_traffic: float = 0.0  # padded tokens of the cache each later step reads and writes per layer, on average
    scored: float = 0.0  # positions the head scores at the first step
    suffixes: float = 0.0  # a later step's tokens (one per suffix), each also scored
    # the cache's padded tokens per layer at each of the job's cache peaks (`_cache_profile`): rows leave as
    # their limits end, so a round's cache is largest just before some leave; () where not described
    cache_profile: tuple[float, ...] = ()

    def __add__(self, other: "_Load") -> "_Load":
        summed = _Load(*(getattr(self, f) + getattr(other, f) for f in _SUMMED))
        a, b = self.cache_profile, other.cache_profile
        summed.cache_profile = tuple(x + y for x, y in zip(a, b)) if a and b else a or b
        return summed

    @property
    def cache_peak(self) -> float:
        """Padded tokens per layer the KV cache holds at its largest: the largest of the profile's sums,
        else the sum of each prompt's largest (an upper bound)."""
        return max(self.cache_profile) if self.cache_profile else self.cache_tokens

    def flops(self, steps: int) -> float:
        """Over `steps` generation steps."""
        return self.layer_flops + self.head_flops + (steps - 1) * (self.later_layer_flops + self.later_head_flops)


_SUMMED = tuple(f for f in _Load.__dataclass_fields__ if f != "cache_profile")

# Points of a round's KV cache profile: a round's load sums this many numbers per prompt (~10^6 sums on big
# jobs). Beyond as many distinct limits in a job, neighbouring ones are grouped and each prompt counted at
# its largest within the group: an upper bound, exact where the job has at most this many limits.
CACHE_PROFILE_POINTS = 8


@dataclass(frozen=True)
class _Job:
    """The job-wide facts the per-worker decisions read."""

    spec: JobSpec
    model: _Model
    dtype: str
    tokens: tuple[int, ...]  # packed tokens per prompt, first step
    lengths: tuple[int, ...]  # the forward's row length per prompt: the first step's (later ones: the KV cache)
    loads: tuple[_Load, ...]
    scored_ratio: float  # max over prompts of scored positions / tokens (head working memory)
    figures: Figures  # the machine's rates and fixed costs, measured or assumed
    token_flops: float  # one decoder layer's FLOPs per token, first step, over the job's prompts
    token_attention: float  # of those, attention's
    unverified_share: float = 0.0  # of the stored bytes, those hashed on their first read (make_plan)
    direct_reads: bool = False  # layer files read around the page cache (_with_reads)
    generated_steps: int = 0  # generate: the longest max_new_tokens (0: generate_tokens)

    @property
    def steps(self) -> int:
        """Passes over the weights per round at most."""
        return self.generated_steps or self.spec.generate_tokens


@dataclass(frozen=True)
class _Setup:
    """One combination of a worker's settings, as the memory and time models price it (search.py)."""

    device: str
    lps: int
    batch: int
    storage: Storage | None  # NO_STORAGE while the batch is sized, before a storage is chosen
    resident: bool = False  # the whole model kept on the device for the job, read once
    slots: int = DOUBLE_BUFFER  # shard slots when streaming
    kv_compression: KVCompression = KVCompression.NONE  # how the KV cache is kept in its tier

    def __post_init__(self):
        object.__setattr__(self, "storage", self.storage and Storage(self.storage))
        object.__setattr__(self, "kv_compression", KVCompression(self.kv_compression))


def _describe_job(hardware: Hardware, manifest: Manifest, spec: JobSpec, dtype: str, prompt_tokens: Sequence[int],
                  suffix_counts: Sequence[int] | None, scored_counts: Sequence[int] | None = None,
                  unverified_bytes: int = 0, new_tokens: Sequence[int] | None = None) -> _Job:
    """`new_tokens[i]` (score kind generate): prompt i's max_new_tokens: its steps."""
    model = _describe_model(manifest, dtype)
    suffixes = [min(n, DEFAULT_SUFFIXES_PER_PROMPT) for n in prompt_tokens] if suffix_counts is None else suffix_counts
    tokens = tuple(int(n) for n in prompt_tokens)
    lengths = tokens  # the KV cache keeps later steps to one token per suffix: rows never grow
    scored = scored_counts or [n if spec.score.kind is ScoreKind.SUFFIX_LOGPROB else s for n, s in zip(tokens, suffixes)]
    own_steps = list(new_tokens) if new_tokens else [spec.generate_tokens] * len(tokens)
    steps = max(own_steps, default=1)
    loads = tuple(_prompt_load(model, spec, n, s, c, own, steps)
                  for n, s, c, own in zip(tokens, suffixes, scored, own_steps))
    if steps > 1:
        groups = _peak_groups(own_steps, steps)
        loads = tuple(replace(load, cache_profile=_cache_profile(n, s, own, groups))
                      for load, n, s, own in zip(loads, tokens, suffixes, own_steps))
    token_flops = sum(load.layer_flops for load in loads) / max(1, sum(tokens)) / model.num_layers
    return _Job(
        spec=spec, model=model, dtype=dtype, tokens=tokens, lengths=lengths, loads=loads,
        generated_steps=steps if new_tokens else 0,
        scored_ratio=max(c / max(n, 1) for n, c in zip(tokens, scored)),
        figures=figures_of(hardware),
        token_flops=token_flops, token_attention=token_flops - 2.0 * model.decoder_params / model.num_layers,
        unverified_share=min(1.0, unverified_bytes / max(1, sum(e.bytes for e in manifest.layers))),
    )


def _describe_model(manifest: Manifest, dtype: str) -> _Model:
    stored_dtype = DTYPE_BYTES.get(manifest.dtype, DTYPE_BYTES[dtype])
    scale = DTYPE_BYTES[dtype] / stored_dtype
    by_kind = {kind: [e for e in manifest.layers if e.kind == kind] for kind in (EMBED, DECODER)}
    tail = [e for e in manifest.layers if e.kind not in (EMBED, DECODER)]  # norm + lm head: one shard
    stored_layer = max(manifest.stored_bytes(e) for e in by_kind[DECODER])
    stored_tail = sum(manifest.stored_bytes(e) for e in tail)
    split = head_rows(manifest) > 0 and [e.kind for e in tail] == [NORM, LM_HEAD]
    embed_gathered = all(gathered(e) for e in by_kind[EMBED])
    # what the slots still hold whole: only an edge that cannot be cut (contract/shards.py)
    stored_edge = max(0 if embed_gathered else sum(manifest.stored_bytes(e) for e in by_kind[EMBED]),
                      0 if split else stored_tail)
    heads = [manifest.entry(e.tied_to) if e.tied_to else e for e in manifest.layers if e.kind == LM_HEAD]
    config = manifest.config
    # 64 is the smallest common head dim, so hidden // 64 heads overestimates the scores.
    attention_heads = int(config.get("num_attention_heads") or max(1, manifest.hidden_size // 64))
    head_dim = int(config.get("head_dim") or manifest.hidden_size // attention_heads)
    kv_heads = int(config.get("num_key_value_heads") or attention_heads)
    key_dim = value_dim = head_dim
    if config.get("kv_lora_rank"):  # MLA: the cache keeps the latent and the rotary key, one head (transformers 5)
        kv_heads, key_dim, value_dim = 1, int(config["kv_lora_rank"]), int(config.get("qk_rope_head_dim") or 0)
    return _Model(
        num_layers=manifest.num_layers, hidden=manifest.hidden_size,
        intermediate=_intermediate(manifest, config),
        heads=attention_heads, vocab=manifest.vocab_size, dtype_bytes=DTYPE_BYTES[dtype],
        kv_bytes=int(KVCompression.NONE.token_bytes(kv_heads, key_dim, value_dim, DTYPE_BYTES[dtype])),
        kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim,
        # compressed decoder layers are dequantised per shard: a full copy in the compute dtype
        layer=(max(e.params for e in by_kind[DECODER]) * DTYPE_BYTES[dtype] if manifest.compression
               else math.ceil(stored_layer * scale)),
        edge=math.ceil(stored_edge * scale),
        stored_layer=stored_layer, stored_edge=stored_edge,
        converted=manifest.dtype != dtype or manifest.compression is not None,
        bytes_per_pass=sum(manifest.stored_bytes(e) for e in manifest.layers),
        stored_shards=(sum(manifest.stored_bytes(e) for e in by_kind[EMBED]),
                       *(manifest.stored_bytes(e) for e in by_kind[DECODER]),
                       sum(manifest.stored_bytes(e) for e in tail)),
        decoder_params=sum(_active_params(e, config) for e in by_kind[DECODER]),
        head_params=sum(e.params for e in heads), moe=_describe_experts(by_kind[DECODER], config),
        total=math.ceil(sum(manifest.stored_bytes(e) for e in manifest.layers) * scale),
        stored_tail=stored_tail, stored_norm=sum(e.bytes for e in tail if e.kind == NORM),
        stored_row=head_row_bytes(manifest) if split else 0,
        embed_row=manifest.hidden_size * DTYPE_BYTES[dtype] if embed_gathered else 0,
        eager_attention=bool(config.get("attn_logit_softcapping")),
    )


def _intermediate(manifest: Manifest, config: dict) -> int:
    """The widest MLP intermediate a forward holds per token. GPT-style MLPs are 4x hidden (a config
    without the key is assumed to be one). In a MoE layer a token's k routes are k rows of the expert
    width (moe_intermediate_size, or intermediate_size where the experts use it: Mixtral), all alive
    at once in transformers' grouped_mm experts: whichever experts the router picks, a batch's expert
    rows are at most k x its tokens."""
    dense = int(config.get("intermediate_size") or 4 * manifest.hidden_size)
    if not any(entry.experts for entry in manifest.layers):
        return dense
    expert_width = int(config.get("moe_intermediate_size") or dense)
    return max(dense, int(config.get("num_experts_per_tok") or 1) * expert_width)


def _describe_experts(decoders, config: dict) -> _Experts | None:
    moe = [e for e in decoders if e.experts]
    if not moe:
        return None
    return _Experts(experts=max(e.experts for e in moe), per_token=int(config.get("num_experts_per_tok") or 1),
                    stored_expert=max(e.expert_bytes for e in moe),
                    stored_dense_part=max(e.bytes - e.experts * e.expert_bytes for e in moe),
                    stored_dense_layer=max((e.bytes for e in decoders if not e.experts), default=0))


def _active_params(entry, config: dict) -> int:
    """Parameters a token goes through in a decoder layer: in a MoE layer, only the experts its router
    picks (num_experts_per_tok of `experts`), not all of them (Qwen3-30B-A3B: ~3 of 30 B)."""
    if not entry.experts:
        return entry.params
    per_token = config.get("num_experts_per_tok") or entry.experts
    # experts kept quantised as shipped: their stored bytes per weight, not the dtype's
    per_weight = SHIPPED_BYTES_PER_WEIGHT.get(entry.compression) or DTYPE_BYTES.get(entry.dtype, 2)
    expert_params = min(entry.params, int(entry.expert_bytes * entry.experts / per_weight))
    return entry.params - expert_params + expert_params * per_token // entry.experts


def _prompt_load(model: _Model, spec: JobSpec, tokens: int, suffixes: int, scored: int, own_steps: int = 0,
                 steps: int = 0) -> _Load:
    """A prompt is one packed row: every layer's weights see each of its tokens once (2 FLOPs per
    weight), and attention 4 x row length x hidden per token (workers/calibrate.layer_flops, which
    the throughput was measured with). A later generation step computes the newest token of each
    suffix against the cached row, one scored position per suffix.

    A generated prompt leaves the batches after its own `own_steps` of the round's `steps`: its later
    steps' cost is spread over the round's (its expected share of live rows per step), and its cache
    grows by one token per suffix per step of its own (its limit: EOS is not predicted).

    The cache moves between its tier and the device: step 0 writes the row (`tokens`), and each later
    step t of its own reads the row and the t - 1 columns per suffix generated before, and writes
    those and its new one back: over its n steps n x tokens + suffixes x (n - 1)^2 tokens per layer,
    spread over the round's later steps (`cache_traffic`)."""
    steps = steps or spec.generate_tokens
    own_steps = own_steps or steps
    live = (own_steps - 1) / (steps - 1) if steps > 1 else 1.0  # of the later steps, those it is in
    attention = 4.0 * model.num_layers * model.hidden
    keys = tokens + own_steps / 2 * suffixes  # a later step's row, on average over its steps
    cached = tokens + (own_steps - 2) * suffixes if steps > 1 else 0  # the last step's keys are never kept
    moved = (own_steps * tokens + suffixes * (own_steps - 1) ** 2) / (steps - 1) if steps > 1 else 0.0
    return _Load(act_tokens=tokens * PADDING_ALLOWANCE, result_bytes=_result_bytes(model, spec, suffixes, own_steps),
                 layer_flops=2.0 * model.decoder_params * tokens + attention * tokens * tokens,
                 head_flops=2.0 * model.head_params * scored,
                 later_layer_flops=live * (2.0 * model.decoder_params * suffixes + attention * suffixes * keys),
                 later_head_flops=live * 2.0 * model.head_params * suffixes,
                 cache_tokens=max(0, cached) * PADDING_ALLOWANCE, cache_traffic=moved * PADDING_ALLOWANCE,
                 scored=scored, suffixes=suffixes * live)


def _peak_groups(own_steps: Sequence[int], steps: int) -> tuple[tuple[int, int], ...]:
    """The steps at which a round's cache can peak, grouped into at most CACHE_PROFILE_POINTS (first, last)
    ranges. A prompt's cache grows by a column per suffix each step up to its limit, then leaves: the sum
    over prompts grows between the steps where some leave and drops after them, so it peaks at a last
    kept step, own - 2 (the last step's keys are never kept), of one of the limits, or at step 0, where
    every prompt's row is kept."""
    peaks = sorted({0} | {min(own, steps) - 2 for own in own_steps if own >= 2})
    size = math.ceil(len(peaks) / CACHE_PROFILE_POINTS)
    return tuple((peaks[k], peaks[min(k + size, len(peaks)) - 1]) for k in range(0, len(peaks), size))


def _cache_profile(tokens: int, suffixes: int, own_steps: int, groups) -> tuple[float, ...]:
    """A prompt's cache (padded tokens per layer) at its largest within each group of peak steps: its row and
    a column per suffix per step kept, while it runs (to step own - 2; its row alone at step 0)."""
    last = max(own_steps - 2, 0)
    return tuple((tokens + min(end, last) * suffixes) * PADDING_ALLOWANCE if last >= first else 0.0
                 for first, end in groups)


def _result_bytes(model: _Model, spec: JobSpec, suffixes: int, steps: int) -> int:
    kind = spec.score.kind
    if kind is ScoreKind.GENERATE:  # an id and a log-prob per generated token
        return suffixes * steps * 12
    entries = math.prod(kind.entry_shape(suffixes, steps, model.vocab, len(spec.score.tokens)))
    return entries * (4 if kind.generates else LOGPROB_RESULT_BYTES)  # float32 probabilities, or a suffix's record


def _error(spec: JobSpec, key: str, message: str) -> UserError:
    return UserError(f"{spec.path}: {key}: {message}")
