"""`flexorch prepare`: a Hugging Face checkpoint dir -> a layerwise dir (format: flexorch/contract/manifest.py).

The conversion streams. Each output layer's tensors are read from the weight files that hold them,
written to the layer's own safetensors file and dropped before the next layer; a weight file is
opened (memory-mapped) only for the layer being written and released with it. Peak RSS is thus
about the largest layer plus the torch baseline, whatever the size of the source shards.

The output is built in a temporary dir next to DST and renamed into place once complete, so DST is
either a whole layerwise dir or absent. `describe_checkpoint` gives the manifest the conversion
would write, from tensor headers alone, for planning a job on an unconverted checkpoint.

Checkpoints that ship quantised (FP8 block-scaled, MXFP4) keep their bytes, renamed into the scheme's
names (orchestrator/shipped.py); a hub id is read from the Hugging Face cache (orchestrator/hub.py); a
GGUF file goes through transformers' GGUF loader first (orchestrator/fromgguf.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import struct
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from flexorch.contract.errors import UserError
from flexorch.contract.models import check_decoder_config
from flexorch.contract.leftovers import prepare_build_dir, prepare_old_dir, prepare_temps, remove_dead
from flexorch.contract.manifest import (DECODER, EMBED, FORMAT_VERSION, LM_HEAD, MANIFEST_NAME, NORM,
                                        QUANTIZE_SCHEMES, SHIPPED_SCHEMES, LayerEntry, Manifest, read_json_object)
from flexorch.contract.verified import mark, sha256_file
from flexorch.orchestrator.experts import (ExpertLayout, FusedExperts, checkpoint_renames, fuse_experts,
                                          has_expert_tensors, module_shapes)
from flexorch.orchestrator.shipped import (FP8, MXFP4, dequantized_params, is_quantized, shipped_scheme,
                                          split_mxfp4, split_scales, stored_name, with_fp8_scales,
                                          with_mxfp4_blocks)
from flexorch.orchestrator.tensors import SourceTensor

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "config.json"
# What transformers looks for, in its order of preference: (file, format). An index names the shards.
WEIGHT_MARKERS = (
    ("model.safetensors.index.json", "safetensors"),
    ("model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "bin"),
    ("pytorch_model.bin", "bin"),
)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
COPIED_FILES = (CONFIG_NAME, "generation_config.json", *TOKENIZER_FILES)

# Weight files of layouts we do not read (GGUF, Meta's consolidated.*.pth, ...), to tell "unknown
# layout" from "no weights at all".
_OTHER_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".ckpt", ".h5", ".msgpack")
# Buffers that old checkpoints saved although the model recomputes them.
_IGNORED_TENSOR = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_DECODER_PREFIX = re.compile(r"model\.layers\.(\d+)\.")
_PREFIXES = {EMBED: "model.embed_tokens.", NORM: "model.norm.", LM_HEAD: "lm_head."}


@dataclass(frozen=True)
class Checkpoint:
    """What `prepare` needs to know about a source dir, read from its config and weight headers."""

    src: Path
    config: dict  # config.json as read
    model_type: str
    architectures: tuple[str, ...]
    dtype: str | None  # from the config; None when it names none
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied: bool  # the lm head reuses the input embedding
    tensors: tuple[SourceTensor, ...]
    scheme: str | None = None  # "fp8" | "mxfp4": its quantization_config (orchestrator/shipped.py)


@dataclass(frozen=True)
class LayerSource:
    """One layer of the output and the source tensors it is made of (none for a tied head)."""

    position: int
    name: str  # "embed", "layer.3", "norm", "lm_head"
    kind: str
    source_prefix: str
    tensors: tuple[SourceTensor, ...]
    dtype: str  # widest floating dtype of its tensors (a tied head: the embedding's)
    tied_to: str | None = None
    experts: ExpertLayout | None = None  # a MoE layer: `tensors` are its plain ones, the experts are fused
    shipped: str | None = None  # "fp8" | "mxfp4": its quantised tensors are kept so, renamed (shipped.py)

    @property
    def file(self) -> str | None:
        return None if self.tied_to else f"layers/{self.position:03d}_{self.name}.safetensors"

    def relative(self, tensor: SourceTensor) -> str:
        name = tensor.name[len(self.source_prefix):]
        name = self.experts.renamed.get(name, name) if self.experts else name
        return stored_name(name, _dtype_name(tensor.dtype), self.shipped) if self.shipped else name

    def outputs(self) -> dict[str, SourceTensor | FusedExperts]:
        """The tensors of the layer file by name: each has dtype, shape and nbytes."""
        fused = {f.name: f for f in self.experts.fused} if self.experts else {}
        return {self.relative(t): t for t in self.tensors} | fused

    def entry(self, nbytes: int, sha256: str | None) -> LayerEntry:
        experts = self.experts or ExpertLayout((), {}, ())
        return LayerEntry(
            name=self.name, kind=self.kind, file=self.file, bytes=nbytes, sha256=sha256, dtype=self.dtype,
            params=sum(dequantized_params(name, tuple(t.shape)) for name, t in self.outputs().items()),
            source_prefix=self.source_prefix, tensors=tuple(self.outputs()), tied_to=self.tied_to,
            experts=experts.experts, expert_bytes=experts.expert_bytes, expert_tensors=experts.tensors,
            compression=self.shipped if self.kind == DECODER else None,
        )


# -- the public entry points -----------------------------------------------------------------------
def describe_checkpoint(src: str | Path) -> Manifest:
    """The manifest `prepare_checkpoint(src, ...)` would write, with sha256 None; writes nothing."""
    checkpoint = scan_checkpoint(_local(src, None))
    layers = group_layers(checkpoint)
    return _manifest(checkpoint, [layer.entry(_planned_file_bytes(layer), None) for layer in layers])


def prepare_checkpoint(src: str | Path, dst: str | Path, *, force: bool = False, console=None,
                       compress: str | None = None, dtype: str | None = None, source: str | None = None) -> Manifest:
    """Convert the Hugging Face checkpoint dir `src` into the layerwise dir `dst`; returns its manifest.

    Everything is checked before a byte is written; an existing `dst` is refused unless `force`,
    and then replaced only once the new dir is complete. `compress` ("int8" | "int4"): store the
    decoder layers' projection weights quantised (flexorch/weights/compression.py; scores become approximate).
    `src` may be a hub id (orchestrator/hub.py) or a GGUF file, dequantised into `dtype`
    (orchestrator/fromgguf.py; bfloat16 unless said). `source`: what the manifest names as the source
    (default `src`; a GGUF file's, not the checkpoint made of it on the way).
    """
    if Path(src).suffix == ".gguf" and Path(src).is_file():
        from flexorch.orchestrator.fromgguf import prepare_gguf

        if Path(dst).exists() and not force:  # said before the whole model is loaded
            raise UserError(f"{dst}: already exists (use --force to replace it)")
        return prepare_gguf(Path(src), Path(dst), lambda checkpoint: prepare_checkpoint(
            checkpoint, dst, force=force, console=console, compress=compress, source=str(src)), dtype, console)
    if dtype is not None:
        raise UserError(f"--dtype {dtype}: only a GGUF file is converted to a dtype; a checkpoint keeps its own")
    if compress not in (None, *QUANTIZE_SCHEMES):
        raise UserError(f"--compress {compress}: expected one of {', '.join(QUANTIZE_SCHEMES)}")
    if Path(dst).exists() and not force and not Path(src).exists():  # a hub id: said before it downloads
        raise UserError(f"{dst}: already exists (use --force to replace it)")
    src, dst = _local(src, Path(dst).parent, console), Path(dst)
    checkpoint = scan_checkpoint(src)
    if compress and checkpoint.scheme:
        raise UserError(f"--compress {compress}: {src} ships quantised ({checkpoint.scheme}), kept as it is; "
                        "leave out --compress")
    layers = group_layers(checkpoint)
    if dst.exists() and not force:
        raise UserError(f"{dst}: already exists (use --force to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_dead(dst.parent, prepare_temps(dst.name))  # half-written dirs of killed conversions
    tmp = prepare_build_dir(dst)
    if tmp.exists():  # left by a killed run that had our pid
        shutil.rmtree(tmp)
    try:
        manifest = _write_layerwise(checkpoint, layers, tmp, console, compress, source)
        _move_into_place(tmp, dst)
    finally:
        if tmp.exists():  # only when the conversion failed or was interrupted
            shutil.rmtree(tmp)
    if console is not None:
        _print_summary(manifest, dst, console)
    return manifest


# -- reading the source ----------------------------------------------------------------------------
def _local(src: str | Path, layerwise_parent: Path | None, console=None) -> Path:
    """`src` as a local dir: a hub id that names no local path is looked up in the Hugging Face cache,
    and downloaded when online and `layerwise_parent` (where the copy goes) is given (orchestrator/hub.py)."""
    from flexorch.orchestrator.hub import absent_message, cached_snapshot, hub_cache_dir, is_hub_id, resolve_hub_id

    if Path(src).exists() or not is_hub_id(str(src)):
        return Path(src)
    try:
        if layerwise_parent is not None:
            return resolve_hub_id(str(src), layerwise_parent, console)
        found = cached_snapshot(str(src))
        if found is None:
            raise UserError(absent_message(str(src), hub_cache_dir(), offline=True))
        return found
    except UserError as exc:  # a local path mistyped reads as a hub id too: both said
        raise UserError(f"{src}: no such checkpoint dir; {exc}") from None


def weights_marker(src: Path) -> Path | None:
    """The index or single weight file that identifies `src`'s layout, or None."""
    return next((src / name for name, _ in WEIGHT_MARKERS if (src / name).is_file()), None)


def weight_files(src: Path) -> tuple[str, Path | None, tuple[Path, ...]]:
    """(format "safetensors" | "bin", index file or None, weight files) of the checkpoint dir `src`."""
    marker = weights_marker(src)
    if marker is None:
        others = sorted(p.name for p in src.iterdir() if p.suffix in _OTHER_WEIGHT_SUFFIXES)
        expected = ", ".join(name for name, _ in WEIGHT_MARKERS)
        if others and any(name.endswith(".gguf") for name in others):
            raise UserError(f"{src}: holds GGUF files ({', '.join(others[:3])}); give the .gguf file itself")
        if others:
            raise UserError(f"{src}: unknown weight layout ({', '.join(others[:3])}); expected one of {expected}")
        raise UserError(f"{src}: no weight files (expected one of {expected})")
    fmt = dict(WEIGHT_MARKERS)[marker.name]
    if not marker.name.endswith(".index.json"):
        return fmt, None, (marker,)
    weight_map = _read_index(marker)
    files = tuple(src / name for name in sorted(set(weight_map.values())))
    for path in files:
        if not path.is_file():
            raise UserError(f"{marker}: names weight file {path.name}, which is missing")
    return fmt, marker, files


def scan_checkpoint(src: Path) -> Checkpoint:
    """Read `src`'s config and the names, dtypes and shapes of its tensors (no tensor data)."""
    if not src.is_dir():
        raise UserError(f"{src}: no such checkpoint dir")
    raw = _read_raw_config(src)
    fmt, index, files = weight_files(src)
    specs = {path: _tensor_specs(path, fmt) for path in files}
    if index is None:
        tensors = [SourceTensor(name, path, *spec) for path, found in specs.items() for name, spec in found.items()]
    else:
        tensors = []
        for name, file in _read_index(index).items():
            path = src / file
            if name not in specs[path]:
                raise UserError(f"{index}: names tensor {name!r} in {file}, which does not hold it")
            tensors.append(SourceTensor(name, path, *specs[path][name]))
    # Before anything loops over the declared layers: a config claiming a billion layers over a few
    # tensors is refused here, not after building a billion slots.
    if raw["num_hidden_layers"] > len(tensors):
        raise UserError(f"{src / CONFIG_NAME}: num_hidden_layers {raw['num_hidden_layers']} but the checkpoint holds "
                        f"only {len(tensors)} tensors")
    config = _auto_config(src)
    return Checkpoint(
        src=src, config=raw, model_type=config.model_type, architectures=tuple(raw.get("architectures") or ()),
        dtype=_config_dtype(raw), num_layers=raw["num_hidden_layers"], hidden_size=config.hidden_size,
        vocab_size=config.vocab_size, tied=bool(config.tie_word_embeddings), tensors=tuple(tensors),
        scheme=shipped_scheme(raw, str(src / CONFIG_NAME)),
    )


def _read_raw_config(src: Path) -> dict:
    """config.json as a dict, with a usable layer count."""
    path = src / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{path}: missing (a Hugging Face checkpoint dir has a config.json)")
    raw = read_json_object(path)
    check_decoder_config(raw, str(path))
    layers = raw.get("num_hidden_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise UserError(f"{path}: num_hidden_layers must be an integer >= 1, got {str(layers)[:40]}")
    return raw


def _auto_config(src: Path):
    """config.json as transformers reads it (for the model type's defaults, such as whether word
    embeddings are tied when the file does not say)."""
    from transformers.models.auto.configuration_auto import AutoConfig  # not the lazy top level: thread-safe

    try:
        return AutoConfig.from_pretrained(src)
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"{src / CONFIG_NAME}: transformers cannot read it ({_first_line(exc)})") from None


def _read_index(path: Path) -> dict[str, str]:
    weight_map = read_json_object(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{path}: no weight_map")
    return weight_map




def _tensor_specs(path: Path, fmt: str) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """name -> (dtype, shape, nbytes) of the tensors in one weight file, without reading their data."""
    if fmt == "safetensors":
        from flexorch.weights.layerformat import read_header  # also checks the file's size against its header

        return {spec.name: (spec.dtype, spec.shape, spec.end - spec.start) for spec in read_header(path).tensors}
    return {name: (t.dtype, tuple(t.shape), t.nbytes) for name, t in _load_bin(path).items()}


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch weight file, memory-mapped: its tensors' data is read only when touched."""
    import pickle

    import torch

    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable pytorch weight file ({_first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


def _config_dtype(raw: dict) -> str | None:
    name = raw.get("dtype") or raw.get("torch_dtype")
    if isinstance(name, str) and name.removeprefix("torch.") in {"float16", "bfloat16", "float32", "float64"}:
        return name.removeprefix("torch.")
    return None


# -- grouping tensors into layers ------------------------------------------------------------------
def group_layers(checkpoint: Checkpoint) -> list[LayerSource]:
    """The output layers in forward order, each with its source tensors."""
    groups: dict[str, list[SourceTensor]] = defaultdict(list)
    for tensor in checkpoint.tensors:
        if _IGNORED_TENSOR.search(tensor.name):
            continue
        name = _layer_of(tensor.name, checkpoint.num_layers)
        if name is None:
            raise UserError(
                f"{tensor.file}: tensor {tensor.name!r} maps to no layer of a {checkpoint.num_layers}-layer "
                f"{checkpoint.model_type} model"
            )
        if name == LM_HEAD and checkpoint.tied:
            continue  # a copy of the embedding: the head reads the embed layer's file
        groups[name].append(tensor)

    slots = [
        (EMBED, EMBED, _PREFIXES[EMBED]),
        *((f"layer.{i}", DECODER, f"model.layers.{i}.") for i in range(checkpoint.num_layers)),
        (NORM, NORM, _PREFIXES[NORM]),
        (LM_HEAD, LM_HEAD, _PREFIXES[LM_HEAD]),
    ]
    layers = []
    renames = checkpoint_renames(checkpoint.model_type)
    module_shapes = _module_shapes_if_moe(checkpoint, renames)
    for position, (name, kind, prefix) in enumerate(slots):
        if kind == LM_HEAD and checkpoint.tied:
            layers.append(LayerSource(position, name, kind, prefix, (), layers[0].dtype, tied_to=EMBED))
            continue
        if not groups[name]:
            why = "" if kind != LM_HEAD else " and the config does not tie word embeddings"
            raise UserError(f"{checkpoint.src}: no tensors for layer {name!r} ({prefix}*){why}")
        tensors = tuple(sorted(groups[name], key=lambda t: t.name))
        layer = LayerSource(position, name, kind, prefix, tensors, _layer_dtype(tensors))
        if kind == DECODER and has_expert_tensors([layer.relative(t) for t in tensors], renames):
            where = f"{checkpoint.src}: {name}"
            weights, scales = split_scales(tensors, prefix) if checkpoint.scheme == FP8 else (tensors, ())
            # MXFP4 (gpt-oss): blocks and scales checked against the module as the float tensor they hold
            weights, blocks = split_mxfp4(weights, prefix) if checkpoint.scheme == MXFP4 else (weights, {})
            experts = fuse_experts(where, weights, prefix, module_shapes[position - 1], renames)
            if scales:
                experts = with_fp8_scales(experts, scales, prefix, where)
            if blocks:
                experts = with_mxfp4_blocks(experts, blocks, prefix)
            layer = replace(layer, tensors=experts.plain, experts=experts)
        layers.append(_shipped(layer, checkpoint) if checkpoint.scheme else layer)
    return layers


def _shipped(layer: LayerSource, checkpoint: Checkpoint) -> LayerSource:
    """`layer` keeping its quantised tensors as shipped: only decoder layers may hold them (the manifest's
    one-scheme rule), and its dtype is the floating one of the rest (a scale's float32 is not the layer's)."""
    layer = replace(layer, shipped=checkpoint.scheme)
    quantized = [t for t in layer.tensors if is_quantized(layer.relative(t))]
    if quantized and layer.kind != DECODER:
        raise UserError(f"{quantized[0].file}: {quantized[0].name} is quantised ({checkpoint.scheme}) but only "
                        "decoder layers are read quantised (embedding, norm and head in floating point)")
    plain = tuple(t for t in layer.tensors if t not in quantized and t.dtype.is_floating_point)
    return replace(layer, dtype=_layer_dtype(plain) if plain else checkpoint.dtype or "bfloat16")


def _module_shapes_if_moe(checkpoint: Checkpoint, renames) -> list[dict[str, tuple[int, ...]]] | None:
    """transformers' per-layer tensor shapes, needed only to lay out experts (building them costs seconds)."""
    if not has_expert_tensors([t.name for t in checkpoint.tensors], renames):
        return None
    return module_shapes(checkpoint.src, checkpoint.num_layers)


def _layer_of(tensor_name: str, num_layers: int) -> str | None:
    match = _DECODER_PREFIX.match(tensor_name)
    if match:
        return f"layer.{match.group(1)}" if int(match.group(1)) < num_layers else None
    return next((kind for kind, prefix in _PREFIXES.items() if tensor_name.startswith(prefix)), None)


def _layer_dtype(tensors: tuple[SourceTensor, ...]) -> str:
    floating = [t.dtype for t in tensors if t.dtype.is_floating_point] or [t.dtype for t in tensors]
    return _dtype_name(max(floating, key=lambda dtype: dtype.itemsize))


def _checkpoint_dtype(checkpoint: Checkpoint, entries: list[LayerEntry]) -> str:
    """The config's dtype, else the floating dtype holding most of the bytes."""
    if checkpoint.dtype:
        return checkpoint.dtype
    bytes_by_dtype: dict[str, int] = defaultdict(int)
    for tensor in checkpoint.tensors:
        if tensor.dtype.is_floating_point and tensor.dtype.itemsize >= 2:  # not FP8's stored bytes
            bytes_by_dtype[_dtype_name(tensor.dtype)] += tensor.nbytes
    return max(bytes_by_dtype, key=bytes_by_dtype.get, default=entries[0].dtype)


def _manifest(checkpoint: Checkpoint, entries: list[LayerEntry]) -> Manifest:
    return Manifest(
        version=FORMAT_VERSION, model_type=checkpoint.model_type, architectures=checkpoint.architectures,
        dtype=_checkpoint_dtype(checkpoint, entries), num_layers=checkpoint.num_layers,
        hidden_size=checkpoint.hidden_size, vocab_size=checkpoint.vocab_size, layers=tuple(entries),
        config=checkpoint.config, source=str(checkpoint.src), compression=checkpoint.scheme,
    )


# -- writing ---------------------------------------------------------------------------------------
def _write_layerwise(checkpoint: Checkpoint, layers: list[LayerSource], out: Path, console,
                     compress: str | None = None, source: str | None = None) -> Manifest:
    """The layer files, the copied files, then the manifest (compression: `compress`, or the scheme
    the checkpoint ships)."""
    (out / "layers").mkdir(parents=True)
    entries = []
    with _progress(console, len(layers), checkpoint.src.name) as advance:
        for layer in layers:
            entries.append(_write_layer(layer, out, compress if layer.kind == DECODER else None))
            advance(layer.name)
    for name in COPIED_FILES:
        if (checkpoint.src / name).is_file():
            shutil.copy2(checkpoint.src / name, out / name)
    manifest = replace(_manifest(checkpoint, entries), compression=compress or checkpoint.scheme,
                       source=source or str(checkpoint.src))
    (out / MANIFEST_NAME).write_text(manifest.to_json())  # last: a dir with a manifest is complete
    return manifest


def _write_layer(layer: LayerSource, out: Path, compress: str | None = None) -> LayerEntry:
    if layer.tied_to:
        return layer.entry(0, None)
    from flexorch.weights.compression import compress_layer

    path = out / layer.file
    tensors = _read_layer(layer)
    if compress:
        tensors = compress_layer(tensors, compress)
    _save_contiguous(tensors, path)  # the tensors (and their file mappings) go when this returns
    entry = layer.entry(path.stat().st_size, sha256_file(path))
    mark(out, layer.file, entry.sha256)  # what was just hashed is not hashed again by the first job
    return replace(entry, compression=compress, tensors=tuple(tensors)) if compress else entry


def _read_layer(layer: LayerSource) -> dict[str, torch.Tensor]:
    """The layer's tensors, named relative to it. Each weight file is opened for this layer only:
    the tensors are views of its memory map, whose pages count in RSS while the map lives."""
    by_file: dict[Path, list[SourceTensor]] = defaultdict(list)
    experts = [t for f in layer.experts.fused for part in f.parts for t in part] if layer.experts else []
    for tensor in (*layer.tensors, *experts):
        by_file[tensor.file].append(tensor)
    out = {}
    for path, tensors in by_file.items():
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                out.update({t.name: f.get_tensor(t.name) for t in tensors})
        else:
            state = _load_bin(path)
            # save_file needs contiguous tensors; a no-op for what save_pretrained wrote
            out.update({t.name: state[t.name].contiguous() for t in tensors})
    plain = {layer.relative(t): out[t.name] for t in layer.tensors}
    fused = {f.name: f.build(lambda t: out.pop(t.name)) for f in (layer.experts.fused if layer.experts else ())}
    return plain | fused


def _planned_file_bytes(layer: LayerSource) -> int:
    """Size of the file `_save_contiguous` writes for `layer`, from shapes alone."""
    if layer.tied_to:
        return 0
    header, data = _safetensors_header(layer.outputs())
    return len(header) + data


def _safetensors_header(tensors) -> tuple[bytes, int]:
    """The safetensors file start (8 bytes of length, the JSON header padded with spaces to 8 bytes)
    for tensors of these shapes and dtypes, and the data bytes after it. The tensors' order sets the
    offsets; it is safetensors' own, read back from serialising zero-element stand-ins."""
    import torch
    from safetensors.torch import save

    stand_ins = save({name: torch.empty(0, dtype=t.dtype) for name, t in tensors.items()})
    order = json.loads(stand_ins[8:8 + struct.unpack("<Q", stand_ins[:8])[0]])
    order.pop("__metadata__", None)
    header, offset = {}, 0
    for name, info in order.items():
        end = offset + tensors[name].nbytes
        header[name] = {"dtype": info["dtype"], "shape": list(tensors[name].shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def _save_contiguous(tensors: dict, path: Path) -> None:
    """`tensors` as a safetensors file (what safetensors' save_file writes, byte for byte, checked by
    tests/test_prepare.py), its whole size allocated before the first write. A layer file in one
    extent read cold ~15% faster than the same file in the 6-7 extents that writing it piecemeal into
    a part-full disk gave (measured on a virtio disk): the loader streams each file front to back."""
    import torch

    header, data = _safetensors_header(tensors)
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, len(header) + data)
        except OSError as exc:  # a filesystem without it: written as it comes; a full disk: said now
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from None
        except AttributeError:  # not Linux
            pass
        f.write(header)
        for name in json.loads(header[8:]):  # the header's order is the data's
            f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())


def _move_into_place(tmp: Path, dst: Path) -> None:
    if not dst.exists():
        tmp.rename(dst)
        return
    old = prepare_old_dir(dst)  # --force: the old DST goes once the new is in
    dst.rename(old)
    tmp.rename(dst)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


@contextlib.contextmanager
def _progress(console, total: int, label: str):
    """Yields advance(layer_name); a rich progress bar over the layers when there is a console."""
    if console is None:
        yield lambda name: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"preparing {label}", total=total)
        yield lambda name: progress.update(task, advance=1, description=f"preparing {label}: {name}")


def _print_summary(manifest: Manifest, dst: Path, console) -> None:
    from rich.table import Table

    from flexorch.orchestrator.hardware import format_bytes

    largest = max(manifest.layers, key=lambda entry: entry.bytes)
    head = manifest.entry(LM_HEAD)
    table = Table(title=f"prepared {dst}", show_header=False)
    table.add_row("layers", f"{len(manifest.layers)} ({manifest.num_layers} decoder layers)")
    table.add_row("total size", format_bytes(manifest.total_bytes))
    table.add_row("largest layer", f"{largest.name} ({format_bytes(largest.bytes)})")
    table.add_row("dtype", manifest.dtype)
    if manifest.compression in SHIPPED_SCHEMES:
        table.add_row("quantised", f"{manifest.compression} as the checkpoint ships it, dequantised per shard")
    elif manifest.compression:
        table.add_row("compression", f"{manifest.compression}, group-wise absmax (decoder projections)")
    table.add_row("lm head", f"tied to {head.tied_to}" if head.tied_to else "own weights")
    console.print(table)


# -- small helpers ---------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first_line(exc: BaseException) -> str:
    """The gist of a library's error for a one-line message: its first sentence."""
    text = str(exc).strip()
    return re.split(r"(?<=\.)\s", text.splitlines()[0])[0] if text else type(exc).__name__
