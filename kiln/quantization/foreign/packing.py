"""Integer codes packed into int32 words, as the GPTQ, AutoAWQ and compressed-tensors formats store them.

All three put element j of a word at bits [j·b, (j+1)·b) (b = 4 or 8, so 32/b elements per word,
little end first); they differ in the axis packed along and, for AutoAWQ, in the order of the
elements inside a word (`AWQ_ORDER`). Codes here are unsigned, in [0, 2**b - 1].
"""

from __future__ import annotations

import torch

# AutoAWQ's GEMM layout: nibble i of a word holds column AWQ_ORDER[i] of its 8-column group (an order
# its CUDA kernel's dequantization wants); AWQ_COLUMN_NIBBLE is the inverse: column j sits in nibble AWQ_COLUMN_NIBBLE[j].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_COLUMN_NIBBLE = tuple(AWQ_ORDER.index(j) for j in range(8))


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words → uint8 codes, the packed axis `dim` (0 or 1) growing 32/bits times."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed tensor must be int32, got {packed.dtype}")
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=packed.device)
    words = packed.to(torch.int64) & 0xFFFFFFFF  # the sign bit is just the top element's high bit
    if dim == 0:
        codes = (words.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)
        return codes.reshape(-1, packed.shape[1]).to(torch.uint8)
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """uint8 codes → int32 words along `dim` (its length a multiple of 32/bits); inverse of unpack_int32."""
    per = 32 // bits
    c = codes.to(torch.int64)
    if dim == 0:
        if c.shape[0] % per:
            raise ValueError(f"dim 0 ({c.shape[0]}) is not a multiple of {per}")
        c = c.reshape(-1, per, c.shape[1]).transpose(1, 2)  # [words, cols, per]
        words = (c << torch.arange(0, 32, bits, dtype=torch.int64)).sum(-1)
    else:
        if c.shape[1] % per:
            raise ValueError(f"dim 1 ({c.shape[1]}) is not a multiple of {per}")
        words = (c.reshape(c.shape[0], -1, per) << torch.arange(0, 32, bits, dtype=torch.int64)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def awq_unorder(codes: torch.Tensor) -> torch.Tensor:
    """Codes unpacked from AutoAWQ words (nibble order within each 8) → columns in natural order."""
    idx = torch.tensor(AWQ_COLUMN_NIBBLE, device=codes.device)
    n = codes.shape[-1]
    return codes.reshape(*codes.shape[:-1], n // 8, 8)[..., idx].reshape(codes.shape)


def awq_order(codes: torch.Tensor) -> torch.Tensor:
    """Natural column order → AutoAWQ's nibble order (inverse of awq_unorder)."""
    idx = torch.tensor(AWQ_ORDER, device=codes.device)
    n = codes.shape[-1]
    return codes.reshape(*codes.shape[:-1], n // 8, 8)[..., idx].reshape(codes.shape)
