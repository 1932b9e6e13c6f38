"""Fuzzing the readers of user files: random mutations of valid prompt files (.jsonl, .pkl) and of a
layerwise manifest. Whatever the bytes, the only exception that may escape is UserError (one
message naming the file), and a valid result must still be valid data.

Seeded, so a failure reproduces; a few thousand mutations run in seconds.
"""

from __future__ import annotations

import copy
import json
import pickle
import random
import shutil
from pathlib import Path

import pytest

from flexorch.contract.errors import UserError
from flexorch.contract.manifest import MANIFEST_NAME, read_manifest
from flexorch.orchestrator.prompts import read_prompts

from test_controller import PROMPTS

# Fragments that have broken readers before: deep nesting, huge numbers, lone surrogates, opcodes.
_NASTY = [b"[" * 3000, b"{" * 3000, b"9" * 5000, b'"\\ud800"', b"1e999", b"-1", b"null", b"true", b"\x00",
          b"\xff\xfe", b"\\", b'"', b"\n", b"}b", b"\x8c\x03abc\x94", b"R", b"c__builtin__\neval\n", b"\x80\x04"]


def _mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(data) + 1)
        choice = rng.random()
        if choice < 0.3 and data:
            data[min(where, len(data) - 1)] = rng.randrange(256)
        elif choice < 0.5:
            data[where:where] = rng.choice(_NASTY)
        elif choice < 0.7:
            del data[where:where + rng.randint(1, 32)]
        elif choice < 0.85:
            data[where:where] = data[rng.randrange(len(data) + 1):][:rng.randint(1, 64)]
        else:
            del data[where:]
    return bytes(data)


def _only_user_errors(read, path: Path, data: bytes) -> object | None:
    path.write_bytes(data)
    try:
        return read(path)
    except UserError as exc:
        assert str(exc).strip(), data[:200]
        return None
    except BaseException as exc:  # noqa: BLE001 - the point: report anything else with its input
        raise AssertionError(f"{type(exc).__name__}: {exc} escaped for input {data[:300]!r}") from exc


@pytest.mark.parametrize("fmt", ["jsonl", "pkl"])
def test_prompt_reader_survives_mutations(tmp_path, fmt):
    rng = random.Random(13)
    if fmt == "jsonl":
        valid = "".join(json.dumps(p) + "\n" for p in PROMPTS).encode()
    else:
        valid = pickle.dumps([(p["prefix"], tuple(p["suffixes"])) for p in PROMPTS], protocol=4)
    path = tmp_path / f"prompts.{fmt}"
    accepted = 0
    for _ in range(2000):
        prompts = _only_user_errors(read_prompts, path, _mutate(valid, rng))
        if prompts is not None:
            accepted += 1
            assert all(isinstance(p.prefix, str) and p.suffixes and all(isinstance(s, str) for s in p.suffixes)
                       for p in prompts)
            for p in prompts:  # what is accepted can be tokenized: valid Unicode throughout
                (p.prefix + "".join(p.suffixes)).encode("utf-8")
    assert accepted > 0  # some mutations keep the file valid: the loop reads, not just refuses


_VALUES = [None, -1, 0, "", "../x", "/etc/passwd", [], {}, [1], {"a": 1}, True, 2**70, 1.5, "layer.0", "embed",
           "\ud800"]


def _mutate_structure(data, rng: random.Random):
    """Replace one value somewhere in the manifest with a hostile one, or drop or repeat a list item."""
    data = copy.deepcopy(data)
    parent, key, node = None, None, data
    for _ in range(rng.randint(1, 4)):
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        if not children or rng.random() < 0.2:
            break
        parent, (key, node) = node, rng.choice(children)
        if not isinstance(node, (dict, list)):
            break
    if isinstance(node, list) and node and rng.random() < 0.3:
        index = rng.randrange(len(node))
        node.insert(index, node[index]) if rng.random() < 0.5 else node.pop(index)
    elif parent is not None:
        parent[key] = rng.choice(_VALUES)
    return data


def test_manifest_reader_survives_mutations(tmp_path, layerwise):
    model = tmp_path / "model.layers"
    shutil.copytree(layerwise("llama"), model)
    valid_bytes = (model / MANIFEST_NAME).read_bytes()
    valid = json.loads(valid_bytes)
    rng = random.Random(13)
    accepted = 0
    for i in range(1500):
        if i % 2:
            data = _mutate(valid_bytes, rng)
        else:
            data = json.dumps(_mutate_structure(valid, rng)).encode("utf-8", "surrogatepass")
        manifest = _only_user_errors(lambda p: read_manifest(p.parent), model / MANIFEST_NAME, data)
        accepted += manifest is not None
    assert accepted > 0
