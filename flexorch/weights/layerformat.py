"""A layer file's header: a safetensors file (8-byte length, JSON, then the data), parsed without
touching the data. `flexorch prepare` checks the checkpoint's weight files with it; the workers
(workers/layerfile.py) place each tensor of a layer file they read by it."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from flexorch.contract.errors import UserError
from flexorch.contract.modeldir import read_raw_header
from flexorch.contract.shards import ALIGN

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class LayerIntegrityError(UserError):
    """A layer file that is missing, truncated, or whose checksum disagrees with the manifest."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets within the file's data region
    end: int


@dataclass(frozen=True)
class LayerFileHeader:
    data_offset: int  # where the data region starts in the file
    data_bytes: int
    tensors: tuple[TensorSpec, ...]


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def read_header(path: Path) -> LayerFileHeader:
    """Parse a safetensors header without touching the data."""
    try:
        length, header = read_raw_header(path)
        size = os.path.getsize(path)
    except (OSError, ValueError, RecursionError, struct.error, UnicodeDecodeError) as exc:
        raise LayerIntegrityError(f"{path}: not a readable safetensors file ({exc})") from None
    specs = []
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            specs.append(TensorSpec(name, _DTYPES[info["dtype"]], tuple(info["shape"]), int(start), int(end)))
        except (KeyError, TypeError, ValueError):
            raise LayerIntegrityError(f"{path}: malformed header entry for tensor {name!r}: {info!r}") from None
    data_bytes = max((spec.end for spec in specs), default=0)
    if 8 + length + data_bytes != size:
        raise LayerIntegrityError(f"{path}: file is {size} bytes, its header describes {8 + length + data_bytes}")
    return LayerFileHeader(8 + length, data_bytes, tuple(sorted(specs, key=lambda s: s.start)))
