"""Mixture-of-experts weights for `flexorch prepare`: per-expert checkpoint tensors → the fused layout
transformers' experts modules hold.

Checkpoints store each expert's projections separately (`block_sparse_moe.experts.5.w1.weight`,
`mlp.experts.5.gate_proj.weight`); transformers 5 fuses them on load into one tensor per projection
with the expert first (`mlp.experts.gate_up_proj`: (experts, 2 x moe_intermediate, hidden), gate rows
then up rows; `mlp.experts.down_proj`: (experts, hidden, moe_intermediate)), and renames Mixtral's
`block_sparse_moe` to `mlp` (its conversion_mapping.py). `prepare` writes that layout, so a layer
file loads into the module with no conversion, and expert e is slice [e] of each fused tensor: one
contiguous byte range per tensor, which is how experts are read alone (the manifest's
`experts` / `expert_bytes`). Fusing copies a layer's experts once, so converting a MoE layer peaks
at about twice its size (a dense layer: once).

Which names the model wants is read from transformers' own skeleton (built on the meta device), not
assumed: a transformers version that keeps experts as a list of modules gets the checkpoint's names
unchanged, and a layer whose converted tensors do not match the module is refused, naming them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from flexorch.contract.errors import UserError
from flexorch.orchestrator.tensors import SourceTensor

if TYPE_CHECKING:
    import torch

_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
# Per-expert projection names → their part of the fused tensors (Mixtral's w1/w3/w2; Qwen, OLMoE).
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_FUSED = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}  # fused name → its parts, in order
# Module renames transformers applies to checkpoint names on load (conversion_mapping.py: Mixtral).
_RENAMES = (("block_sparse_moe.", "mlp."),)


@dataclass(frozen=True)
class FusedExperts:
    """One fused experts tensor of a layer and the per-expert checkpoint tensors it is made of."""

    name: str  # relative to the layer: "mlp.experts.gate_up_proj"
    parts: tuple[tuple[SourceTensor, ...], ...]  # per expert: its tensors, concatenated along dim 0

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0][0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0]
        return (len(self.parts), sum(t.shape[0] for t in first), *first[0].shape[1:])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for expert in self.parts for t in expert)

    def build(self, read: Callable[[SourceTensor], torch.Tensor]) -> torch.Tensor:
        """The fused tensor (experts, rows, cols), reading each part with `read`."""
        import torch

        return torch.stack([torch.cat([read(t) for t in expert]) for expert in self.parts])


@dataclass(frozen=True)
class ExpertLayout:
    """A decoder layer's tensors once its experts are fused: plain tensors (renamed as the module
    names them) and the fused experts tensors."""

    plain: tuple[SourceTensor, ...]
    renamed: dict[str, str]  # checkpoint name relative to the layer → the module's name
    fused: tuple[FusedExperts, ...]

    @property
    def experts(self) -> int:
        return self.fused[0].shape[0] if self.fused else 0

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert: its slice of every fused tensor."""
        return sum(f.nbytes for f in self.fused) // self.experts if self.fused else 0


def has_expert_tensors(relative_names: Sequence[str]) -> bool:
    return any(_EXPERT.match(name) for name in relative_names)


def fuse_experts(layer: str, tensors: Sequence[SourceTensor], prefix: str,
                 wanted: dict[str, tuple[int, ...]]) -> ExpertLayout:
    """Lay out one decoder layer's tensors (`prefix` + relative name) as the module `wanted`
    (relative name → shape, from transformers' skeleton) holds them; UserError naming what differs."""
    relative = {t.name[len(prefix):]: t for t in tensors}
    if any(name in wanted for name in relative if _EXPERT.match(name)):
        return ExpertLayout(tuple(tensors), {}, ())  # this transformers keeps a list of expert modules
    renamed = {name: _rename(name, wanted) for name in relative if not _EXPERT.match(name)}
    by_block: dict[str, dict[int, dict[str, SourceTensor]]] = {}
    for name, tensor in relative.items():
        match = _EXPERT.match(name)
        if match:
            role = _ROLE.get(match["proj"])
            if role is None:
                raise UserError(f"{tensor.file}: expert tensor {tensor.name!r} is none of {', '.join(_ROLE)}")
            experts = by_block.setdefault(_rename(match["block"] + ".", wanted).removesuffix("."), {})
            experts.setdefault(int(match["expert"]), {})[role] = tensor
    fused = tuple(_fused(layer, block, experts, name, roles)
                  for block, experts in by_block.items() for name, roles in _FUSED.items())
    _check_against_module(layer, renamed, fused, relative, wanted)
    return ExpertLayout(tuple(t for name, t in relative.items() if name in renamed), renamed, fused)


def _rename(name: str, wanted: dict[str, tuple[int, ...]]) -> str:
    for old, new in _RENAMES:
        if name.startswith(old) and not any(w.startswith(old) for w in wanted):
            return new + name[len(old):]
    return name


def _fused(layer: str, block: str, experts: dict[int, dict[str, SourceTensor]], name: str,
           roles: tuple[str, ...]) -> FusedExperts:
    if sorted(experts) != list(range(len(experts))):
        raise UserError(f"{layer}: experts of {block} are not numbered 0..{len(experts) - 1}: {sorted(experts)}")
    missing = [f"expert {e} {role}" for e, parts in sorted(experts.items()) for role in roles if role not in parts]
    if missing:
        raise UserError(f"{layer}: {block} lacks {', '.join(missing[:4])}")
    return FusedExperts(f"{block}.experts.{name}", tuple(tuple(experts[e][r] for r in roles) for e in sorted(experts)))


def _check_against_module(layer: str, renamed: dict[str, str], fused: Sequence[FusedExperts],
                          relative: dict, wanted: dict[str, tuple[int, ...]]) -> None:
    have = {new: tuple(relative[old].shape) for old, new in renamed.items()} | {f.name: f.shape for f in fused}
    wrong = [f"{name} {shape} (the module wants {wanted.get(name, 'no such tensor')})"
             for name, shape in have.items() if wanted.get(name) != shape]
    missing = sorted(set(wanted) - set(have))
    if wrong or missing:
        what = "; ".join(wrong[:3] + ([f"missing {', '.join(missing[:3])}"] if missing else []))
        raise UserError(f"{layer}: its mixture-of-experts tensors do not fit transformers' module: {what}")


def module_shapes(config_dir, num_layers: int) -> list[dict[str, tuple[int, ...]]]:
    """Per decoder layer: its state dict's names and shapes in transformers' own module, from a
    skeleton built on the meta device (no memory; a few seconds for a 48-layer, 128-expert config)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = model.get_decoder().layers
    return [{name: tuple(t.shape) for name, t in layers[i].state_dict().items()} for i in range(num_layers)]
