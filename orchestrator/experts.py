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

Some checkpoints hold their experts fused already, expert first (gpt-oss, Llama 4, Granite MoE's
`input_linear` / `output_linear`): those are written as they are and listed as experts tensors too.
Names are renamed as transformers renames them on load (its conversion mapping's renames, read from
the installed version: Mixtral's and Phi-3.5-MoE's `block_sparse_moe` → `mlp`, `gate` → `router`,
ERNIE 4.5's `moe_statics`, Granite MoE's experts).

Which names the model wants is read from transformers' own skeleton (built on the meta device), not
assumed: a transformers version that keeps experts as a list of modules gets the checkpoint's names
unchanged, and a layer whose converted tensors do not match the module is refused, naming them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from flexorch.contract.errors import UserError
from flexorch.orchestrator.tensors import SourceTensor

if TYPE_CHECKING:
    import torch

_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
# Per-expert projection names → their part of the fused tensors (Mixtral's w1/w3/w2; Qwen, OLMoE).
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_FUSED = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}  # fused name → its parts, in order
# A tensor of a fused experts module as the module names it ("mlp.experts.gate_up_proj", gpt-oss's
# "mlp.experts.down_proj_bias"): expert first. Some checkpoints store experts so already (gpt-oss,
# Llama 4, Granite MoE's input_linear / output_linear once renamed).
_FUSED_NAME = re.compile(r"(?:^|\.)experts\.[a-z_]+$")
# Where transformers' conversion mapping cannot be read (an older version): Mixtral's rename.
_FALLBACK_RENAMES = ((re.compile(re.escape(".block_sparse_moe.")), ".mlp."),)
Renames = tuple[tuple[re.Pattern, str], ...]


def checkpoint_renames(model_type: str) -> Renames:
    """The renames transformers applies to a `model_type` checkpoint's tensor names on load (its
    conversion_mapping's WeightRenaming entries: Mixtral's and Phi-3.5-MoE's block_sparse_moe → mlp
    and gate → router, ERNIE 4.5's moe_statics, Granite MoE's experts), as (pattern, replacement)
    applied to "." + the name relative to its layer. Read from transformers, not restated."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return _FALLBACK_RENAMES
    entries = get_checkpoint_conversion_mapping(model_type) or []
    return tuple((re.compile(source), target) for entry in entries if isinstance(entry, WeightRenaming)
                 for source, target in zip(entry.source_patterns, entry.target_patterns))


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
    stored: dict[str, SourceTensor] = field(default_factory=dict)  # experts tensors the checkpoint holds
    # fused already (module name → tensor, one of `plain`): written as they are

    @property
    def tensors(self) -> tuple[str, ...]:
        """The module names of every experts tensor (expert e is slice [e] of each)."""
        return tuple(f.name for f in self.fused) + tuple(self.stored)

    @property
    def experts(self) -> int:
        shapes = [f.shape for f in self.fused] + [t.shape for t in self.stored.values()]
        return shapes[0][0] if shapes else 0

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert: its slice of every experts tensor."""
        total = sum(f.nbytes for f in self.fused) + sum(t.nbytes for t in self.stored.values())
        return total // self.experts if self.experts else 0


def renamed(name: str, renames: Renames) -> str:
    """`name` (relative to its layer) as transformers' module names it."""
    name = "." + name
    for pattern, target in renames:
        name = pattern.sub(target, name)
    return name.removeprefix(".")


def has_expert_tensors(relative_names: Sequence[str], renames: Renames = ()) -> bool:
    """Whether these tensor names hold experts, per expert or fused already."""
    return any(_EXPERT.match(name) or _FUSED_NAME.search(renamed(name, renames)) for name in relative_names)


def fuse_experts(layer: str, tensors: Sequence[SourceTensor], prefix: str,
                 wanted: dict[str, tuple[int, ...]], renames: Renames = _FALLBACK_RENAMES) -> ExpertLayout:
    """Lay out one decoder layer's tensors (`prefix` + relative name) as the module `wanted`
    (relative name → shape, from transformers' skeleton) holds them, renamed by `renames`
    (`checkpoint_renames`); UserError naming what differs."""
    relative = {t.name[len(prefix):]: t for t in tensors}
    if any(name in wanted for name in relative if _EXPERT.match(name)):
        return ExpertLayout(tuple(tensors), {}, ())  # this transformers keeps a list of expert modules
    new_names = {name: _rename(name, renames, wanted) for name in relative if not _EXPERT.match(name)}
    by_block: dict[str, dict[int, dict[str, SourceTensor]]] = {}
    for name, tensor in relative.items():
        match = _EXPERT.match(name)
        if match:
            role = _ROLE.get(match["proj"])
            if role is None:
                raise UserError(f"{tensor.file}: expert tensor {tensor.name!r} is none of {', '.join(_ROLE)}")
            experts = by_block.setdefault(renamed(match["block"] + ".", renames).removesuffix("."), {})
            experts.setdefault(int(match["expert"]), {})[role] = tensor
    fused = tuple(_fused(layer, block, experts, name, roles)
                  for block, experts in by_block.items() for name, roles in _FUSED.items())
    _check_against_module(layer, new_names, fused, relative, wanted)
    stored = {new: relative[old] for old, new in new_names.items() if _FUSED_NAME.search(new)}
    counts = {shape[0] for shape in [f.shape for f in fused] + [t.shape for t in stored.values()]}
    if len(counts) > 1:
        raise UserError(f"{layer}: its experts tensors disagree on the number of experts: {sorted(counts)}")
    return ExpertLayout(tuple(t for name, t in relative.items() if name in new_names), new_names, fused, stored)


def _rename(name: str, renames: Renames, wanted: dict[str, tuple[int, ...]]) -> str:
    """`renamed`, unless the module keeps the checkpoint's name (a transformers version without the rename)."""
    return name if name in wanted else renamed(name, renames)


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
    decoder = model.get_decoder()
    layers = decoder.layers if hasattr(decoder, "layers") else model.model.layers  # Llama 4: get_decoder is itself
    return [{name: tuple(t.shape) for name, t in layers[i].state_dict().items()} for i in range(num_layers)]
