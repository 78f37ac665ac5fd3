"""Run-time side of kiln's own quantized weight formats: unpack, dequantize, quantize activations per token.

The layout (written offline by kiln.quantization, read at load time by kiln.layers.quant_linear):

    w[n, k] ≈ (code[n, k] - zero[n, g]) * scale[n, g],   g = k // group_size

with unsigned codes in [0, 2**bits - 1], `scale` fp16 and `zero` an integer in the same range. When
the group size does not divide K the last group is shorter: there are ceil(K / group_size) groups; a
group size of -1 is one group per row. INT4 codes are packed two per byte (even column in the low
nibble). FP8 E4M3 weights keep a per-output-channel fp32 scale.

Plain torch, no state: both the layers (at run time) and the offline quantizers (to check what a
stored weight computes) call these.
"""

from __future__ import annotations

import torch


def grouped(t: torch.Tensor, group_len: int) -> torch.Tensor:
    """[N, K] → [N, ceil(K / group_len), group_len], zero-padding a short last group (zeros never widen a range)."""
    n, k = t.shape
    groups = -(-k // group_len)
    if groups * group_len != k:
        t = torch.nn.functional.pad(t, (0, groups * group_len - k))
    return t.reshape(n, groups, group_len)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes - zero) * scale per group of `group_size` columns (-1: per row) → [N, K] in `dtype`."""
    n, k = codes.shape
    q = grouped(codes.float(), k if group_size == -1 else group_size) - zero.float().unsqueeze(-1)
    return (q * scale.float().unsqueeze(-1)).reshape(n, -1)[:, :k].to(dtype)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] bytes → [N, K] codes (inverse of kiln.quantization.primitives.pack_int4)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric INT8 of activations, one scale per row: (int8 [M, K], scale fp32 [M, 1])."""
    scale = (x.float().abs().amax(-1, keepdim=True) / 127.0).clamp(min=1e-8)
    q = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale
