"""Values of a YAML mapping (a job file, the API's keywords) read into typed ones, every problem
collected: one line each, naming the file and the key, raised together as one UserError.
orchestrator/spec.py reads a job with these; orchestrator/prompts.py collects its problems alike."""

from __future__ import annotations

import difflib
import math
import re

from flexorch.contract.errors import UserError

# Upper bounds that turn absurd values into one line here instead of an OverflowError deep in the
# planner, numpy or the OS: counts fit a C int; a timeout past a year is a typo (and wait() refuses
# timeouts past about 2^31 s); a size past 2^62 bytes fits int64 arithmetic with room to spare.
MAX_COUNT = 2**31 - 1
MAX_SECONDS = 366 * 24 * 3600.0
MAX_SIZE = 2**62

# Size units. Decimal units are the SI ones disk and GPU vendors print (GB = 10^9 bytes); binary
# units say so (GiB = 2^30), as in Kubernetes, where a bare "G" is decimal too.
_SIZE_UNITS = {"b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    _SIZE_UNITS |= {_letter: 1000**_power, f"{_letter}b": 1000**_power,
                    f"{_letter}i": 1024**_power, f"{_letter}ib": 1024**_power}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: int | float | str) -> int:
    """Bytes from 6GB, "6 GiB", "512MB", "8G" (decimal), "1.5TiB" or "4096B".

    Raises ValueError (with the reason) for anything else, including sizes <= 0 and a number
    without a unit: `ram: 8` meant 8 GB, not the 8 bytes it would be.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size like 6GB or 6GiB")
    if isinstance(value, (int, float)):
        number, unit = value, ""
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        number, unit = float(match[1]), match[2].lower()
    else:
        raise ValueError("expected a size like 6GB or 6GiB")
    if not unit:
        raise ValueError(f"give a unit, e.g. {number:g}GB or {number:g}GiB (B for bytes)")
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown unit {unit!r} (use B, KB, MB, GB, TB, or KiB, MiB, GiB, TiB)")
    size = number * _SIZE_UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise ValueError("must be more than 0 bytes")
    if size > MAX_SIZE:
        raise ValueError(f"must be at most {MAX_SIZE} bytes (4 EiB)")
    return int(round(size))


# Problems listed in one error: every key of a real job file, not a screenful of one bad list.
MAX_LISTED = 12


class Problems:
    """Collects one line per problem, each starting with the file and the key (or place) at fault;
    lists at most `most` of them."""

    def __init__(self, source, most: int = MAX_LISTED):
        self.source = source
        self.most = most
        self.lines: list[str] = []

    def add(self, key: str | None, message: str) -> None:
        self.lines.append(f"{self.source}: {key}: {message}" if key else f"{self.source}: {message}")

    def raise_if_any(self) -> None:
        if not self.lines:
            return
        shown = self.lines[:self.most]  # a 300,000-item `devices:` list is 300,000 problems
        if len(self.lines) > self.most:
            shown.append(f"{self.source}: ... and {len(self.lines) - self.most} more problems")
        raise UserError("\n".join(shown))


def show(value) -> str:
    """A value as the user wrote it in YAML, with its type where that is the problem."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def check_keys(problems: Problems, mapping: dict, allowed: tuple[str, ...], prefix: str) -> None:
    for key in mapping:
        if not isinstance(key, str) or key not in allowed:
            hint = did_you_mean(str(key), allowed, prefix) or f" (expected {', '.join(prefix + a for a in allowed)})"
            problems.add(None, f"unknown key '{prefix}{key}'{hint}")


# -- one parser per kind of value: each records its problems and returns None on failure -----------


def choice(problems: Problems, key: str, value, choices: tuple[str, ...], default: str | None = None,
            aliases: dict[str, str] | None = None, auto: bool = True) -> str | None:
    """One of `choices`; null, and "auto" (if `auto` and not itself a choice), give `default`."""
    auto = auto and "auto" not in choices
    if value is None or (auto and value == "auto"):
        return default
    if isinstance(value, str) and value in choices:
        return value
    expected = " | ".join(("auto", *choices) if auto else choices)
    hint = ""
    if isinstance(value, str):
        alias = (aliases or {}).get(value.strip().lower())
        hint = f" (did you mean '{alias}'?)" if alias else did_you_mean(value, choices)
    problems.add(key, f"expected {expected}, got {show(value)}{hint}")
    return None


def count(problems: Problems, key: str, value, default: int | None = None, allow_auto: bool = True) -> int | None:
    """An integer from 1 to MAX_COUNT; null (and "auto" where allowed) give `default`."""
    if value is None or (allow_auto and value == "auto"):
        return default
    # bool is an int in Python; `true` is never a count.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        if value <= MAX_COUNT:
            return value
        problems.add(key, f"must be at most {MAX_COUNT}, got {value}")
        return None
    expected = "an integer >= 1" + (" or auto" if allow_auto else "")
    problems.add(key, f"expected {expected}, got {show(value)}")
    return None


def seconds(problems: Problems, key: str, value, default: float) -> float | None:
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        if value <= MAX_SECONDS:
            return float(value)
        problems.add(key, f"must be at most {MAX_SECONDS:g} seconds (a year), got {show(value)}")
        return None
    problems.add(key, f"expected a number of seconds > 0, got {show(value)}")
    return None


def flag(problems: Problems, key: str, value, default: bool) -> bool | None:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    problems.add(key, f"expected true or false, got {show(value)}")
    return None
