"""Prompts: read from .jsonl or the seed's .pkl, tokenized into `TokenizedPrompt`s, and written back
extended by generated text (`<output>_updated.pkl` / `.jsonl`).

A prompts pickle's opcodes are scanned before it is loaded, and it is loaded by an unpickler that
refuses every global: it can build lists, tuples, dicts, strings and numbers and nothing else, so a
pickle naming a function (os.system, eval, a class whose __reduce__ runs code) is refused before
anything in it runs.

Errors are `UserError`s naming the file and the line (.jsonl) or the prompt index (0-based, the
position the output is aligned with). transformers is imported only where a tokenizer is needed.
"""

from __future__ import annotations

import difflib
import io
import json
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from flexorch.orchestrator.fields import Problems
from flexorch.contract.atomic import atomic_write_bytes
from flexorch.contract.errors import UserError
from flexorch.contract.guard import Limits, check_plain, parse_guarded, scan_pickle
from flexorch.contract.protocol import ScoreKind, TokenizedPrompt
from flexorch.orchestrator.generation import GenerateSettings, max_new_tokens, stop_strings

PROMPT_FORMATS = ("jsonl", "pkl")
# generated_ids: what _updated prompts carry beside the text; accepted so they read back as prompts,
# and not passed through (the output writes the new run's own).
_PROMPT_KEYS = ("prefix", "suffixes", "prefix_ids", "suffix_ids", "id", "answer", "generated_ids")
# A prompt is text or token ids, whole: mixing would tokenize half of it and not the other half.
_TEXT_KEYS, _ID_KEYS = ("prefix", "suffixes"), ("prefix_ids", "suffix_ids")
# Extra fields of a prompt are kept and written to .jsonl output beside the scores, so they may not
# take the names the output uses for its own fields.
RESERVED_FIELDS = frozenset({"index", "prefix", "suffixes", "tokens", "generated", "logprob", "is_greedy",
                             "n_tokens", "next_token_probs", "token_probs", "suffix_logprob"})
GENERATE_FIELDS = frozenset({"text", "generated_ids", "stop_reason", "logprobs"})  # generate's output fields
_GENERATE_KEYS = ("max_new_tokens", "stop")  # a generate prompt's own limit and stop strings
_SCALARS = (str, int, float, bool, type(None))
# Problems listed in one error: enough to see a pattern, short enough to read in a terminal.
_MAX_LISTED = 5
# One prompt per line: a line of 64 MB is far past any model's context (see _MAX_PROMPT_CHARS).
_LINE_LIMITS = Limits(max_bytes=64 << 20)
# A prompt's characters are checked before tokenizing, which on a multi-megabyte string takes minutes
# (and can abort in the Rust tokenizer). With a max_length, no token spans more characters than the
# vocabulary's longest entry, times _CHARS_SLACK for normalisation; with none, this cap.
_MAX_PROMPT_CHARS = 4_000_000
_CHARS_SLACK = 2
# Of every pickle a job writes (its output, the _updated prompts): the seed's readers may run an older
# Python; protocol 4 (Python 3.4+) holds numpy arrays and our plain data.
PICKLE_PROTOCOL = 4


@dataclass(frozen=True)
class Prompt:
    """A prompt as text (prefix, suffixes), or as token ids (prefix_ids, suffix_ids: the text
    fields are then empty), used as given: callers that tokenize their own way (lm-eval) say so."""

    prefix: str
    suffixes: tuple[str, ...]
    id: object | None = None  # a JSON scalar from the prompts file, if it gave one
    answer: int | None = None  # index of the correct suffix (token_probs with one suffix: of score.tokens)
    fields: dict = field(default_factory=dict)  # any other keys of the prompt, passed through to .jsonl output
    prefix_ids: tuple[int, ...] | None = None
    suffix_ids: tuple[tuple[int, ...], ...] | None = None
    max_new_tokens: int | None = None  # generate: this prompt's limit (None: the job's)
    stop: tuple[str, ...] | None = None  # generate: this prompt's stop strings (None: the job's)

    @property
    def is_tokenized(self) -> bool:
        return self.prefix_ids is not None

    @property
    def n_suffixes(self) -> int:
        return len(self.suffix_ids) if self.is_tokenized else len(self.suffixes)

    def to_dict(self) -> dict:
        """The prompt as a .jsonl line holds it."""
        optional = {"id": self.id, "answer": self.answer}
        if self.is_tokenized:
            body = {"prefix_ids": list(self.prefix_ids), "suffix_ids": [list(s) for s in self.suffix_ids]}
        else:
            body = {"prefix": self.prefix, "suffixes": list(self.suffixes)}
        own = {"max_new_tokens": self.max_new_tokens, "stop": list(self.stop) if self.stop is not None else None}
        return {**body, **{k: v for k, v in {**optional, **own}.items() if v is not None}, **self.fields}


# -- reading ---------------------------------------------------------------------------------------


def read_prompts(path: Path, generate: bool = False) -> list[Prompt]:
    """The prompts of a .jsonl or .pkl file, in file order; at least one. `generate` (score.kind
    generate): suffixes may be absent (one empty suffix: the prefix is continued), and a prompt may
    carry its own max_new_tokens and stop."""
    path = Path(path)
    fmt = path.suffix[1:]
    if fmt not in PROMPT_FORMATS:
        raise UserError(f"{path}: expected a .jsonl or .pkl prompts file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the prompts file ({exc.strerror})") from None
    prompts = _read_jsonl(data, path, generate) if fmt == "jsonl" else _read_pickle(data, path, generate)
    if not prompts:
        raise UserError(f"{path}: holds no prompts")
    return prompts


def _read_jsonl(data: bytes, source: Path, generate: bool = False) -> list[Prompt]:
    problems = Problems(source, most=_MAX_LISTED)
    prompts = []
    for line_number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"line {line_number}"
        try:
            # utf-8-sig: editors on Windows start the file with a byte order mark.
            text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            problems.add(where, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            continue
        if not text.strip():
            continue
        try:
            item = parse_guarded(text, lambda t: _json_line(t, where), where, _LINE_LIMITS)
        except UserError as exc:
            problems.lines.append(f"{source}: {exc}")
            continue
        if not isinstance(item, dict):
            problems.add(where, f'expected an object {{"prefix": ..., "suffixes": [...]}}, got {_show(item)}')
            continue
        prompt = _prompt_from_dict(item, problems, where, generate)
        if prompt is not None:
            prompts.append(prompt)
    problems.raise_if_any()
    return prompts


def _json_line(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None


_PLAIN_ONLY = "a prompts pickle may hold only lists, tuples, dicts, strings and numbers"


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds only what pickle makes without a global (lists, tuples, dicts, strings, numbers,
    bools, None); any global is where code execution starts, so each one is refused. (The opcode
    scan refuses them first; this stays as the second lock.)"""

    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        raise UserError(f"{self.source}: refused to load the global '{module}.{name}': {_PLAIN_ONLY} "
                        "(nothing in it was run)")

    def persistent_load(self, pid):
        raise UserError(f"{self.source}: refused a persistent id in the pickle: {_PLAIN_ONLY} (nothing in it was run)")


def _read_pickle(data: bytes, source: Path, generate: bool = False) -> list[Prompt]:
    scan_pickle(data, str(source), refuse_code=_PLAIN_ONLY)
    try:
        items = _PlainDataUnpickler(io.BytesIO(data), source).load()
    except UserError:  # a refused global (UserError is a ValueError: caught here first)
        raise
    # With no global admitted, what remains is pickle's own machinery failing on garbled opcodes
    # (EOFError, UnpicklingError, TypeError, ...): all of it says "not a pickle of plain data".
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{source}: not a valid pickle ({type(exc).__name__}: {str(exc)[:200]})") from None
    problem = check_plain(items)
    if problem:
        raise UserError(f"{source}: {problem}")
    if not isinstance(items, (list, tuple)):
        raise UserError(f"{source}: expected a list of (prefix, suffixes) pairs, got {_show(items)}")
    return _prompts_of_items(items, source, "prompt index {}", generate)


def _prompt_from_dict(item: dict, problems: Problems, where: str, generate: bool = False) -> Prompt | None:
    valid = True
    own = _PROMPT_KEYS + (_GENERATE_KEYS if generate else ())
    extra = {key: value for key, value in item.items() if key not in own}
    tokenized = any(key in item for key in _ID_KEYS)
    if generate:  # a prompt without suffixes is continued from its prefix: one empty suffix
        key = _ID_KEYS[1] if tokenized else _TEXT_KEYS[1]
        item = {key: [[]] if tokenized else [""], **item}
    if tokenized and any(key in item for key in _TEXT_KEYS):
        problems.add(where, "give either prefix and suffixes (text) or prefix_ids and suffix_ids (token ids), "
                            "not both")
        return None
    for key in _ID_KEYS if tokenized else _TEXT_KEYS:
        if key not in item:
            close = difflib.get_close_matches(key, [str(k) for k in extra], n=1)
            problems.add(where, f"unknown key {close[0]!r} (did you mean '{key}'?)" if close else f"missing key '{key}'")
            valid = False
    for key in extra:
        if not isinstance(key, str) or key in RESERVED_FIELDS or (generate and key in GENERATE_FIELDS):
            problems.add(where, f"key {key!r}: the output uses this name for its own field; rename it")
            valid = False
    limit = stop = None
    if generate:
        limit = max_new_tokens(problems, where + ": max_new_tokens", item.get("max_new_tokens"), default=None)
        stop = stop_strings(problems, where + ": stop", item.get("stop")) if "stop" in item else None
        valid = valid and ("max_new_tokens" not in item or limit is not None) and ("stop" not in item or stop is not None)
    if not valid:
        return None
    if tokenized:
        prompt = _make_id_prompt(item["prefix_ids"], item["suffix_ids"], item.get("id"), problems, where,
                                 answer=item.get("answer"), fields=extra)
    else:
        prompt = _make_prompt(item["prefix"], item["suffixes"], item.get("id"), problems, where,
                              answer=item.get("answer"), fields=extra)
    return prompt if prompt is None or not generate else replace(prompt, max_new_tokens=limit, stop=stop)


def _make_prompt(prefix, suffixes, prompt_id, problems: Problems, where: str, answer=None,
                 fields: dict | None = None) -> Prompt | None:
    count = len(problems.lines)
    if not isinstance(prefix, str):
        problems.add(where, f"prefix: expected a string, got {_show(prefix)}")
    if not isinstance(suffixes, (list, tuple)):
        problems.add(where, f"suffixes: expected a list of strings, got {_show(suffixes)}")
    elif not suffixes:
        problems.add(where, "suffixes: empty; each prompt needs at least one suffix to score")
    else:
        for position, suffix in enumerate(suffixes):
            if not isinstance(suffix, str):
                problems.add(where, f"suffixes[{position}]: expected a string, got {_show(suffix)}")
    _check_id_and_answer(prompt_id, answer, suffixes, problems, where)
    if len(problems.lines) > count:
        return None
    return Prompt(prefix=prefix, suffixes=tuple(suffixes), id=prompt_id, answer=answer,
                  fields=_plain(fields or {}))


def _make_id_prompt(prefix_ids, suffix_ids, prompt_id, problems: Problems, where: str, answer=None,
                    fields: dict | None = None) -> Prompt | None:
    """A prompt given as token ids; that they are ids of the model's vocabulary is checked when
    it is tokenized (the reader does not know the model)."""
    count = len(problems.lines)
    if not _is_ids(prefix_ids):
        problems.add(where, f"prefix_ids: expected a list of token ids (integers >= 0), got {_show(prefix_ids)}")
    elif not prefix_ids:
        problems.add(where, "prefix_ids: empty; the model needs at least one token to condition on")
    if not isinstance(suffix_ids, (list, tuple)):
        problems.add(where, f"suffix_ids: expected a list of lists of token ids, got {_show(suffix_ids)}")
    elif not suffix_ids:
        problems.add(where, "suffix_ids: empty; each prompt needs at least one suffix to score")
    else:
        for position, ids in enumerate(suffix_ids):
            if not _is_ids(ids):
                problems.add(where, f"suffix_ids[{position}]: expected a list of token ids (integers >= 0), "
                                    f"got {_show(ids)}")
    _check_id_and_answer(prompt_id, answer, suffix_ids, problems, where)
    if len(problems.lines) > count:
        return None
    return Prompt(prefix="", suffixes=(), id=prompt_id, answer=answer, fields=_plain(fields or {}),
                  prefix_ids=tuple(prefix_ids), suffix_ids=tuple(tuple(ids) for ids in suffix_ids))


def _is_ids(value) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def _check_id_and_answer(prompt_id, answer, suffixes, problems: Problems, where: str) -> None:
    if not isinstance(prompt_id, _SCALARS):
        problems.add(where, f"id: expected a string, number, boolean or null, got {_show(prompt_id)}")
    elif isinstance(prompt_id, float) and not math.isfinite(prompt_id):  # JSON's NaN: equal to no id, itself included
        problems.add(where, f"id: expected a finite number, got {prompt_id}")
    if answer is not None and (not isinstance(answer, int) or isinstance(answer, bool) or answer < 0):
        problems.add(where, f"answer: expected the index (0, 1, ...) of the correct suffix, got {_show(answer)}")
    elif (answer is not None and isinstance(suffixes, (list, tuple)) and len(suffixes) > 1
          and answer >= len(suffixes)):
        problems.add(where, f"answer: {answer} is not the index of one of its {len(suffixes)} suffixes")


def _plain(value):
    """Extra fields as JSON holds them (a pickle's tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def prompts_from_objects(items, source: str = "prompts", generate: bool = False) -> list[Prompt]:
    """Prompts given as Python objects (the Python API): dicts as in a .jsonl line, or the seed's
    (prefix, suffixes) pairs; errors name `source[i]`."""
    if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):
        raise UserError(f"{source}: expected a list of prompts (dicts with prefix and suffixes, or "
                        f"(prefix, suffixes) pairs), got {_show(items)}")
    items = [_as_json(item, f"{source}[{index}]") for index, item in enumerate(items)]
    problem = check_plain(items)  # the same guard as a file's: depth, 64-bit ints, valid Unicode
    if problem:
        raise UserError(f"{source}: {problem}")
    prompts = _prompts_of_items(items, Path(source), "[{}]", generate)
    if not prompts:
        raise UserError(f"{source}: holds no prompts")
    return prompts


def _as_json(item, where: str):
    """An object as the .jsonl line it is written as and read back from: what JSON cannot hold (numpy
    values, sets, an object holding itself) is refused here, as a file could not hold it."""
    try:
        return json.loads(json.dumps(item, ensure_ascii=False))
    except RecursionError:
        raise UserError(f"{where}: nested too deeply (or holds itself)") from None
    except (TypeError, ValueError) as exc:  # "Object of type int64 is not JSON serializable", "Circular reference"
        raise UserError(f"{where}: not JSON data: {exc}") from None


def _prompts_of_items(items, source: Path, where: str, generate: bool = False) -> list[Prompt]:
    """Prompts from a list of items (a pickle's, or the Python API's), every problem listed at once;
    `where`: how a problem names item i (`where.format(i)`)."""
    problems = Problems(source, most=_MAX_LISTED)
    prompts = []
    for index, item in enumerate(items):
        prompt = _prompt_from_item(item, problems, where.format(index), generate)
        if prompt is not None:
            prompts.append(prompt)
    problems.raise_if_any()
    return prompts


def _prompt_from_item(item, problems: Problems, where: str, generate: bool = False) -> Prompt | None:
    if isinstance(item, dict):
        return _prompt_from_dict(item, problems, where, generate)
    if generate and isinstance(item, str):  # the Python API: a prompt to continue, as text alone
        return _make_prompt(item, [""], None, problems, where)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return _make_prompt(item[0], item[1], None, problems, where)
    problems.add(where, f"expected a (prefix, suffixes) pair or a dict with prefix and suffixes, got {_show(item)}")
    return None


def check_answers(prompts: Sequence[Prompt], kind: ScoreKind, n_tokens: int, source: Path) -> None:
    """An answer indexes a prompt's suffixes; with token_probs and one suffix, score.tokens."""
    problems = Problems(source, most=_MAX_LISTED)
    for index, prompt in enumerate(prompts):
        if prompt.answer is None or prompt.n_suffixes > 1:
            continue
        by_token = kind == ScoreKind.TOKEN_PROBS
        choices = n_tokens if by_token else 1
        what = "score.tokens" if by_token else "its 1 suffix"
        if prompt.answer >= choices:
            problems.add(f"prompt index {index}", f"answer: {prompt.answer} is not an index of {what}")
    problems.raise_if_any()


def _show(value) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    if isinstance(value, (bool, int, float)) or value is None:
        return json.dumps(value)
    return f"a {type(value).__name__}"


# -- tokenizing ------------------------------------------------------------------------------------


def load_tokenizer(model_dir: Path, allow_remote_code: bool = False):
    """The model dir's tokenizer, from its files only (never the network); code shipped with a model
    runs only when the job says allow_remote_code: true."""
    # From its module, not transformers' lazy top level: two threads' first `from transformers import
    # AutoTokenizer` race in it and one gets an ImportError (two flexorch.score() calls at once).
    from transformers.models.auto.tokenization_auto import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=allow_remote_code,
                                             local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__  # transformers' messages span lines
        hint = ""
        if "trust_remote_code" in str(exc) and not allow_remote_code:
            hint = "; its tokenizer needs code shipped with the model: set allow_remote_code: true if you trust it"
        raise UserError(f"{model_dir}: cannot load the tokenizer ({reason}){hint}") from None


def tokenize_prompts(prompts: Sequence[Prompt], tokenizer, max_length: int | None, source: Path,
                     generate_tokens: int = 1, vocab_size: int | None = None,
                     generation: GenerateSettings | None = None) -> list[TokenizedPrompt]:
    """Token ids per JOBSPEC: the prefix with the tokenizer's special tokens (BOS where it adds one),
    each suffix without; a prompt given as ids keeps them, each checked to be below `vocab_size`
    (the embedding's rows). `max_length` bounds the longest sequence the model sees for a prompt:
    prefix + its longest suffix + the tokens generated after the first step (positions restart for
    each suffix, so suffixes do not add up). `generation` (score.kind generate): each prompt's limit
    and stop strings, its own or the job's, resolved into its TokenizedPrompt."""
    if not prompts:
        return []
    _check_characters(prompts, tokenizer, max_length, Path(source))
    ids = _token_ids(prompts, tokenizer)
    problems = Problems(Path(source), most=_MAX_LISTED)
    tokenized = []
    for index, (prompt, (prefix, suffixes)) in enumerate(zip(prompts, ids)):
        where = f"prompt index {index}" + (f" (id {prompt.id!r})" if prompt.id is not None else "")
        if not prefix:
            problems.add(where, "the prefix is empty and the tokenizer adds no BOS token: nothing to condition on")
        if prompt.is_tokenized and vocab_size is not None:
            _check_vocab(prefix, suffixes, vocab_size, problems, where)
        limit, stop = 0, ()
        if generation is not None:
            limit = prompt.max_new_tokens or generation.max_new_tokens
            stop = prompt.stop if prompt.stop is not None else generation.stop
        steps = limit or generate_tokens
        longest = len(prefix) + max(len(s) for s in suffixes) + steps - 1
        if max_length is not None and longest > max_length:
            generated = f" + {steps - 1} generated" if steps > 1 else ""
            problems.add(where, f"{longest} tokens (prefix {len(prefix)} + longest suffix "
                                f"{max(len(s) for s in suffixes)}{generated}), more than max_length {max_length}")
        tokenized.append(TokenizedPrompt(index=index, prefix_ids=prefix, suffix_ids=suffixes,
                                         max_new_tokens=limit, stop=stop))
    problems.raise_if_any()
    return tokenized


def _check_characters(prompts: Sequence[Prompt], tokenizer, max_length: int | None, source: Path) -> None:
    """Refuse, before any tokenizing, a prompt with more characters than max_length tokens can hold."""
    limit = _MAX_PROMPT_CHARS
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None  # remote-code ones may lack it
    if max_length is not None and vocab:
        longest_token = max(len(token) for token in vocab)
        limit = min(limit, max_length * longest_token * _CHARS_SLACK)
    problems = Problems(source, most=_MAX_LISTED)
    for index, prompt in enumerate(prompts):
        if prompt.is_tokenized:  # given as ids: nothing to tokenize, their count is checked as is
            continue
        chars = len(prompt.prefix) + max(len(s) for s in prompt.suffixes)
        if chars > limit:
            why = f"more than max_length {max_length} tokens can hold" if max_length is not None else "too long"
            problems.add(f"prompt index {index}", f"{chars} characters (prefix + longest suffix), {why}; "
                                                  f"at most {limit} characters are tokenized")
    problems.raise_if_any()


def _token_ids(prompts: Sequence[Prompt], tokenizer) -> list[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]]:
    """(prefix ids, suffix ids) per prompt: given ones as they are, text tokenized."""
    text = [p for p in prompts if not p.is_tokenized]
    # One batch call per kind: fast tokenizers encode a batch in parallel in Rust, which matters for
    # tens of thousands of prompts; the attention masks are not needed.
    encode = dict(return_attention_mask=False, return_token_type_ids=False)
    prefixes = iter(tokenizer([p.prefix for p in text], **encode)["input_ids"] if text else [])
    suffixes = iter(tokenizer([s for p in text for s in p.suffixes], add_special_tokens=False,
                              **encode)["input_ids"] if text else [])
    out = []
    for prompt in prompts:
        if prompt.is_tokenized:
            out.append((prompt.prefix_ids, prompt.suffix_ids))
        else:
            out.append((tuple(next(prefixes)), tuple(tuple(next(suffixes)) for _ in prompt.suffixes)))
    return out


def _check_vocab(prefix: tuple[int, ...], suffixes: tuple[tuple[int, ...], ...], vocab_size: int,
                 problems: Problems, where: str) -> None:
    for name, ids in [("prefix_ids", prefix)] + [(f"suffix_ids[{j}]", s) for j, s in enumerate(suffixes)]:
        bad = [i for i in ids if i >= vocab_size]
        if bad:
            problems.add(where, f"{name}: token id {bad[0]} is not in the model's vocabulary (ids 0 to {vocab_size - 1})")


def token_ids_for(strings: tuple[str, ...], tokenizer, source: Path | None = None) -> tuple[int, ...]:
    """The id of each string of score.tokens; each must be exactly one token (no special tokens)."""
    lines, ids = [], []
    prefix = f"{source}: score.tokens" if source is not None else "score.tokens"
    for text in strings:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            pieces = tokenizer.convert_ids_to_tokens(encoded)
            lines.append(f"{prefix}: {text!r} is {len(encoded)} tokens ({pieces}, ids {encoded}), "
                         f"expected exactly one")
            continue
        ids.append(encoded[0])
    if lines:
        raise UserError("\n".join(lines))
    return tuple(ids)


def model_vocab_size(config: dict) -> int | None:
    """Rows of the model's embedding, from its config.json: the bound of a valid token id."""
    for candidate in (config, config.get("text_config") or {}):
        value = candidate.get("vocab_size")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_max_length(config: dict) -> int | None:
    """The longest sequence the model's positions allow, from its config.json (None if it names none)."""
    for candidate in (config, config.get("text_config") or {}):  # multimodal configs nest the text model
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = candidate.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


# -- writing ---------------------------------------------------------------------------------------


def updated_prompts_path(output: Path, fmt: str) -> Path:
    """`<output minus extension>_updated.<fmt>`: where the extended prompts go."""
    output = Path(output)
    return output.with_name(f"{output.stem}_updated.{fmt.lstrip('.')}")


def write_updated_prompts(path_of_output: Path, prompts: Sequence[Prompt], generated_text: Sequence[Sequence[str]],
                          fmt: str, generated_ids: Sequence[Sequence[Sequence[int]]] | None = None) -> Path:
    """Write the prompts with each suffix extended by its generated text (a prompt given as token
    ids: by its generated ids), in the prompts' own format (`fmt`: "pkl" or "jsonl"), atomically;
    returns the path written.

    generated_text[i][j] is the text generated after suffix j of prompt i; generated_ids[i][j] the
    token ids it decodes from, written beside a text prompt in .jsonl as `generated_ids` (the text
    alone can cut a byte-level token in two). .pkl stays the seed's (prefix, suffixes) pairs for text.
    """
    fmt = fmt.lstrip(".")
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompts format {fmt!r}; expected one of {PROMPT_FORMATS}")
    if len(generated_text) != len(prompts):
        raise ValueError(f"{len(generated_text)} generated texts for {len(prompts)} prompts")
    extended = []
    for index, (prompt, texts) in enumerate(zip(prompts, generated_text)):
        if len(texts) != prompt.n_suffixes:
            raise ValueError(f"prompt {index}: {len(texts)} generated texts for {prompt.n_suffixes} suffixes")
        if prompt.is_tokenized:
            ids = generated_ids[index]
            extended.append(replace(prompt, suffix_ids=tuple(s + tuple(g) for s, g in zip(prompt.suffix_ids, ids))))
        else:
            extended.append(replace(prompt, suffixes=tuple(s + t for s, t in zip(prompt.suffixes, texts))))
    if fmt == "pkl":  # the seed's format, (prefix, tuple of suffixes), where the prompt is text
        items = [p.to_dict() if p.is_tokenized else (p.prefix, p.suffixes) for p in extended]
        data = pickle.dumps(items, protocol=PICKLE_PROTOCOL)
    else:
        ids = generated_ids if generated_ids is not None else [None] * len(extended)
        lines = [json.dumps({**p.to_dict(), **({"generated_ids": [list(s) for s in g]}
                                               if g is not None and not p.is_tokenized else {})}, ensure_ascii=False)
                 for p, g in zip(extended, ids)]
        data = ("\n".join(lines) + "\n").encode("utf-8")
    path = updated_prompts_path(path_of_output, fmt)
    atomic_write_bytes(path, data)
    return path
