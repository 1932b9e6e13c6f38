"""The layerwise model format: a manifest describing one safetensors file per layer.

A layerwise dir (written by `flexorch prepare`) holds:
  flexorch_manifest.json   this manifest (versioned)
  layers/000_embed.safetensors, layers/001_layer.0.safetensors, ..., norm, lm_head
  config.json, generation_config.json, tokenizer files (copied from the source)

Tensor names inside a layer file are relative to the layer's module (``self_attn.q_proj.weight``);
``source_prefix`` + name gives the name in the source checkpoint (``model.layers.3.``).
A tied lm head has no file of its own: ``tied_to`` names the layer whose ``weight`` it reuses.
A dir prepared with ``--compress int8|int4``, or from an FP8 / MXFP4 checkpoint, records the scheme in
the manifest and in every decoder layer's entry, and each stored tensor's scheme in its name
(``mlp.down_proj.weight.fp8``; flexorch/weights/compression.py, workers/quantized.py); one dir holds one scheme.

Pure Python (json only): the planner reads manifests without importing torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flexorch.contract.errors import UserError
from flexorch.contract.guard import Limits, parse_guarded

MANIFEST_NAME = "flexorch_manifest.json"
FORMAT_VERSION = 1

# Layer kinds in forward order.
EMBED, DECODER, NORM, LM_HEAD = "embed", "decoder", "norm", "lm_head"
# How a decoder layer's weights are stored: a compressed tensor is `<name>.<scheme>` beside its
# `<name>.scale`, so the tensor names record each tensor's scheme. `flexorch prepare --compress`
# quantises (flexorch/weights/compression.py); fp8 (128 x 128 block scales) and mxfp4 are kept as the
# checkpoint ships them (workers/quantized.py), and scores are then the dequantised model's.
QUANTIZE_SCHEMES = ("int8", "int4")
SHIPPED_SCHEMES = ("fp8", "mxfp4")
COMPRESSION_SCHEMES = QUANTIZE_SCHEMES + SHIPPED_SCHEMES
# Bytes per element of the floating dtypes a manifest names (LayerEntry.dtype, Manifest.dtype).
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


class ManifestError(UserError):
    """A layerwise dir whose manifest is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class LayerEntry:
    name: str  # "embed", "layer.0" ... "layer.N-1", "norm", "lm_head"
    kind: str  # EMBED | DECODER | NORM | LM_HEAD
    file: str | None  # path relative to the dir; None when tied_to is set
    bytes: int  # size of the file (0 when tied)
    sha256: str | None  # hex digest of the whole file (None when tied)
    dtype: str  # e.g. "bfloat16" (the widest floating dtype in the file, quantised tensors and scales aside)
    params: int  # number of elements in the layer's tensors
    source_prefix: str  # e.g. "model.layers.3."
    tensors: tuple[str, ...] = ()  # tensor names in the file (relative to the layer)
    tied_to: str | None = None  # e.g. "embed" for a tied lm head
    # Mixture-of-experts layers: the fused experts tensors (expert first: expert e is slice [e] of each,
    # one contiguous byte range per tensor, so experts can be read alone), their count and the bytes
    # of one expert across them. 0 / () for every other layer.
    experts: int = 0
    expert_bytes: int = 0
    expert_tensors: tuple[str, ...] = ()
    compression: str | None = None  # a COMPRESSION_SCHEMES name: its weights named so are quantised (decoder layers)

    @property
    def module_expert_tensors(self) -> tuple[str, ...]:
        """The fused experts tensors as the module holds them once dequantised: a stored
        `mlp.experts.down_proj.fp8` and its `.scale` are the module's `mlp.experts.down_proj`."""
        names: list[str] = []
        for name in self.expert_tensors:
            base, _, suffix = name.rpartition(".")
            quantized = suffix in COMPRESSION_SCHEMES or (suffix == "scale" and self.compression is not None)
            if (base if quantized else name) not in names:
                names.append(base if quantized else name)
        return tuple(names)

    @property
    def index(self) -> int | None:
        """Decoder layer number, or None for the other kinds."""
        return int(self.name.split(".", 1)[1]) if self.kind == DECODER else None


@dataclass(frozen=True)
class Manifest:
    version: int
    model_type: str
    architectures: tuple[str, ...]
    dtype: str  # the checkpoint's dtype (torch name without "torch.")
    num_layers: int  # decoder layers
    hidden_size: int
    vocab_size: int
    layers: tuple[LayerEntry, ...]  # forward order
    config: dict = field(default_factory=dict)  # the source config.json, as read
    source: str = ""  # the source dir, for information only
    compression: str | None = None  # a COMPRESSION_SCHEMES name; None: plain floating weights

    # -- derived sizes, used by the planner ------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(entry.bytes for entry in self.layers)

    @property
    def decoder_layers(self) -> tuple[LayerEntry, ...]:
        return tuple(entry for entry in self.layers if entry.kind == DECODER)

    @property
    def largest_layer_bytes(self) -> int:
        return max(self.stored_bytes(entry) for entry in self.layers)

    def entry(self, name: str) -> LayerEntry:
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def stored_bytes(self, entry: LayerEntry) -> int:
        """Bytes read to materialise `entry` (a tied head reads its target's file)."""
        return self.entry(entry.tied_to).bytes if entry.tied_to else entry.bytes

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        if data.get("version") != FORMAT_VERSION:
            raise ManifestError(
                f"manifest version {data.get('version')!r} is not supported (expected {FORMAT_VERSION}); "
                "re-run `flexorch prepare`"
            )
        layers = data.get("layers")
        if not isinstance(layers, list) or not layers or not all(isinstance(layer, dict) for layer in layers):
            raise ManifestError("manifest is malformed: 'layers' must be a non-empty list of objects")
        try:
            entries = tuple(
                LayerEntry(**{**layer, "tensors": tuple(layer.get("tensors") or ()),
                              "expert_tensors": tuple(layer.get("expert_tensors") or ())})
                for layer in layers
            )
            manifest = cls(**{**data, "layers": entries, "architectures": tuple(data.get("architectures") or ())})
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest is malformed: {exc}") from None
        problem = _type_problem(manifest)
        if problem:
            raise ManifestError(f"manifest is malformed: {problem}")
        manifest.check_compression()
        return manifest

    def check_compression(self) -> None:
        """Every decoder layer stored with the manifest's scheme, the other layers uncompressed: a
        layer file copied in from a dir prepared otherwise would be read with the wrong scheme."""
        if self.compression not in (None, *COMPRESSION_SCHEMES):
            raise ManifestError(f"compression {self.compression!r} is not a scheme (expected one of "
                                f"{', '.join(COMPRESSION_SCHEMES)} or null); re-run `flexorch prepare`")
        for entry in self.layers:
            expected = self.compression if entry.kind == DECODER else None
            if entry.compression != expected:
                raise ManifestError(
                    f"layer {entry.name} is stored {_scheme(entry.compression)} but the manifest says "
                    f"{_scheme(expected)}: one dir holds one scheme; re-run `flexorch prepare`")
            # The loader dequantises by the tensors' names (contract/modeldir.py checks them against the
            # file): a scheme the manifest does not claim would be read as the file says, not as it says.
            held = sorted({name.rpartition(".")[2] for name in entry.tensors} & set(COMPRESSION_SCHEMES))
            if held and held != [expected]:
                raise ManifestError(
                    f"layer {entry.name} holds {' and '.join(held)} tensors but the manifest says "
                    f"{_scheme(expected)}: re-run `flexorch prepare`")


def _scheme(compression: str | None) -> str:
    return f"compressed {compression}" if compression else "uncompressed"


_NONE = type(None)
_FIELD_TYPES = {"version": int, "model_type": str, "dtype": str, "num_layers": int, "hidden_size": int,
                "vocab_size": int, "config": dict, "source": str, "compression": (str, _NONE)}
_ENTRY_TYPES = {"name": str, "kind": str, "file": (str, _NONE), "bytes": int, "sha256": (str, _NONE),
                "dtype": str, "params": int, "source_prefix": str, "tied_to": (str, _NONE), "experts": int,
                "expert_bytes": int, "compression": (str, _NONE)}


def _type_problem(manifest: "Manifest") -> str | None:
    """The first field of the wrong type (a count that is negative or a boolean counts as wrong)."""
    items = [(None, manifest, _FIELD_TYPES)] + [(entry.name, entry, _ENTRY_TYPES) for entry in manifest.layers]
    for owner, obj, types in items:
        for name, expected in types.items():
            value = getattr(obj, name)
            counts = expected is int
            if not isinstance(value, expected) or (counts and (isinstance(value, bool) or value < 0)):
                where = f"layer {owner!r}: " if isinstance(owner, str) else ""
                return f"{where}{name} is {str(value)[:40]!r}, expected {'a count' if counts else expected}"
    bad = next((e.name for e in manifest.layers
                if not all(isinstance(t, str) for t in e.tensors + e.expert_tensors + manifest.architectures)), None)
    return f"layer {bad!r}: tensors and architectures must be strings" if bad is not None else None


# config.json, an index or a manifest: a manifest lists every tensor of every layer (a few MB for a
# 70B model); 256 MB is far past any real one.
JSON_LIMITS = Limits(max_bytes=256 << 20)


def read_json_object(path: Path, error: type[UserError] = UserError) -> dict:
    """A JSON file holding an object (config.json, an index, a manifest), or `error` naming it."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: unreadable JSON ({exc})") from None
    try:
        data = parse_guarded(text, json.loads, f"{path}: unreadable JSON", JSON_LIMITS)
    except UserError as exc:
        raise error(str(exc)) from None
    if not isinstance(data, dict):
        raise error(f"{path}: not a JSON object")
    return data


def is_layerwise_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(path: str | Path) -> Manifest:
    """Read `path/flexorch_manifest.json` and check the dir against it and its config.json
    (contract/modeldir.py); raises ManifestError naming the file."""
    from flexorch.contract.modeldir import CONFIG_NAME, check_layout  # modeldir reads Manifest's fields

    manifest_path = Path(path) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ManifestError(f"{path}: not a layerwise model dir (no {MANIFEST_NAME}); run `flexorch prepare` first")
    data = read_json_object(manifest_path, ManifestError)
    try:
        manifest = Manifest.from_dict(data)
    except ManifestError as exc:
        raise ManifestError(f"{manifest_path}: {exc}") from None
    config = read_json_object(Path(path) / CONFIG_NAME, ManifestError)
    try:
        check_layout(manifest, Path(path), str(manifest_path), config)
    except UserError as exc:
        raise ManifestError(str(exc)) from None
    return manifest
