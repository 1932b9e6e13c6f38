"""A checkpoint's tensors as `flexorch prepare` finds them in its weight files, before any is read:
shared by prepare.py (which reads and writes them) and experts.py (which fuses experts' tensors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SourceTensor:
    name: str  # in the checkpoint: "model.layers.3.mlp.up_proj.weight"
    file: Path  # the weight file holding it
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
