"""One guard at the entry of every reader of user-supplied data (YAML job files, JSON lines, JSON
files, prompt pickles): a size cap on the bytes, the parser's own failures (RecursionError on deep
nesting, ValueError on an integer of thousands of digits) turned into a UserError, and one walk over
what was parsed that refuses what later code cannot handle — nesting deeper than `max_depth`, an
integer outside 64 bits, a string that is not valid Unicode (a lone surrogate).

Readers call `parse_guarded` (or `check_plain` on what a restricted unpickler built) once; nothing
downstream needs its own case-by-case checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flexorch.contract.errors import UserError

# Deeper than any job, manifest or prompt needs; shallow enough that recursive code (json.dumps,
# repr, our own walks) stays far from Python's recursion limit.
MAX_DEPTH = 64
# Integers in every file we read are counts, sizes, ids: 64 bits hold them all, and numpy, struct and
# the OS refuse anything wider (OverflowError far from where the value came from).
MAX_INT = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    max_bytes: int  # the whole input
    max_depth: int = MAX_DEPTH


def parse_guarded(data: bytes | str, parse: Callable, where: str, limits: Limits):
    """`parse(data)` with the reader's limits; any failure of the parser becomes UserError(where: ...).

    `parse` raises what it raises for malformed input (its own error types pass through when they
    are UserErrors); the common parser failures on hostile input are mapped here once."""
    if len(data) > limits.max_bytes:
        raise UserError(f"{where}: {len(data)} bytes, more than the {limits.max_bytes} this file may hold")
    try:
        value = parse(data)
    except UserError:  # the parser's own message, complete (UserError is a ValueError: let it through first)
        raise
    except RecursionError:
        raise UserError(f"{where}: nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{where}: {_first_line(exc)}") from None
    problem = check_plain(value, limits.max_depth)
    if problem:
        raise UserError(f"{where}: {problem}")
    return value


def check_plain(value, max_depth: int = MAX_DEPTH) -> str | None:
    """What is wrong with `value` (plain data: dicts, lists, tuples, strings, numbers), or None.

    Iterative, and each object is visited once: a pickle that references one string thousands of
    times (or a list holding itself) costs one visit, not thousands."""
    seen: set[int] = set()
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if depth > max_depth:
            return f"nested more than {max_depth} levels deep"
        if isinstance(item, str):
            if not _is_unicode(item):
                return f"a string that is not valid Unicode (a lone surrogate) near {item[:30]!r}"
        elif isinstance(item, int) and not isinstance(item, bool):
            if abs(item) > MAX_INT:
                return f"an integer of {item.bit_length()} bits (at most 64 bits allowed)"
        elif isinstance(item, dict):
            stack.extend((part, depth + 1) for pair in item.items() for part in pair)
        elif isinstance(item, (list, tuple)):
            stack.extend((part, depth + 1) for part in item)
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
