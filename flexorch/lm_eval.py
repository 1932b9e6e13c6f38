"""flexorch as an lm-evaluation-harness model: `FlexorchLM`, registered as `flexorch`.

    flexorch eval --model_args pretrained=DIR,devices=0+1 --tasks hellaswag   # or python -m flexorch.lm_eval
    lm_eval.simple_evaluate(model=FlexorchLM(pretrained=DIR), tasks=[...])

lm-eval hands a model every request of a run at once, one call per request type. Each call becomes
one flexorch job, so the model is streamed once per pass whatever the number of requests:

- `loglikelihood`: tokenized exactly as lm-eval's `hf` model (TemplateLM's `_encode_pair`: context
  and continuation encoded together, split after the context's tokens, the context's trailing
  spaces moved to the continuation; left truncation to `max_length`), then handed to flexorch as
  token ids. Requests with the same context tokens become one prompt with several suffixes, so the
  context is computed once per layer.
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of `max_length` tokens, each a prompt.
- `generate_until`: each request a prompt of one generation job (score kind generate): its context
  encoded as lm-eval's hf model's `tok_batch_encode`, its own `until` and `max_gen_toks`.

Each job runs in a folder named by the model, the settings and the requests' content (under
`job_dir=` or $FLEXORCH_CACHE/lm-eval), so running the same evaluation again resumes from the
committed rounds. lm-eval has no way for an installed package to add a model to its `lm_eval`
command, so `python -m flexorch.lm_eval` (and `flexorch eval`) run lm-eval's own command line
with this model registered and `--model flexorch` as the default.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, resolve_max_length

import flexorch
from flexorch.contract.errors import UserError
from flexorch.contract.manifest import MANIFEST_NAME

MODEL_NAME = "flexorch"
JOBS_DIR = "lm-eval"  # under $FLEXORCH_CACHE when model_args give no job_dir
# lm-eval's `hf` model's limit when neither the config nor the tokenizer names one.
DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf model's max_gen_toks when a task gives none
# HF's GenerationConfig draws from the top 50 ids unless told otherwise: sampling requests get the same
_HF_TOP_K = 50
# Shorthands for the job's `limits` in key=value model_args (`ram=8GB`).
_LIMIT_ARGS = ("gpu_memory", "ram")
_PLACEMENT_ARGS = ("devices", "limits", "worker_timeout")

TokenIds = tuple[int, ...]


@dataclass(frozen=True)
class _Pair:
    """One scored continuation: the context's token ids (left-truncated) and the continuation's."""

    context: TokenIds
    continuation: TokenIds


@register_model(MODEL_NAME)
class FlexorchLM(TemplateLM):
    """lm-eval's LM over flexorch: `pretrained` is a layerwise dir or a Hugging Face checkpoint dir.

    devices: as in a job file ("auto", "cpu", 0, [0, 1], or "0+1" / "cpu+cpu" in key=value
    model_args, whose commas split arguments); job_dir: the root of the per-evaluation job folders;
    max_length: the context limit (default: the model's, as lm-eval's hf model resolves it);
    gpu_memory / ram: the job's limits; every other keyword is a job-file key (dtype,
    layers_per_shard, storage, batch_tokens, ...). lm-eval's batch_size, max_batch_size and device
    are ignored: flexorch plans its own batches, and lm-eval's command line sends device=cuda:0
    whether or not it was asked to, so only `devices` says where flexorch runs.
    """

    def __init__(self, pretrained: str, devices="auto", job_dir: str | None = None, max_length: int | None = None,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None, progress: bool = True,
                 allow_remote_code: bool = False, batch_size=None, max_batch_size=None, device: str | None = None,
                 **settings):
        super().__init__()
        from flexorch.orchestrator.prompts import load_tokenizer

        self.pretrained = Path(pretrained).expanduser().absolute()
        if not self.pretrained.is_dir():
            raise UserError(f"model_args: pretrained: {pretrained} is not a model dir")
        self.tokenizer = load_tokenizer(self.pretrained, allow_remote_code)
        self.add_bos_token, self.custom_prefix_token_id = add_bos_token, prefix_token_id
        self._max_length = max_length or _model_max_length(self.pretrained, self.tokenizer)
        self.job_root = Path(job_dir).expanduser().absolute() if job_dir else _default_job_root()
        self.progress = progress
        limits = {key: settings.pop(key) for key in _LIMIT_ARGS if key in settings}
        if limits:
            settings["limits"] = {**settings.get("limits", {}), **limits}
        self.settings = {"devices": _devices(devices), "allow_remote_code": allow_remote_code, **settings}

    # -- what lm-eval asks of a model ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is replaced by: lm-eval's hf model's choice."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.pretrained).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """lm-eval's hf model's encoding: the tokenizer's special tokens unless told otherwise, and
        none when the text already starts with the BOS text."""
        special = {}
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings, context ids, continuation ids), as
        TemplateLM.loglikelihood encodes them; answers (log P, is greedy) in request order."""
        pairs = [self._truncated(tuple(context), tuple(continuation), key) for key, context, continuation in requests]
        answers = self._score(pairs, "loglikelihood")
        for (key, _, _), answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood as lm-eval's hf model computes it: the sum over disjoint
        windows of max_length tokens, the first conditioned on the prefix token."""
        windows = [[_Pair(tuple(context), tuple(continuation)) for context, continuation in map(
            lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))]
            for (text,) in (request.args for request in requests)]
        answers = iter(self._score([pair for text in windows for pair in text], "loglikelihood_rolling"))
        totals = [sum(next(answers)[0] for _ in text) for text in windows]
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation as lm-eval's hf model makes it: the context encoded as its
        tok_batch_encode does and left-truncated to max_length - max_gen_toks, generated until the
        model's EOS, one of `until` (the EOS text added, as lm-eval does) or max_gen_toks tokens, the
        text cut before the first stop string. Every request is one prompt of one flexorch job (one
        per distinct sampling setting: do_sample, temperature, top_p, top_k)."""
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        groups: dict[tuple, list[tuple[int, dict]]] = {}
        for n, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            limit = int(kwargs.pop("max_gen_toks"))
            if limit >= self.max_length:
                raise UserError(f"lm-eval request {n} ({request.task_name}): max_gen_toks {limit} leaves no room "
                                f"for the context within max_length {self.max_length}")
            ids = self._context_ids(context)[-(self.max_length - limit):]
            prompt = {"prefix_ids": ids, "max_new_tokens": limit, "stop": [s for s in until if s]}
            groups.setdefault(_sampling(kwargs), []).append((n, prompt))
        answers: list[str] = [""] * len(requests)
        for sampling, items in groups.items():
            prompts = [prompt for _, prompt in items]
            job_dir = self.job_root / f"generate_until-{self._digest(prompts + [dict(sampling)])}"
            results = flexorch.generate(self.pretrained, prompts, job_dir=job_dir, max_length=self.max_length,
                                        progress=self.progress, **dict(sampling), **self.settings)
            for (n, _), result in zip(items, results):
                answers[n] = result.choice[0]
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("generate_until", request.args, answer)
        return answers

    def _context_ids(self, context: str) -> list[int]:
        """A generation context's ids as lm-eval's hf model's tok_batch_encode makes them (no
        special tokens where the text starts with the BOS text; add_bos_token where given)."""
        special = {}
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        return self.tokenizer(context, **special)["input_ids"]

    def get_model_info(self) -> dict:
        return {"model": MODEL_NAME, "pretrained": str(self.pretrained), "max_length": self.max_length}

    # -- requests → one flexorch job ---------------------------------------------------------------------

    def _truncated(self, context: TokenIds, continuation: TokenIds, key) -> _Pair:
        """lm-eval's hf model feeds the last max_length + 1 tokens of context + continuation (minus
        the last, which predicts nothing): the context loses its first tokens, never the continuation."""
        if not continuation:
            raise UserError(f"lm-eval request {key!r}: the continuation is empty after tokenization: nothing to score")
        if len(continuation) > self.max_length:
            raise UserError(f"lm-eval request {key!r}: the continuation is {len(continuation)} tokens, more than "
                            f"max_length {self.max_length}")
        keep = self.max_length + 1 - len(continuation)
        return _Pair(context[-keep:], continuation)

    def _score(self, pairs: Sequence[_Pair], kind: str) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is greedy) per pair, in order, from one flexorch job."""
        if not pairs:
            return []
        prompts, where = _shared_context_prompts(pairs)
        job_dir = self.job_root / f"{kind}-{self._digest(prompts)}"
        # max_length + 1: each prompt holds the continuation's last token too, which lm-eval's hf
        # model drops from its input; it predicts nothing, so the scored positions are the same.
        results = flexorch.score(self.pretrained, prompts, score="suffix_logprob", job_dir=job_dir,
                                 max_length=self.max_length + 1, progress=self.progress, **self.settings)
        return [(float(results[i].scores["logprob"][j]), bool(results[i].scores["is_greedy"][j])) for i, j in where]

    def _digest(self, prompts: list[dict]) -> str:
        """Names the job folder: the same model, settings and requests resume the same job. Where
        it runs (devices, limits) changes no score, so a run cut short on two GPUs resumes on one."""
        model = self.pretrained / MANIFEST_NAME  # every layer's sha256: re-prepared in place, a new folder
        settings = {key: value for key, value in self.settings.items() if key not in _PLACEMENT_ARGS}
        identity = {"model": str(self.pretrained), "manifest": model.read_text() if model.is_file() else None,
                    "settings": settings, "max_length": self.max_length, "prompts": prompts}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_task(folder: Path, task: str, rows: Sequence[dict], output_type: str, metrics: Sequence[str],
                    **docs: str) -> Path:
    """An lm-eval task over local rows, for offline runs: `rows` as `folder/<task>.jsonl`, and beside
    it the task's YAML (`dataset_path: json`), which `TaskManager(include_path=folder)` or
    `--include_path folder` finds. `docs`: doc_to_text, doc_to_choice, doc_to_target and the like."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": output_type, **docs,
            "metric_list": [{"metric": metric} for metric in metrics]}
    (folder / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def _sampling(kwargs: dict) -> tuple[tuple[str, object], ...]:
    """flexorch.generate's sampling keywords for lm-eval's normalised generation kwargs (greedy
    unless do_sample), as a hashable key."""
    if not kwargs.get("do_sample") or not kwargs.get("temperature", 1.0):
        return (("temperature", 0.0),)
    return (("temperature", float(kwargs.get("temperature", 1.0))), ("top_p", float(kwargs.get("top_p", 1.0))),
            ("top_k", int(kwargs.get("top_k", _HF_TOP_K))))


def _shared_context_prompts(pairs: Sequence[_Pair]) -> tuple[list[dict], list[tuple[int, int]]]:
    """One token-id prompt per distinct context, each distinct continuation of it a suffix; and per
    pair, its (prompt, suffix) position."""
    prompts: dict[TokenIds, dict[TokenIds, int]] = {}
    for pair in pairs:
        suffixes = prompts.setdefault(pair.context, {})
        suffixes.setdefault(pair.continuation, len(suffixes))
    number = {context: i for i, context in enumerate(prompts)}
    where = [(number[p.context], prompts[p.context][p.continuation]) for p in pairs]
    return [{"prefix_ids": list(context), "suffix_ids": [list(s) for s in suffixes]}
            for context, suffixes in prompts.items()], where


def _model_max_length(model_dir: Path, tokenizer) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    return resolve_max_length(config, tokenizer, default=DEFAULT_MAX_LENGTH)


def _devices(value):
    """"0+1" / "cpu+cpu" (key=value model_args split on commas) as a list; anything else as it is."""
    if isinstance(value, str) and "+" in value:
        return [int(d) if d.strip().isdigit() else d.strip() for d in value.split("+")]
    return value


def _default_job_root() -> Path:
    from flexorch.orchestrator.modelstore import default_cache_dir

    return default_cache_dir() / JOBS_DIR


def run_cli(argv: Sequence[str]) -> None:
    """lm-eval's command line with this model registered; `--model flexorch` unless another is
    named. Raises UserError (bad model_args, a refused request)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(argv)
    if not args or args[0] not in ("ls", "validate"):  # lm-eval's other commands pass as they are
        args = args[1:] if args and args[0] == "run" else args
        if not any(a in ("--model", "-M") or a.startswith("--model=") for a in args):
            args = ["--model", MODEL_NAME, *args]
        args = ["run", *args]
    saved, sys.argv = sys.argv, ["flexorch eval", *args]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


def main() -> None:
    try:
        run_cli(sys.argv[1:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
