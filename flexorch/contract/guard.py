"""One guard at the entry of every reader of user-supplied data (YAML job files, JSON lines, JSON
files, prompt pickles): a size cap on the bytes, the parser's own failures (RecursionError on deep
nesting, ValueError on an integer of thousands of digits) turned into a UserError, and one walk over
what was parsed that refuses what later code cannot handle — nesting deeper than `max_depth`, an
integer outside 64 bits, a string that is not valid Unicode (a lone surrogate).

Readers call `parse_guarded` (or, for a pickle, `scan_pickle` before loading it and `check_plain` on
what the restricted unpickler built) once; nothing downstream needs its own case-by-case checks.
"""

from __future__ import annotations

import io
import pickletools
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
                return f"an integer of {item.bit_length()} bits, outside the signed 64-bit range"
        elif isinstance(item, dict):
            stack.extend((part, depth + 1) for pair in item.items() for part in pair)
        elif isinstance(item, (list, tuple)):
            stack.extend((part, depth + 1) for part in item)
    return None


# Opcodes that call something or build an object other than a plain container.
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2",
                 "EXT4"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def scan_pickle(data: bytes, where: str, refuse_code: str | None) -> None:
    """Walk a pickle's opcodes without running any, before it is loaded; UserError(where: ...).

    Always refused: persistent ids, and memo indices past the opcode's own offset (the C unpickler
    grows its memo array to the index it is given: one LONG_BINPUT of 500 million costs gigabytes
    and half a minute before anything fails). With `refuse_code` (what the file may hold, for the
    message), globals and calls are refused too; with None they pass, and the unpickler's
    find_class decides which globals exist."""
    strings: list[str] = []  # the last two pushed: STACK_GLOBAL's module and name
    try:
        for opcode, arg, position in pickletools.genops(io.BytesIO(data)):
            name = opcode.name
            if name in ("PERSID", "BINPERSID"):
                raise UserError(f"{where}: refused a persistent id in the pickle (nothing in it was run)")
            if refuse_code is not None and name in _CODE_OPCODES:
                what = {"GLOBAL": str(arg).replace(" ", "."), "STACK_GLOBAL": ".".join(strings[-2:]) or "?"}.get(name)
                refused = f"to load the global '{what}'" if what else f"the pickle opcode {name} at byte {position}"
                raise UserError(f"{where}: refused {refused}: {refuse_code} (nothing in it was run)")
            if name in _MEMO_PUTS and not 0 <= arg <= position:
                raise UserError(f"{where}: not a valid pickle (memo index {arg} at byte {position})")
            if isinstance(arg, str):
                strings = [*strings[-1:], arg]
    except UserError:  # a refusal above (UserError is a ValueError: let it through first)
        raise
    except (ValueError, EOFError) as exc:  # genops on bytes that are not opcodes
        raise UserError(f"{where}: not a valid pickle ({type(exc).__name__}: {str(exc)[:200]})") from None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
