"""Weights as the checkpoint ships them quantised: FP8 with block scales, MXFP4. Dequantised per
shard on the compute device, right after the read (workers/prefetch.py), as --compress int8|int4.

`flexorch prepare` keeps a shipped quantised tensor as it is, renamed into the scheme's names
(orchestrator/shipped.py): `<name>.fp8` | `<name>.mxfp4` beside `<name>.scale`.

FP8 (`quant_method: fp8`, DeepSeek-V3/R1, Qwen3-FP8): a float8_e4m3fn weight (out, in), and
`weight_scale_inv` float32 (ceil(out / 128), ceil(in / 128)): w = q x scale of its 128 x 128 block;
the last block of a dimension that is no multiple of 128 is ragged (transformers'
_dequantize_fp8_weight: the scales repeated over the block, cut to the weight).

MXFP4 (`quant_method: mxfp4`, gpt-oss's experts; the OCP MX spec): `*_blocks` uint8
(experts, out, in / 32, 16), two E2M1 values a byte, low nibble first, and `*_scales` uint8
(experts, out, in / 32), an E8M0 exponent per 32 values: w = fp4 x 2^(scale - 127). transformers'
experts hold the transpose, (experts, in, out) (its mxfp4.convert_moe_packed_tensors); so does this.

Both products are exact in float32 (a few bits times a power of two or a float32 scale), so a model
run in float32 scores as transformers' own dequantised model.
"""

from __future__ import annotations

import torch

FP8, MXFP4 = "fp8", "mxfp4"
FP8_BLOCK = 128  # every FP8 release's weight_block_size; a dir of another block divides evenly (prepare checks)
MX_BLOCK = 32  # values per E8M0 scale (the MX spec)
E8M0_BIAS = 127
# E2M1 code → value: sign bit 3, exponent bits 2-1, mantissa bit 0 (the MX spec's table).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def fp8_block(size: int, scales: int) -> int:
    """The block along a dimension of `size` with `scales` scales: 128 where that fits (ragged
    last block included), else the even division a checkpoint of another block size has."""
    return FP8_BLOCK if -(-size // FP8_BLOCK) == scales else size // scales


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q: float8 (..., out, in); scale_inv: (..., out blocks, in blocks) → (..., out, in) in `dtype`."""
    rows, cols = q.shape[-2:]
    scale = scale_inv.float()
    scale = scale.repeat_interleave(fp8_block(rows, scale.shape[-2]), dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(fp8_block(cols, scale.shape[-1]), dim=-1)[..., :cols]
    return (q.float() * scale).to(dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks: uint8 (experts, out, in / 32, 16); scales: uint8 (experts, out, in / 32) →
    (experts, in, out) in `dtype`, the layout transformers' experts hold. `experts`: the layer's, or
    the group a streamed step reads (slices [first:end] of both, contract/shards.py)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # (..., G, 16, 2)
    values = values.reshape(*blocks.shape[:-1], MX_BLOCK)
    values = torch.ldexp(values, (scales.to(torch.int32) - E8M0_BIAS)[..., None].float())
    return values.reshape(*blocks.shape[:-2], -1).transpose(-1, -2).to(dtype).contiguous()


DEQUANTIZE = {FP8: dequantize_fp8, MXFP4: dequantize_mxfp4}


# -- the other way, to make checkpoints as the releases ship them (tests, benchmarks): prepare never
# quantises into these schemes, it keeps what a checkpoint ships.
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def quantize_fp8(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) → float8_e4m3fn (out, in) and scale_inv (ceil(out / block), ceil(in / block)): per block,
    scale = max |w| / 448 and q = w / scale (DeepSeek-V3's weight_quant; the last block may be ragged)."""
    rows, cols = weight.shape
    scales = torch.zeros(-(-rows // block), -(-cols // block))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = weight[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            scales[i, j] = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scales[i, j]).to(torch.float8_e4m3fn)
    return q, scales


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts, in, out) as transformers' experts hold it → blocks uint8 (experts, out, in / 32, 16) and
    E8M0 scales uint8 (experts, out, in / 32), as gpt-oss ships: per 32 values a power of two putting
    the largest at most 6, each value rounded to the nearest E2M1 code."""
    w = weight.transpose(-1, -2).float()
    groups = w.reshape(*w.shape[:-1], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2.0**-126) / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    lut = torch.tensor(FP4_VALUES)
    codes = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # ties: the lower code (+0 before -0)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8).contiguous()
