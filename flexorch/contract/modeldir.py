"""A layerwise dir checked against its manifest before any weight is read.

The manifest must describe the model its config.json declares — one embedding, exactly
`num_hidden_layers` decoder layers named layer.0 ... layer.N-1, the norm and the head, with the
config's sizes and model type — and every file it names must lie inside the dir (no `..`, no
absolute path, no symlink leading out) and have the size it declares. A manifest that lost a decoder
entry would otherwise run and score a different model; one naming `../x` would read anything.

Shapes come from the layer files' safetensors headers (a few KiB each, no tensor data): the
embedding and head are (vocab, hidden), the norm (hidden,), and every decoder layer holds the same
tensors with the same shapes. json only: the planner runs this without torch.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path, PurePosixPath

from flexorch.contract.errors import UserError

CONFIG_NAME = "config.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit: a corrupt length must not read a whole file
# Keys of config.json the manifest repeats: (config key, manifest attribute).
_CONFIG_KEYS = (("model_type", "model_type"), ("num_hidden_layers", "num_layers"),
                ("hidden_size", "hidden_size"), ("vocab_size", "vocab_size"))


def check_layout(manifest, model_dir: Path, where: str, config: dict) -> None:
    """Raise UserError(`where`: ...) at the first way `model_dir` differs from `manifest`;
    `config` is the dir's config.json as read now."""
    _check_config(manifest, config, where)
    _check_order(manifest, where)
    root = model_dir.resolve()
    shapes = {}
    for entry in manifest.layers:
        if entry.tied_to is not None:
            if not any(other.name == entry.tied_to and other.file for other in manifest.layers):
                raise UserError(f"{where}: layer {entry.name!r} is tied to {entry.tied_to!r}, which has no file")
            continue
        path = _inside(root, entry, where)
        shapes[entry.name] = read_header_shapes(path)
    _check_shapes(manifest, shapes, where)
    for entry in manifest.layers:
        if entry.kind == "decoder":
            _check_experts(entry, shapes[entry.name], config, where)


def _check_config(manifest, config: dict, where: str) -> None:
    for key, attribute in _CONFIG_KEYS:
        if key in config and config[key] != getattr(manifest, attribute):
            raise UserError(f"{where}: says {attribute} {getattr(manifest, attribute)!r} but {CONFIG_NAME} says "
                            f"{key} {config[key]!r}: the dir's config changed since `flexorch prepare` (re-run it)")


def _check_order(manifest, where: str) -> None:
    if len(manifest.layers) != manifest.num_layers + 3:  # before building a list of num_layers names
        raise UserError(f"{where}: lists {len(manifest.layers)} layers; {manifest.num_layers} decoder layers "
                        f"need {manifest.num_layers + 3} (embed, the decoders, norm, lm_head)")
    expected = [("embed", "embed"), *((f"layer.{i}", "decoder") for i in range(manifest.num_layers)),
                ("norm", "norm"), ("lm_head", "lm_head")]
    found = [(entry.name, entry.kind) for entry in manifest.layers]
    if found == expected:
        return
    position = next((i for i, (a, b) in enumerate(zip(found, expected)) if a != b), min(len(found), len(expected)))
    want = f"{expected[position][0]!r} ({expected[position][1]})" if position < len(expected) else "no more layers"
    got = f"{found[position][0]!r} ({found[position][1]})" if position < len(found) else "the end of the list"
    raise UserError(f"{where}: layer list does not match {manifest.num_layers} decoder layers: expected {want} "
                    f"at position {position}, found {got}")


def _inside(root: Path, entry, where: str) -> Path:
    """The entry's file, which must be a relative path that stays inside `root` once resolved."""
    name = entry.file
    relative = PurePosixPath(name) if isinstance(name, str) and name else None
    if relative is None or relative.is_absolute() or ".." in relative.parts or "\\" in name:
        raise UserError(f"{where}: layer {entry.name!r} names file {name!r}: expected a path inside the model dir")
    path = root / relative
    try:
        resolved = path.resolve(strict=True)
        size = resolved.stat().st_size
    except (OSError, RuntimeError):
        raise UserError(f"{where}: layer {entry.name!r}: file {name} is missing (re-run `flexorch prepare`)") from None
    if not resolved.is_relative_to(root):
        raise UserError(f"{where}: layer {entry.name!r}: file {name} leads out of the model dir (to {resolved})")
    if size != entry.bytes:
        raise UserError(f"{where}: layer {entry.name!r}: file {name} is {size} bytes, the manifest says "
                        f"{entry.bytes} (re-run `flexorch prepare`)")
    return path


def read_raw_header(path: Path) -> tuple[int, dict]:
    """(header length, header without __metadata__) of a safetensors file, no data read: the one
    parser of the format's header (workers/layerfile.py adds dtypes). Raises OSError, ValueError
    (json's errors included), RecursionError or struct.error on a file that is not one."""
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):  # no read-ahead into the data, which may be read around the cache
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"header length {length} out of range")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return length, header


def read_header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header; UserError naming the file."""
    try:
        return {name: tuple(int(d) for d in info["shape"]) for name, info in read_raw_header(path)[1].items()}
    except (OSError, ValueError, RecursionError, struct.error, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def _check_shapes(manifest, shapes: dict[str, dict], where: str) -> None:
    vocab_by_hidden, hidden = (manifest.vocab_size, manifest.hidden_size), (manifest.hidden_size,)
    expected = {"embed": vocab_by_hidden, "lm_head": vocab_by_hidden, "norm": hidden}
    for name, shape in expected.items():
        found = shapes.get(name, {}).get("weight")
        if found is not None and found != shape:
            raise UserError(f"{where}: layer {name!r} weight has shape {list(found)}, the config says {list(shape)}")
    decoders = [entry for entry in manifest.layers if entry.kind == "decoder"]
    # A MoE model may mix dense and MoE layers (Qwen2-MoE's mlp_only_layers, DeepSeek's first dense
    # layers): each layer is compared with the first of its kind.
    first = {}
    for entry in decoders:
        if set(shapes[entry.name]) != set(entry.tensors):
            raise UserError(f"{where}: layer {entry.name!r}: its file holds other tensors than the manifest lists")
        like = first.setdefault(bool(entry.experts), entry.name)
        if shapes[entry.name] != shapes[like]:
            raise UserError(f"{where}: layer {entry.name!r} has other tensors or shapes than {like!r}: "
                            "the layers are not of one model (re-run `flexorch prepare`)")


# Where configs give a MoE layer's expert count (Mixtral, Llama 4, gpt-oss, Phi-3.5-MoE, Granite MoE;
# Qwen-MoE, OLMoE, Hunyuan; DeepSeek, GLM-4.5, dots; ERNIE 4.5).
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _check_experts(entry, shapes: dict[str, tuple[int, ...]], config: dict, where: str) -> None:
    """A MoE layer's expert fields against its file and config.json: the planner sizes expert groups
    by them and the loader cuts each fused tensor into `experts` slices, so a count that lies reads
    other bytes as experts (or a fraction of them)."""
    name = entry.name
    if not entry.experts:
        if entry.expert_tensors or entry.expert_bytes:
            raise UserError(f"{where}: layer {name!r} lists expert tensors or bytes but 0 experts")
        return
    if not entry.expert_tensors:
        raise UserError(f"{where}: layer {name!r} says {entry.experts} experts but lists no expert tensors")
    for tensor in entry.expert_tensors:
        shape = shapes.get(tensor)
        if shape is None:
            raise UserError(f"{where}: layer {name!r}: expert tensor {tensor!r} is not in its file")
        if not shape or shape[0] != entry.experts or 0 in shape:
            raise UserError(f"{where}: layer {name!r} says {entry.experts} experts but {tensor!r} has shape "
                            f"{list(shape)} (re-run `flexorch prepare`)")
    declared = next((config[key] for key in _EXPERT_COUNT_KEYS if isinstance(config.get(key), int)), None)
    if declared is not None and declared != entry.experts:
        raise UserError(f"{where}: layer {name!r} says {entry.experts} experts, {CONFIG_NAME} says {declared}")
    if not 0 < entry.expert_bytes * entry.experts <= entry.bytes:
        raise UserError(f"{where}: layer {name!r} says {entry.experts} experts of {entry.expert_bytes} bytes each "
                        f"in a file of {entry.bytes} bytes")
