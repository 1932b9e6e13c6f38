"""The job file (YAML, JOBSPEC.md) read into a validated, frozen `JobSpec`.

Everything wrong with a job file is collected and raised as one `UserError`, one line per problem,
each line naming the file and the key (`job.yaml: unknown key 'layer_per_shard' (did you mean
'layers_per_shard'?)`), so a user fixes them all in one go. `auto` (or null) becomes None here and
is resolved by the planner, with its reason; null on any optional key means "the default".
Relative paths are read from the job file's folder, so a job runs the same from any working dir.

No torch here: `flexorch plan` must stay fast.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from flexorch.contract.errors import UserError
from flexorch.contract.guard import Limits as ReadLimits, parse_guarded
from flexorch.orchestrator.fields import (Problems, check_keys, choice, count, did_you_mean, flag, parse_size,
                                         seconds, show)
from flexorch.orchestrator.hub import absent_message, cached_snapshot, hub_cache_dir, hub_offline, is_hub_id
from flexorch.orchestrator.prompts import updated_prompts_path
from flexorch.contract.choices import DeviceKind, KVCompression, Parallel, Storage, on_cpu
from flexorch.contract.protocol import DTYPES, SCORE_KINDS, STORAGES, ScoreKind
from flexorch.orchestrator.generation import GENERATE_KEYS, GenerateSettings, generate_settings

PARALLEL_MODES = tuple(mode.value for mode in Parallel)
EXECUTORS = ("local", "ray")
# A device on a Ray cluster is named by its node: "node1:cuda:0", "node0:cpu" (nodes as `flexorch
# plan` numbers them: the head first, then by address).
_NODE_DEVICE_RE = re.compile(r"(node\d+):(.+)")
# Why `parallel: pipeline` is refused on a cluster: see docs/design.md ("Several machines").
_PIPELINE_OVER_RAY = ("pipeline stages hand every batch's activations on at every shard boundary, which across "
                      "machines is network traffic several times the model's size per pass; use parallel: data "
                      "(each node reads the weights from its own disk)")
PROMPT_EXTENSIONS = (".jsonl", ".pkl")
OUTPUT_EXTENSIONS = (".pkl", ".jsonl")
# A worker that reports no progress for this long is hung. Generous: one step of a 70B model from a
# slow disk on a small GPU takes minutes, and a false alarm kills hours of work.
DEFAULT_WORKER_TIMEOUT = 1800.0
# The work a crash, Ctrl-C or kill may lose at most: the planner checkpoints a round in progress this
# often (orchestrator/planner/checkpoints.py). Ten minutes: a 70B pass on a small GPU is hours.
DEFAULT_CHECKPOINT_INTERVAL = 600.0
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_REQUIRED = {"model": "the model dir", "prompts": "the prompts file (.jsonl or .pkl)",
             "output": "the output file (.pkl or .jsonl)"}
_TOP_KEYS = ("model", "prompts", "output", "job_dir", "score", "generate_tokens", "devices", "parallel",
             "layers_per_shard", "storage", "disk_folder", "dtype", "batch_tokens", "max_length", "limits",
             "worker_timeout", "allow_remote_code", "executor", "ray_address", "allow_untested_models",
             "checkpoint_interval", "kv_cache_compression")
_SCORE_KEYS = ("kind", "tokens", *GENERATE_KEYS)
_LIMIT_KEYS = ("gpu_memory", "ram")
# Spellings users bring from torch and other tools; only suggested, so each dtype has one spelling.
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                  "bf16": "bfloat16", "torch.float32": "float32", "torch.float16": "float16",
                  "torch.bfloat16": "bfloat16"}

# A job file is a screenful of keys. PyYAML's Python parser takes ~3 s per 100 KB of list items on
# a busy core, so the cap is what a generous job needs (a long score.tokens list), not more.
_YAML_LIMITS = ReadLimits(max_bytes=256 << 10)


@dataclass(frozen=True)
class ScoreSettings:
    kind: ScoreKind = ScoreKind.NEXT_TOKEN_PROBS
    tokens: tuple[str, ...] = ()  # token_probs only: strings of exactly one token each
    generate: GenerateSettings | None = None  # generate only: limits, stop strings, sampling (orchestrator/generation.py)

    def __post_init__(self):
        object.__setattr__(self, "kind", ScoreKind(self.kind))  # accepts the job file's name


@dataclass(frozen=True)
class Limits:
    """Caps the planner must respect, in bytes (None: what the machine has)."""

    gpu_memory: int | None = None  # per device
    ram: int | None = None


@dataclass(frozen=True)
class JobSpec:
    path: Path  # the job file
    model: Path
    prompts: Path
    output: Path
    job_dir: Path
    score: ScoreSettings = ScoreSettings()
    generate_tokens: int = 1
    devices: str | tuple[str, ...] = "auto"  # "auto" or ("cpu", "cuda:1", ...)
    parallel: Parallel = Parallel.DATA
    layers_per_shard: int | None = None  # None: auto
    storage: Storage | None = None  # None: auto
    disk_folder: Path | None = None  # storage disk; None: inside job_dir (decided by the planner)
    dtype: str | None = None  # one of DTYPES; None: the checkpoint's
    batch_tokens: int | None = None  # None: auto
    max_length: int | None = None  # None: the model's limit
    limits: Limits = Limits()
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT  # seconds without progress before a worker is hung
    allow_remote_code: bool = False  # the only way trust_remote_code is ever turned on
    executor: str = "local"  # one of EXECUTORS: worker processes on this machine, or Ray actors on a cluster
    ray_address: str = "auto"  # executor ray: "auto" (RAY_ADDRESS or a cluster running here), host:port, ray://...
    allow_untested_models: bool = False  # run a model type outside contract/models.TESTED_MODEL_TYPES
    checkpoint_interval: float | None = DEFAULT_CHECKPOINT_INTERVAL  # seconds of work a crash may lose; None: off
    # generating: the KV cache's keys and values quantised in their tier; None: auto (the planner
    # compresses only where the cache is what limits the batch)
    kv_cache_compression: KVCompression | None = KVCompression.NONE

    def __post_init__(self):  # accepts the job file's names (the API and tests build specs directly)
        object.__setattr__(self, "parallel", Parallel(self.parallel))
        object.__setattr__(self, "storage", None if self.storage is None else Storage(self.storage))
        compression = self.kv_cache_compression
        object.__setattr__(self, "kv_cache_compression", None if compression is None else KVCompression(compression))

    @property
    def prompts_format(self) -> str:
        """"jsonl" or "pkl": also the format of the `_updated` prompts written after generation."""
        return self.prompts.suffix[1:]

    @property
    def output_format(self) -> str:
        return self.output.suffix[1:]

    def to_dict(self) -> dict:
        """JSON-ready (plan, report.json, the resume fingerprint)."""
        return _jsonable(asdict(self))


def load_job(path: Path) -> JobSpec:
    """Read and validate a job file; raise one UserError listing every problem in it."""
    path = Path(path)
    return job_from_mapping(_read_yaml(path), path)


def job_from_mapping(raw: dict, path: Path, source: str | None = None, base: Path | None = None) -> JobSpec:
    """Validate a job given as the mapping a job file holds (the Python API's keywords).

    `path`: the job file it is (or will be written as); `source`: what errors name (default the
    path); `base`: where relative paths start (default the job file's folder)."""
    problems = Problems(source or str(path))
    base = base or path.absolute().parent
    check_keys(problems, raw, _TOP_KEYS, prefix="")
    for key, what in _REQUIRED.items():
        if raw.get(key) is None:
            problems.add(None, f"missing required key '{key}' ({what})")

    model = _existing_dir(problems, "model", raw.get("model"), base)
    prompts = _prompts_path(problems, raw.get("prompts"), base)
    output = _output_path(problems, raw.get("output"), base)
    job_dir = _job_dir(problems, raw.get("job_dir"), base, output)
    score = _score(problems, raw.get("score"))
    generate_tokens = count(problems, "generate_tokens", raw.get("generate_tokens"), default=1, allow_auto=False)
    if score is not None and score.kind is ScoreKind.SUFFIX_LOGPROB and generate_tokens not in (None, 1):
        problems.add("generate_tokens", f"must be 1 with score.kind suffix_logprob (the log-prob of a given "
                                        f"suffix does not depend on generation), got {generate_tokens}")
    if score is not None and score.kind is ScoreKind.GENERATE and generate_tokens not in (None, 1):
        problems.add("generate_tokens", "is not used with score.kind generate: give score.max_new_tokens "
                                        "(and a prompt's own max_new_tokens)")
    storage = choice(problems, "storage", raw.get("storage"), STORAGES)
    disk_folder = _disk_folder(problems, raw.get("disk_folder"), base, storage)
    if generate_tokens is not None and prompts is not None:
        _check_written_paths(problems, model, prompts, output, job_dir, disk_folder, generate_tokens)
    executor = choice(problems, "executor", raw.get("executor"), EXECUTORS, default="local", auto=False)
    parallel = choice(problems, "parallel", raw.get("parallel"), PARALLEL_MODES, default="data")
    if executor == "ray" and parallel == Parallel.PIPELINE:
        problems.add("parallel", f"pipeline is refused with executor: ray: {_PIPELINE_OVER_RAY}")

    values = dict(
        path=path, model=model, prompts=prompts, output=output, job_dir=job_dir, score=score,
        generate_tokens=generate_tokens,
        devices=_devices(problems, raw.get("devices"), executor),
        parallel=parallel,
        layers_per_shard=count(problems, "layers_per_shard", raw.get("layers_per_shard")),
        storage=storage, disk_folder=disk_folder,
        dtype=choice(problems, "dtype", raw.get("dtype"), DTYPES, aliases=_DTYPE_ALIASES),
        batch_tokens=count(problems, "batch_tokens", raw.get("batch_tokens")),
        max_length=count(problems, "max_length", raw.get("max_length")),
        limits=_limits(problems, raw.get("limits")),
        worker_timeout=seconds(problems, "worker_timeout", raw.get("worker_timeout"), DEFAULT_WORKER_TIMEOUT),
        allow_remote_code=flag(problems, "allow_remote_code", raw.get("allow_remote_code"), default=False),
        executor=executor,
        ray_address=_ray_address(problems, raw.get("ray_address"), executor),
        allow_untested_models=flag(problems, "allow_untested_models", raw.get("allow_untested_models"),
                                    default=False),
        checkpoint_interval=_interval(problems, raw.get("checkpoint_interval", DEFAULT_CHECKPOINT_INTERVAL)),
        kv_cache_compression=_kv_compression(problems, raw.get("kv_cache_compression")),
    )
    problems.raise_if_any()
    return JobSpec(**values)


# -- reading ---------------------------------------------------------------------------------------


class _SafeLoaderNoDuplicates(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when built
    """yaml.safe_load's loader (plain data only, never a Python object), except that a key given
    twice is an error: safe_load silently keeps the last one, and the user's job is not what they
    read."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: job file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a YAML job file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the job file ({exc.strerror})") from None
    data = parse_guarded(text, lambda t: _parse_yaml(t, path), str(path), _YAML_LIMITS)
    if data is None:
        raise UserError(f"{path}: is empty; expected keys model, prompts and output")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys (model: ..., prompts: ..., output: ...) at the "
                        f"top level, got {show(data)}")
    return data


def _parse_yaml(text: str, path: Path):
    try:
        return yaml.load(text, Loader=_SafeLoaderNoDuplicates)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise UserError(f"{path}: {where}invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {exc}") from None


def _path(problems: Problems, key: str, value, base: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.add(key, f"expected a path, got {show(value)}")
        return None
    return base / Path(value).expanduser()


def _where(value: str, path: Path) -> str:
    """The path as written, and where it was looked for when that differs (relative paths)."""
    return repr(value) if Path(value) == path else f"{value!r} ({path})"


def _existing_dir(problems: Problems, key: str, value, base: Path) -> Path | None:
    path = _path(problems, key, value, base)
    if path is None:
        return None
    if not path.exists() and key == "model" and is_hub_id(value):
        # a hub id: its snapshot in the local Hugging Face cache, never downloaded here (orchestrator/hub.py)
        found = cached_snapshot(value)
        if found is None:
            hub = absent_message(value, hub_cache_dir(), hub_offline())
            problems.add(key, f"{_where(value, path)} does not exist; {hub}")
        return found
    if not path.exists():
        problems.add(key, f"{_where(value, path)} does not exist")
    elif not path.is_dir():
        problems.add(key, f"{_where(value, path)} is not a directory (expected a model dir)")
    return path


def _prompts_path(problems: Problems, value, base: Path) -> Path | None:
    path = _path(problems, "prompts", value, base)
    if path is None:
        return None
    if path.suffix not in PROMPT_EXTENSIONS:
        problems.add("prompts", f"{value!r}: expected a .jsonl or .pkl file, got {path.suffix or 'no extension'}")
    elif not path.exists():
        problems.add("prompts", f"{_where(value, path)} does not exist")
    elif not path.is_file():
        problems.add("prompts", f"{_where(value, path)} is not a file")
    return path


def _output_path(problems: Problems, value, base: Path) -> Path | None:
    path = _path(problems, "output", value, base)
    if path is None:
        return None
    # A missing output folder is fine (created when the job completes); a file in its place is not.
    if path.suffix not in OUTPUT_EXTENSIONS:
        problems.add("output", f"{value!r}: expected a .pkl or .jsonl file, got {path.suffix or 'no extension'}")
    elif path.is_dir():
        problems.add("output", f"{_where(value, path)} is a directory, expected a file name")
    elif path.parent.exists() and not path.parent.is_dir():
        problems.add("output", f"{_where(value, path)}: {path.parent} is a file, not a folder")
    return path


def _job_dir(problems: Problems, value, base: Path, output: Path | None) -> Path | None:
    if value is None:
        return output.with_suffix(".job") if output is not None else None
    path = _path(problems, "job_dir", value, base)
    if path is not None and path.exists() and not path.is_dir():
        problems.add("job_dir", f"{_where(value, path)} is a file, expected a folder")
    return path


def _disk_folder(problems: Problems, value, base: Path, storage: str | None) -> Path | None:
    path = _path(problems, "disk_folder", value, base)
    if path is None:
        return None
    # Allowed with storage auto as well: the planner may choose disk, and then uses this folder.
    if storage not in (None, Storage.DISK):
        problems.add("disk_folder", f"is only used with storage: disk (storage is {storage})")
    elif path.exists() and not path.is_dir():
        problems.add("disk_folder", f"{_where(value, path)} is a file, expected a folder")
    return path


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: the existence checks report it
        return path.absolute()


def _same_file(a: Path, b: Path) -> bool:
    """The same file by resolved path (`sub/../x`, symlinks) or by inode (hard links)."""
    if _resolved(a) == _resolved(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_written_paths(problems: Problems, model: Path | None, prompts: Path, output: Path | None,
                         job_dir: Path | None, disk_folder: Path | None, generate_tokens: int) -> None:
    """Every path the job writes must leave the user's inputs alone: none is the prompts file, none
    lies in the model dir (compared resolved, so `sub/../prompts.jsonl` and symlinks are caught)."""
    written = {"output": output, "job_dir": job_dir, "disk_folder": disk_folder}
    if output is not None and generate_tokens > 1:
        written["output (its _updated prompts)"] = updated_prompts_path(output, prompts.suffix)
    for key, path in written.items():
        if path is None:
            continue
        if key.startswith("output") and _same_file(path, prompts):  # folders: their own checks say "a file"
            problems.add(key, f"is the prompts file {prompts} (as {path}): it would be overwritten")
        elif model is not None and _resolved(path).is_relative_to(_resolved(model)):
            problems.add(key, f"{path} lies inside the model dir {model}: a job never writes into its model")
        elif (blocked := _unwritable(path)) is not None:
            problems.add(key, f"{path}: cannot write in {blocked} (read-only or no permission)")


def _unwritable(path: Path) -> Path | None:
    """The nearest existing folder at or above where `path` goes, if we cannot write in it: found
    before the run rather than as an OSError after hours of work."""
    folder = path.parent if not path.is_dir() else path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return None if os.access(folder, os.W_OK | os.X_OK) else folder


def _interval(problems: Problems, value) -> float | None:
    """checkpoint_interval: seconds, or a number with a unit (90s, 10m, 1h); 0 or off: no checkpoints
    (YAML reads a bare `off` as false)."""
    if value is False or value == 0 or (isinstance(value, str) and value.strip().lower() in ("off", "0")):
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)\s*", value.lower())
        if match is None:
            problems.add("checkpoint_interval", f"expected a duration such as 10m, 90s or 1h, or off, got {show(value)}")
            return None
        value = float(match[1]) * _DURATION_UNITS[match[2]]
    return seconds(problems, "checkpoint_interval", value, DEFAULT_CHECKPOINT_INTERVAL)


def _kv_compression(problems: Problems, value) -> KVCompression | None:
    """none (the default) | int8 | int4 | auto (None: the planner's). A job of one step keeps no KV cache
    and ignores it rather than refusing it: lm-eval's model_args go to every request type's job alike."""
    found = choice(problems, "kv_cache_compression", value, (*KVCompression, "auto"), default="none", auto=False)
    return None if found in (None, "auto") else KVCompression(found)


def _score(problems: Problems, value) -> ScoreSettings | None:
    if value is None:
        return ScoreSettings()
    if isinstance(value, str):  # `score: suffix_logprob`, the kind alone (the API's score="...")
        value = {"kind": value}
    if not isinstance(value, dict):
        problems.add("score", f"expected a kind or a mapping (kind: ..., tokens: [...]), got {show(value)}")
        return None
    check_keys(problems, value, _SCORE_KEYS, prefix="score.")
    kind = choice(problems, "score.kind", value.get("kind"), SCORE_KINDS, default="next_token_probs", auto=False)
    tokens = _tokens(problems, value.get("tokens"))
    if kind == ScoreKind.TOKEN_PROBS and tokens == ():
        problems.add("score.tokens", "is required with score.kind token_probs: a list of strings, "
                                     "each exactly one token (e.g. [\" A\", \" B\"])")
    elif kind is not None and kind != ScoreKind.TOKEN_PROBS and tokens:
        problems.add("score.tokens", f"is only used with score.kind token_probs (kind is {kind})")
    generate = None
    if kind == ScoreKind.GENERATE:
        generate = generate_settings(problems, value)
        if generate is None:
            return None
    elif kind is not None:
        for key in GENERATE_KEYS:
            if key in value:
                problems.add(f"score.{key}", f"is only used with score.kind generate (kind is {kind})")
    if kind is None or tokens is None:
        return None
    return ScoreSettings(kind=kind, tokens=tokens, generate=generate)


def _tokens(problems: Problems, value) -> tuple[str, ...] | None:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.add("score.tokens", f"expected a list of strings, got {show(value)}")
        return None
    bad = [f"item {i}: {show(item)}" for i, item in enumerate(value) if not isinstance(item, str) or not item]
    if bad:
        # Unquoted yes/no/true/1 are read by YAML as booleans and numbers.
        problems.add("score.tokens", f"expected non-empty strings (quote them: \" A\"), got {'; '.join(bad)}")
        return None
    return tuple(value)


def _devices(problems: Problems, value, executor: str | None) -> str | tuple[str, ...] | None:
    """"auto", or device strings from cpu | 0 | cuda | cuda:N or a list of them; with executor ray,
    each prefixed by its node (node0:cpu, node1:cuda:0)."""
    if value is None or value == "auto":
        return "auto"
    items = value if isinstance(value, list) else [value]
    if not items:
        problems.add("devices", "expected auto, cpu, a GPU index or a list of them, got an empty list")
        return None
    devices = [_placed_device(problems, item, executor) for item in items]
    # Several CPU workers share the machine's cores (useful for tests); a GPU runs one worker.
    repeated = sorted({d for d in devices if d is not None and not on_cpu(d) and devices.count(d) > 1})
    if repeated:
        problems.add("devices", f"{', '.join(repeated)} listed more than once (one worker per GPU)")
    if None in devices or repeated:
        return None
    return tuple(devices)


def _placed_device(problems: Problems, item, executor: str | None) -> str | None:
    """One devices entry: a device, on a Ray cluster prefixed by its node."""
    node, rest = None, item
    if isinstance(item, str) and (match := _NODE_DEVICE_RE.fullmatch(item.strip().lower())):
        node, rest = match[1], match[2]
    device = _device(rest)
    if device is None:
        hint = did_you_mean(rest.strip().lower(), ("cpu", "cuda", "auto")) if isinstance(rest, str) else ""
        problems.add("devices", f"{show(item)} is not a device: expected cpu, a GPU index (0, 1, ...), "
                                f"cuda or cuda:N{hint}")
        return None
    if executor == "ray" and node is None:
        problems.add("devices", f"{show(item)}: with executor: ray name the node too, e.g. node0:{device} "
                                "(`flexorch plan` lists the nodes), or use devices: auto")
        return None
    if executor == "local" and node is not None:
        problems.add("devices", f"{show(item)} names a node: only with executor: ray")
        return None
    return f"{node}:{device}" if node else device


def _device(item) -> str | None:
    if isinstance(item, int) and not isinstance(item, bool):
        return f"cuda:{item}" if item >= 0 else None
    if not isinstance(item, str):
        return None
    text = item.strip().lower()
    if text == DeviceKind.CPU:
        return DeviceKind.CPU.value
    if text == DeviceKind.CUDA:
        return "cuda:0"
    match = re.fullmatch(r"(?:cuda:)?(\d+)", text)
    return f"cuda:{int(match[1])}" if match else None


def _ray_address(problems: Problems, value, executor: str | None) -> str | None:
    """"auto" (ray.init's: RAY_ADDRESS, else a cluster started on this machine), host:port or ray://host:port."""
    if value is None:
        return "auto"
    if executor == "local":
        problems.add("ray_address", "is only used with executor: ray")
        return None
    if isinstance(value, str) and (value == "auto" or re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", value)):
        return value
    problems.add("ray_address", f"expected auto, host:port or ray://host:port, got {show(value)}")
    return None


def _limits(problems: Problems, value) -> Limits | None:
    if value is None:
        return Limits()
    if not isinstance(value, dict):
        problems.add("limits", f"expected a mapping (gpu_memory: 6GB, ram: 8GB), got {show(value)}")
        return None
    check_keys(problems, value, _LIMIT_KEYS, prefix="limits.")
    sizes, valid = {}, True
    for key in _LIMIT_KEYS:
        raw = value.get(key)
        if raw is None or raw == "auto":
            sizes[key] = None
            continue
        try:
            sizes[key] = parse_size(raw)
        except ValueError as exc:
            problems.add(f"limits.{key}", f"{exc}, got {show(raw)}")
            valid = False
    return Limits(**sizes) if valid else None


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value
