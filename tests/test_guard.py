"""The one guard at every reader's entry (flexorch/contract/guard.py): what it refuses, and that it
stays cheap on what hostile input makes expensive."""

from __future__ import annotations

import json
import pickle
import time

import pytest

from flexorch.contract.errors import UserError
from flexorch.contract.guard import MAX_DEPTH, Limits, check_plain, parse_guarded, scan_pickle

LIMITS = Limits(max_bytes=1 << 20)


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("value, problem", [
    (_nested(MAX_DEPTH), None),
    (_nested(MAX_DEPTH + 1), f"nested more than {MAX_DEPTH} levels deep"),
    ({"a": [1, 2**63 - 1, -(2**63 - 1)]}, None),
    ({"a": [2**63]}, "an integer of 64 bits, outside the signed 64-bit range"),
    ({"k": "\ud800"}, "not valid Unicode"),
    ({"\udfff": 1}, "not valid Unicode"),  # keys are checked too
    (["ok", 1.5, None, True, ("t",)], None),
])
def test_check_plain(value, problem):
    found = check_plain(value)
    assert found is None if problem is None else problem in found


def test_shared_and_cyclic_references_are_visited_once():
    big = "x" * 2_000_000
    many = [big] * 200_000  # 400 GB of text by reference
    loop: list = [many]
    loop.append(loop)
    start = time.monotonic()
    assert check_plain(loop) is None
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("text, needle", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # the parser's RecursionError
    ("[" * 100 + "]" * 100, "nested more than 64"),
    ("9" * 5000, "4300 digits"),  # the parser's ValueError
    ('{"a": "\\ud800"}', "not valid Unicode"),
    ('{"a": ', "Expecting value"),
    (" " * (2 << 20), "more than the 1048576"),
])
def test_parse_guarded_turns_every_failure_into_one_user_error(text, needle):
    with pytest.raises(UserError, match=r"^f\.json: ") as info:
        parse_guarded(text, json.loads, "f.json", LIMITS)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_parser_s_own_user_error_passes_unchanged():
    def parse(_text):
        raise UserError("f.json: line 3: what the parser said")

    with pytest.raises(UserError, match=r"^f\.json: line 3: what the parser said$"):
        parse_guarded("{}", parse, "f.json", LIMITS)


class _Evil:
    def __reduce__(self):
        return (print, ("ran",))


@pytest.mark.parametrize("data, needle", [
    (pickle.dumps([("q", (" a",))], protocol=2), None),
    (pickle.dumps([("q", (" a",))], protocol=4), None),
    (pickle.dumps([_Evil()], protocol=4), "refused to load the global 'builtins.print'"),
    (pickle.dumps([_Evil()], protocol=0), "refused to load the global '__builtin__.print'"),
    (b"\x80\x04]\x94(\x8c\x01a\x94r" + (544_825_888).to_bytes(4, "little") + b"e.", "memo index 544825888"),
    (b"\x80\x04\x8c\x03abc\x94}b.", "refused the pickle opcode BUILD"),
    (b"\x80\x04Pid\n.", "persistent id"),
    (b"\x80\x04\xff", "not a valid pickle"),
])
def test_scan_pickle(data, needle):
    if needle is None:
        scan_pickle(data, "p.pkl", refuse_code="plain data only")
        return
    with pytest.raises(UserError, match=r"^p\.pkl: ") as info:
        scan_pickle(data, "p.pkl", refuse_code="plain data only")
    assert needle in str(info.value)


def test_scan_pickle_without_refuse_code_leaves_globals_to_the_unpickler():
    scan_pickle(pickle.dumps([_Evil()], protocol=4), "p.pkl", refuse_code=None)  # find_class decides
    with pytest.raises(UserError, match="memo index"):
        scan_pickle(b"\x80\x04]\x94r" + (10**9).to_bytes(4, "little") + b".", "p.pkl", refuse_code=None)
