"""Checkpoints that ship quantised, for `flexorch prepare`: which scheme a config declares and the names
its quantised tensors take in a layerwise dir (flexorch/contract/manifest.py: `<name>.<scheme>` beside
`<name>.scale`). The bytes are copied as they are; workers dequantise them after each read
(workers/quantized.py), so a pass reads the FP8 or MXFP4 bytes, not a bf16 conversion's.

FP8 (`quant_method: fp8`, DeepSeek-V3/R1, Qwen3-FP8): a float8 `X.weight` and its float32
`X.weight_scale_inv` (one per 128 x 128 block) → `X.weight.fp8` and `X.weight.scale`.
MXFP4 (`quant_method: mxfp4`, gpt-oss): `X_blocks` and `X_scales` → `X.mxfp4` and `X.scale`; gpt-oss's
experts ship fused, expert first, so both stay experts tensors that stream in groups.
Torch-free: names and dtype strings only.
"""

from __future__ import annotations

from flexorch.contract.errors import UserError

FP8, MXFP4 = "fp8", "mxfp4"
_FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
_FP8_SCALE = ".weight_scale_inv"
_MX_BLOCKS, _MX_SCALES = "_blocks", "_scales"
FP8_BLOCK = 128  # workers/quantized.py reads a ragged last block only for this size
MX_BLOCK = 32  # values per E8M0 scale (the MX spec; workers/quantized.py)


def shipped_scheme(config: dict, where: str) -> str | None:
    """The scheme a config.json's quantization_config declares (None: a float checkpoint), or a
    UserError naming what flexorch does not read."""
    quant = config.get("quantization_config")
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == MXFP4:
        return MXFP4
    if method == FP8:
        block = quant.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise UserError(f"{where}: quantization_config: fp8 without weight_block_size [rows, cols] (per-tensor "
                            "FP8) is not read; flexorch reads block-scaled FP8 as DeepSeek-V3 and Qwen3-FP8 ship it")
        if quant.get("activation_scheme", "dynamic") != "dynamic":
            raise UserError(f"{where}: quantization_config: fp8 with activation_scheme "
                            f"{quant.get('activation_scheme')!r} is not read (only dynamic)")
        return FP8
    raise UserError(f"{where}: quantization_config quant_method {str(method)[:40]!r} is not read by flexorch "
                    f"(it reads {FP8} with block scales and {MXFP4}, or float weights; for GGUF give the .gguf file)")


def stored_name(name: str, dtype: str, scheme: str) -> str:
    """A tensor's name in the layer file: quantised ones renamed into the scheme's names."""
    if scheme == FP8 and name.endswith(_FP8_SCALE):
        return name.removesuffix(_FP8_SCALE) + ".weight.scale"
    if scheme == FP8 and dtype in _FP8_DTYPES:
        return f"{name}.{FP8}"
    if scheme == MXFP4 and name.endswith(_MX_BLOCKS):
        return f"{name.removesuffix(_MX_BLOCKS)}.{MXFP4}"
    if scheme == MXFP4 and name.endswith(_MX_SCALES):
        return f"{name.removesuffix(_MX_SCALES)}.scale"
    return name


def is_quantized(stored: str) -> bool:
    """A stored name of a quantised tensor or its scale."""
    return stored.rpartition(".")[2] in (FP8, MXFP4, "scale")


def dequantized_params(stored: str, shape: tuple[int, ...]) -> int:
    """The weights a stored tensor holds once dequantised: a scale none, an MXFP4 byte two."""
    count = 1
    for n in shape:
        count *= n
    kind = stored.rpartition(".")[2]
    return 0 if kind == "scale" else 2 * count if kind == MXFP4 else count


# -- FP8 experts: per-expert weights and scales fused as transformers holds the experts ------------
def split_scales(tensors, prefix: str) -> tuple[tuple, tuple]:
    """A layer's FP8 scales apart from its other tensors: the experts fusing (orchestrator/experts.py)
    checks the rest against the float module, which has no scales."""
    scales = tuple(t for t in tensors if t.name.endswith(_FP8_SCALE))
    return tuple(t for t in tensors if t not in scales), scales


def with_fp8_scales(layout, scales: tuple, prefix: str, where: str):
    """`layout` (an ExpertLayout of FP8 weights) with the scales back: an expert's beside its fused
    weight, stacked as the weights are (`mlp.experts.gate_up_proj.fp8` beside `...gate_up_proj.scale`:
    expert first, gate's blocks then up's), the others as plain tensors."""
    from dataclasses import replace

    from flexorch.orchestrator.experts import FusedExperts

    by_weight = {t.name.removesuffix(_FP8_SCALE) + ".weight": t for t in scales}
    fused = []
    for f in layout.fused:
        for expert in f.parts:
            if len(expert) > 1 and any(t.shape[0] % FP8_BLOCK for t in expert):
                raise UserError(f"{where}: {f.name} joins expert projections of {expert[0].shape[0]} rows, no "
                                f"multiple of the {FP8_BLOCK}-row FP8 block: their scales cannot be stacked")
        missing = [t.name for expert in f.parts for t in expert if t.name not in by_weight]
        if missing:
            raise UserError(f"{where}: FP8 expert weight {missing[0]} has no weight_scale_inv")
        fused += [replace(f, name=f"{f.name}.{FP8}"),
                  FusedExperts(f"{f.name}.scale", tuple(tuple(by_weight.pop(t.name) for t in expert)
                                                          for expert in f.parts))]
    plain = tuple(by_weight.values())
    renamed = {t.name[len(prefix):]: t.name[len(prefix):] for t in plain}
    return replace(layout, plain=layout.plain + plain, renamed=layout.renamed | renamed, fused=tuple(fused))


# -- MXFP4 experts: gpt-oss ships them fused, expert first, as blocks and scales -------------------
def split_mxfp4(tensors, prefix: str) -> tuple[tuple, dict]:
    """A layer's tensors with each MXFP4 pair (`X_blocks`, `X_scales`) replaced by a stand-in for the
    float `X` the module holds once dequantised (blocks (..., out, in / 32, 16) → (..., in, out),
    workers/quantized.py), so the experts layout checks it against transformers' module; and the
    pairs by the stand-in's name (`with_mxfp4_blocks` puts them back)."""
    from flexorch.orchestrator.tensors import SourceTensor

    by_name = {t.name: t for t in tensors}
    pairs = {t.name.removesuffix(_MX_BLOCKS): (t, by_name.get(t.name.removesuffix(_MX_BLOCKS) + _MX_SCALES))
             for t in tensors if t.name.endswith(_MX_BLOCKS)}
    missing = next((name for name, (_, scales) in pairs.items() if scales is None), None)
    if missing is not None:
        raise UserError(f"{by_name[missing + _MX_BLOCKS].file}: MXFP4 {missing}{_MX_BLOCKS} has no {_MX_SCALES}")
    paired = {t.name for pair in pairs.values() for t in pair}
    stand_ins = []
    for name, (blocks, scales) in pairs.items():
        *lead, out, groups, _ = blocks.shape
        stand_ins.append(SourceTensor(name, blocks.file, blocks.dtype, (*lead, groups * MX_BLOCK, out),
                                      blocks.nbytes + scales.nbytes))
    return tuple(t for t in tensors if t.name not in paired) + tuple(stand_ins), pairs


def with_mxfp4_blocks(layout, pairs: dict, prefix: str):
    """`layout` (an ExpertLayout laid out over `split_mxfp4`'s stand-ins) with each stand-in's blocks
    and scales back in its place, named as the module's tensor (`mlp.experts.gate_up_proj_blocks`,
    stored as `mlp.experts.gate_up_proj.mxfp4` beside `.scale`). Both are expert first as shipped, so
    expert e is slice [e] of each and they stream in groups as any fused experts tensor."""
    from dataclasses import replace

    plain, renamed, stored = [], dict(layout.renamed), dict(layout.stored)
    for tensor in layout.plain:
        if tensor.name not in pairs:
            plain.append(tensor)
            continue
        blocks, scales = pairs[tensor.name]
        module = renamed.pop(tensor.name[len(prefix):], tensor.name[len(prefix):])
        plain += [blocks, scales]
        renamed[blocks.name[len(prefix):]] = module + _MX_BLOCKS
        renamed[scales.name[len(prefix):]] = module + _MX_SCALES
        if stored.pop(module, None) is not None:
            stored[f"{module}.{MXFP4}"], stored[f"{module}.scale"] = blocks, scales
    return replace(layout, plain=tuple(plain), renamed=renamed, stored=stored)
