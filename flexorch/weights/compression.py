"""Compressed weights: group-wise absmax quantisation of decoder layers, dequantised per shard; and
the KV cache's asymmetric group-wise quantisation (`quantize_groups`, workers/kvcache.py), which
shares the int4 packing.

`flexorch prepare --compress int8|int4` stores every 2-D weight of a decoder layer (the attention
and MLP projections, which hold nearly all its bytes) as signed integers with one float32 scale
per GROUP consecutive input columns: scale = max |w| over the group / QMAX, q = round(w / scale).
Dequantised, w' = q x scale, so each element is off by at most scale / 2 = max |w| / (2 x QMAX)
of its group (plus the float rounding of the product): 1/254 of the group's largest weight for
int8, 1/14 for int4. int4 values (-7..7) are packed two to a byte. Norms, biases, embedding and
head stay as the checkpoint has them (they are a small share of the bytes, and the head's error
would reach every score directly).

The loader dequantises each shard on the compute device right after reading it, into the job's
dtype (workers/prefetch.py), so the arithmetic is the uncompressed model's with perturbed weights;
only the bytes read and kept in the shard slots shrink (int8 ~1.06 B per weight, int4 ~0.56,
against 2 for fp16/bf16).

Plain torch, not a quantisation library: bitsandbytes and torchao quantise modules in place for
their own kernels (bitsandbytes' 4-bit on CPU only in recent versions); what is needed here is a
file format streamed per layer and turned back into ordinary weights, which is a few tensor ops
that run the same on CPU and GPU.
"""

from __future__ import annotations

import torch

from flexorch.contract.manifest import COMPRESSION_SCHEMES as SCHEMES
from flexorch.workers.quantized import DEQUANTIZE

QMAX = {"int8": 127, "int4": 7}
GROUP = 64  # input columns per scale: 4 bytes of scale per 64 weights (+6% on int8, +12% on int4)
SCALE_SUFFIX = ".scale"


def compressible(name: str, tensor: torch.Tensor) -> bool:
    """A projection weight: 2-D, floating, its input width a whole number of groups."""
    return (name.endswith("weight") and tensor.dim() == 2 and tensor.is_floating_point()
            and tensor.shape[1] % GROUP == 0)


def quantize(weight: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: (out, in) → (q, scale): q int8 (out, in), or int4 packed as uint8 (out, in / 2);
    scale float32 (out, in / GROUP)."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // GROUP, GROUP)
    scale = groups.abs().amax(dim=-1) / QMAX[scheme]  # (out, in / GROUP)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
    q = torch.round(groups / safe[..., None]).clamp_(-QMAX[scheme], QMAX[scheme]).to(torch.int8)
    q = q.reshape(out_features, in_features)
    if scheme == "int4":
        q = pack_nibbles((q + 8).to(torch.uint8))  # 1..15: unsigned, so two fit a byte
    return q.contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, scheme: str, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize`, on q's device, in `dtype`: (out, in)."""
    if scheme == "int4":
        q = unpack_nibbles(q).to(torch.int8) - 8
    out_features, in_features = q.shape
    groups = q.reshape(out_features, in_features // GROUP, GROUP).float() * scale[..., None]
    return groups.reshape(out_features, in_features).to(dtype)


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 values below 16, (..., 2n) → (..., n): two to a byte, the even one low."""
    return values[..., 0::2] | (values[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: (..., n) → uint8 (..., 2n)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def quantize_groups(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise quantisation along the last dim, as FlexGen compresses its KV cache:
    per group of `group` values a minimum and a step = (max - min) / (2^bits - 1), each value's code
    round((x - min) / step). Unlike the weights' absmax scheme it spends no code on a sign, so a group
    whose values are not centred on zero (keys are not) keeps the full resolution.
    x: (..., d) → codes uint8 (..., d), or for 4 bits (..., d / 2) two to a byte; ranges (..., d / group, 2):
    (minimum, step) in x's dtype. Each value comes back within step / 2 (plus the step's rounding in x's dtype)."""
    top = (1 << bits) - 1
    groups = x.unflatten(-1, (x.shape[-1] // group, group))
    low = groups.amin(dim=-1, keepdim=True)
    step = ((groups.amax(dim=-1, keepdim=True) - low) / top).to(x.dtype)  # as stored: the codes follow it
    safe = torch.where(step > 0, step, torch.ones_like(step)).float()  # a constant group: every code 0
    # one float32 copy, worked in place (the planner counts one beside the cache in flight)
    codes = groups.to(torch.float32, copy=True).sub_(low).div_(safe).round_().clamp_(0, top).to(torch.uint8)
    codes = codes.flatten(-2)
    if bits == 4:
        codes = pack_nibbles(codes)
    return codes.contiguous(), torch.cat([low, step], dim=-1)


def dequantize_groups(codes: torch.Tensor, ranges: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `quantize_groups`, on codes' device, in the ranges' dtype: (..., d)."""
    if bits == 4:
        codes = unpack_nibbles(codes)
    low, step = ranges.float().unbind(-1)
    groups = codes.unflatten(-1, (ranges.shape[-2], -1)).float().mul_(step[..., None]).add_(low[..., None])
    return groups.flatten(-2).to(ranges.dtype)


def compress_layer(tensors: dict[str, torch.Tensor], scheme: str) -> dict[str, torch.Tensor]:
    """A decoder layer's tensors as stored: each compressible weight `name` becomes `name.<scheme>`
    (the integers) and `name.scale`; the rest unchanged."""
    out = {}
    for name, tensor in tensors.items():
        if compressible(name, tensor):
            out[f"{name}.{scheme}"], out[name + SCALE_SUFFIX] = quantize(tensor, scheme)
        else:
            out[name] = tensor
    return out


def decompress_layer(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The inverse of `compress_layer`, the weights in `dtype`; a layer without compressed
    tensors is returned as is."""
    compressed = {name.rpartition(".")[0]: name.rpartition(".")[2] for name in tensors
                  if name.rpartition(".")[2] in SCHEMES}
    scales = {base + SCALE_SUFFIX for base in compressed}
    out = {name: tensor for name, tensor in tensors.items()
           if name not in scales and name.rpartition(".")[0] not in compressed}
    for base, scheme in compressed.items():
        q, scale = tensors[f"{base}.{scheme}"], tensors[base + SCALE_SUFFIX]
        # fp8 / mxfp4: as the checkpoint shipped them (workers/quantized.py)
        out[base] = DEQUANTIZE[scheme](q, scale, dtype) if scheme in DEQUANTIZE else dequantize(q, scale, scheme, dtype)
    return out
