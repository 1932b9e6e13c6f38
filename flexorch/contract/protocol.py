"""What the controller hands a worker and what comes back: plain frozen dataclasses (picklable,
torch-free), so the orchestrator can build them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from flexorch.contract.choices import KVCompression, Storage


class ScoreKind(StrEnum):
    """What is scored, as one type that knows which positions it reads and the shape it writes.

    A StrEnum: members compare equal to their job-file names ("suffix_logprob"). Adding a kind means
    adding a member here, its positions and shape below, its computation in workers/scoring.py and
    its entry in JOBSPEC's output table."""

    NEXT_TOKEN_PROBS = "next_token_probs"
    TOKEN_PROBS = "token_probs"
    SUFFIX_LOGPROB = "suffix_logprob"
    GENERATE = "generate"  # text until EOS, a stop string or a limit, per sequence (prompt, suffix)

    @property
    def generates(self) -> bool:
        """Whether each step yields a next id per suffix (so steps can extend the suffixes)."""
        return self is not ScoreKind.SUFFIX_LOGPROB

    @property
    def has_fields(self) -> bool:
        """Whether a prompt's scores are a dict of named (n_suffixes, ...) arrays, not one array."""
        return self in (ScoreKind.SUFFIX_LOGPROB, ScoreKind.GENERATE)

    def positions(self, prefix_len: int, suffix_lens: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """The scored positions of one packed row (prefix once, then every suffix), as
        (column, suffix number, index of the suffix token it must predict, or -1).

        Next-token kinds read the last token of each suffix (the prefix's last for an empty one);
        suffix_logprob reads the last prefix token and every suffix token but the last, each of
        which predicts the next suffix token."""
        out, start = [], prefix_len
        for number, n in enumerate(suffix_lens):
            if self is ScoreKind.SUFFIX_LOGPROB:
                cols = [prefix_len - 1] + list(range(start, start + n - 1)) if n else []
                out += [(col, number, i) for i, col in enumerate(cols)]
            else:
                out.append((start + n - 1 if n else prefix_len - 1, number, -1))
            start += n
        return out

    def entry_shape(self, n_suffixes: int, steps: int, vocab: int, n_tokens: int) -> tuple[int, ...]:
        """One prompt's output array: (n_suffixes, steps, vocab or len(tokens)); suffix_logprob's
        logprob / is_greedy / n_tokens arrays are each (n_suffixes,), as generate's n_new and stop
        (its ids and logprobs are (n_suffixes, the longest generation))."""
        if self.has_fields:
            return (n_suffixes,)
        return (n_suffixes, steps, vocab if self is ScoreKind.NEXT_TOKEN_PROBS else n_tokens)


class StopReason(StrEnum):
    """Why a generated sequence ended; stored in parts as its position in this order."""

    EOS = "eos"  # the model's end-of-sequence token (kept in the ids, not in the text)
    STOP = "stop"  # a stop string appeared in the decoded text (the text is cut before it)
    LENGTH = "length"  # max_new_tokens reached

    @property
    def code(self) -> int:
        return list(StopReason).index(self)

    @classmethod
    def of_code(cls, code: int) -> "StopReason":
        return list(cls)[code]


@dataclass(frozen=True)
class Sampling:
    """How generate picks each next token. temperature 0: greedy (argmax, ties to the lowest id).

    Each sequence draws from a random stream of its own per step, seeded from (seed, prompt index,
    suffix number, step) (workers/generate.py), so results do not depend on the number of workers,
    the batch layout or a resume."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: the whole vocabulary
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


SCORE_KINDS = tuple(kind.value for kind in ScoreKind)
STORAGES = tuple(storage.value for storage in Storage)
DTYPES = ("float32", "float16", "bfloat16")
# Free heap memory a worker keeps between shards (workers/heap.py: two of its largest blocks, so the
# next shard's intermediates are not faulted in afresh); the planner lowers it where a RAM budget
# leaves less room beside the predicted peak (EngineSettings.heap_slack).
HEAP_SLACK = 64 << 20

# The engine keeps each batch's mask and rotary tables for the whole pass while they fit in this many
# bytes (rebuilding them per layer cost ~7% of a 1024-wide layer's time on CPU); the planner counts it.
LAYOUT_CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class TokenizedPrompt:
    """One prompt as token ids: the prefix (with the tokenizer's special tokens) and its suffixes."""

    index: int  # position in the job's prompt list
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[tuple[int, ...], ...]
    # generate: this prompt's limit and stop strings (the job's defaults resolved by the orchestrator)
    max_new_tokens: int = 0
    stop: tuple[str, ...] = ()

    @property
    def n_tokens(self) -> int:
        """Tokens in the packed sequence (prefix once, then every suffix)."""
        return len(self.prefix_ids) + sum(len(s) for s in self.suffix_ids)


@dataclass(frozen=True)
class ScoreSpec:
    kind: ScoreKind = ScoreKind.NEXT_TOKEN_PROBS
    token_ids: tuple[int, ...] = ()  # token_probs only: the ids whose probabilities are kept
    generate_tokens: int = 1  # greedy steps; each appends the argmax token to every suffix
    # generate: the steps are each prompt's max_new_tokens (TokenizedPrompt), not generate_tokens
    sampling: Sampling = field(default_factory=Sampling)
    eos_ids: tuple[int, ...] = ()  # generate: ids that end a sequence (generation_config, else config)
    logprobs: bool = False  # generate: keep each generated token's log-prob (under the model, before sampling's changes)

    def __post_init__(self):
        object.__setattr__(self, "kind", ScoreKind(self.kind))  # accepts the job file's name


@dataclass(frozen=True)
class EngineSettings:
    """Everything placement-related a worker's engine needs: decided by the planner, never here."""

    device: str  # "cpu" | "cuda:N"
    dtype: str  # one of DTYPES: the compute dtype
    layers_per_shard: int  # decoder layers per shard (embeddings and norm + head are shards of their own)
    storage: Storage  # where activations wait between shards
    batch_tokens: int  # padded tokens per forward pass
    disk_folder: str | None = None  # storage disk: where activation files go
    verify_checksums: bool = True  # hash each layer file while reading it
    threads: int = 0  # CPU threads for torch (0: torch's default); set when workers share the CPU
    experts_per_group: int = 0  # MoE layers: stream experts this many at a time (contract/shards.py); 0: whole layers
    allow_untested_models: bool = False  # the job's allow_untested_models: run a model type outside TESTED_MODEL_TYPES
    resident: bool = False  # keep every shard once read: the model is read once per worker, not once per pass
    kv_cache: bool = True  # generate_tokens > 1: keep keys/values in `storage`, later steps compute new tokens only
    # the cache's keys and values quantised in their tier (workers/kvcache.py): the job's, or the planner's for auto
    kv_cache_compression: KVCompression = KVCompression.NONE
    # two shard slots, the next shard read while one computes; False: one slot, read after the compute
    # (a shard less memory, no read hidden): the planner's choice when only that fits
    double_buffer: bool = True
    heap_slack: int = HEAP_SLACK  # bytes of free heap kept between shards (workers/heap.py)
    # read layer files around the page cache (O_DIRECT) into the slots, but those mostly cached
    # (workers/fileread.py): the planner's choice where caching them would not pay
    direct_reads: bool = False
    # save the round's state (activations, KV cache, scores so far) after every this many shard steps,
    # at the next boundary where it is complete, so a crash loses at most that much work; 0: never
    # (the planner's choice from the job's checkpoint_interval: orchestrator/planner/checkpoints.py)
    checkpoint_shards: int = 0
    checkpoint_dir: str | None = None  # job_dir/checkpoints (contract/checkpoints.py); None: no checkpoints
    checkpoint_key: str = ""  # the job's fingerprint: a checkpoint of another job is ignored

    def __post_init__(self):
        object.__setattr__(self, "storage", Storage(self.storage))  # accepts plan.json's name
        object.__setattr__(self, "kv_cache_compression", KVCompression(self.kv_cache_compression))


@dataclass(frozen=True)
class ProgressEvent:
    """Reported by the engine as it goes; rendered by the controller."""

    stage: int  # shards completed so far in this pass
    stages: int  # shards in one pass over the model
    step: int  # generation step (1-based)
    steps: int
    prompts_done: int  # prompts whose scores are final
    prompts: int
    tokens_done: int  # tokens pushed through the current shard, for tokens/s
    bytes_read: int  # weight bytes read so far
    seconds: float
    batch: int = 0  # batches done of the shard after `stage` (the one computing), for progress within a shard
    batches: int = 0  # batches of the pass (0: reported per shard only)
    # of `seconds`, the work before the round's newest checkpoint of this run: a resubmit resumes after it
    saved_seconds: float = 0.0
    shards_resumed: int = 0  # shard steps a checkpoint spared the round: done, but not computed by this run


@dataclass(frozen=True)
class EngineSummary:
    seconds: float
    load_seconds: float  # time the compute thread waited for weights (not hidden by prefetch)
    read_seconds: float  # time the loader thread spent reading weights (hidden or not)
    compute_seconds: float
    bytes_read: int
    peak_rss: int  # bytes
    # bytes; 0 on CPU. On CUDA, what the process holds of the GPU at its peak: its fixed part (the
    # context, outside torch's allocator: workers/devicememory.py) and torch's peak allocation, which
    # includes cuBLAS's workspaces: the quantity the planner predicts.
    peak_device_memory: int
    peak_device_memory_per_shard: tuple[int, ...] = ()  # CUDA only, each with the fixed part
    device_fixed_bytes: int = 0  # CUDA only: that fixed part
    tokens: int = 0  # tokens computed (all steps, all layers counted once)
    shards_resumed: int = 0  # shard steps a checkpoint spared (resumed after them), of shard_steps
    shard_steps: int = 0  # shard steps of the round (steps x shards of a pass)
    checkpoints: int = 0  # checkpoints written
    checkpoint_seconds: float = 0.0  # time spent writing them
    checkpoint_bytes: int = 0  # bytes written (or linked) for them


@dataclass(frozen=True)
class PromptResult:
    """Scores of one prompt, in the output format of JOBSPEC (numpy arrays)."""

    index: int
    # np.ndarray (n_suffixes, steps, k), {"logprob", "is_greedy", "n_tokens"} arrays, or generate's
    # {"ids": int64 (n, T) padded with -1, "n_new": int64 (n,), "stop": int8 (n,) StopReason codes,
    #  and with score.logprobs "logprobs": float32 (n, T) padded with NaN}
    scores: object
    generated: tuple[tuple[int, ...], ...] = field(default=())  # per suffix: the argmax id of each of the G steps
