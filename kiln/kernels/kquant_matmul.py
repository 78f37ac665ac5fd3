"""GGUF K-quant matmul (Q4_K, Q5_K, Q6_K super-blocks read as stored) and its plain-torch twin.

Weights stay as the file stores them: uint8 [N, K / 256 * block bytes], each row the file's own
super-blocks of 256 weights (K must be a multiple of 256, as llama.cpp requires for these types):

  * Q4_K (144 bytes): fp16 d, fp16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of
    nibbles: byte l of 32-byte chunk c holds weight l of sub-block 2c (low) and of 2c+1 (high).
  * Q5_K (176 bytes): as Q4_K with 32 bytes of fifth bits after the scales (bit j of byte l: weight
    l of sub-block j) and the nibbles after them.
  * Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of two-bit highs, 16 signed 8-bit scales
    (one per 16 weights), fp16 d.

Per 32-weight sub-block j: Q4_K/Q5_K w = D_j * q - M_j (D_j = d * sc_j, M_j = dmin * m_j), Q6_K
w = d * (sc * (q - 32)). The twin writes every weight as `D * qe - M` with integer `qe` (Q6_K: its
scale folded in, D = d, M = 0): D * qe is exact in fp32, so `kquant_dequantize_reference` equals the
`gguf` library's dequantization bit for bit. The matmul quantizes activation rows per 32 to int16 as
kiln.kernels.quant_matmul does and takes exact integer dots per sub-block; the native kernel
(csrc/kquant_gemm.cpp) does the same arithmetic, differing only in float summation order.
"""

from __future__ import annotations

import torch

from kiln.kernels.native import load_native
from kiln.kernels.quant_matmul import (
    QK,
    quantize_activations_reference,
    use_native_quant,
)

QKK = 256
# the kernel's qtype codes and each type's super-block bytes
KQUANT_CODES = {"Q4_K": 0, "Q5_K": 1, "Q6_K": 2}
KQUANT_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
KQUANT_TYPES = frozenset(KQUANT_CODES)


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 12] packed scale bytes → (scales, mins) [..., 8] as int32."""
    s = s.to(torch.int32)
    sc = torch.cat((s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)), dim=-1)
    mn = torch.cat((s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)), dim=-1)
    return sc, mn


def _fp16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] little-endian bytes → fp32 [...] of the fp16 they hold."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def kquant_unpack(w: torch.Tensor, qtype: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw super-blocks uint8 [N, K/256 * bytes] → (qe int32 [N, K/32, 32], D fp32 [N, K/32], M fp32 [N, K/32])
    with weight = D * qe - M (see the module docstring)."""
    n = w.shape[0]
    sb = w.reshape(n, k // QKK, KQUANT_BYTES[qtype]).to(torch.int32)
    if qtype == "Q6_K":
        ql, qh = sb[..., 0:128], sb[..., 128:192]
        sc = w.reshape(n, k // QKK, 210)[..., 192:208].contiguous().view(torch.int8).to(torch.int32)
        d = _fp16(w.reshape(n, k // QKK, 210)[..., 208:210])
        ql, qh = ql.reshape(n, -1, 2, 64), qh.reshape(n, -1, 2, 32)  # two halves of 128 weights
        # sub-block k of a half: nibble k // 2 of ql bytes 32 * (k % 2) ..., bits 2k of its 32 qh bytes
        lo = torch.stack((ql & 0x0F, ql >> 4), dim=3).reshape(n, -1, 2, 4, 32)
        hi = torch.stack([(qh >> (2 * kk)) & 3 for kk in range(4)], dim=3)
        q = lo | (hi << 4)  # [n, s, half, k, l]
        qe = (q - 32).reshape(n, -1, 16, 16) * sc.unsqueeze(-1)  # 16-weight scales
        nb = k // QK
        return qe.reshape(n, nb, QK), d.repeat_interleave(8, dim=1), torch.zeros(n, nb)
    d, dmin = _fp16(w.reshape(n, -1, KQUANT_BYTES[qtype])[..., 0:2]), _fp16(w.reshape(n, -1, KQUANT_BYTES[qtype])[..., 2:4])
    sc, mn = _k4_scales(sb[..., 4:16])
    qs = sb[..., 16:144] if qtype == "Q4_K" else sb[..., 48:176]
    q = torch.stack((qs.reshape(n, -1, 4, 32) & 0x0F, qs.reshape(n, -1, 4, 32) >> 4), dim=3).reshape(n, -1, 8, 32)
    if qtype == "Q5_K":
        qh = sb[..., 16:48]  # [n, s, 32]
        q = q | (torch.stack([(qh >> j) & 1 for j in range(8)], dim=2) << 4)
    D = d.unsqueeze(-1) * sc.float()  # exact: an fp16 times a 6-bit integer
    M = dmin.unsqueeze(-1) * mn.float()
    return q.reshape(n, -1, QK), D.reshape(n, -1), M.reshape(n, -1)


def kquant_dequantize_reference(w: torch.Tensor, qtype: str, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense W [N, K]: the gguf library's values (D * qe is exact, then one rounding for - M)."""
    qe, D, M = kquant_unpack(w, qtype, k)
    return (D.unsqueeze(-1) * qe.float() - M.unsqueeze(-1)).reshape(w.shape[0], k).to(dtype)


def kquant_matmul_reference(x: torch.Tensor, w: torch.Tensor, qtype: str) -> torch.Tensor:
    """y [M, N] = x @ W^T with int16-quantized activation blocks (the kernel's arithmetic)."""
    k = x.shape[1]
    qe, D, M = kquant_unpack(w, qtype, k)
    xq, dx = quantize_activations_reference(x)  # [M, nb, 32], [M, nb]
    isum = torch.einsum("mbj,nbj->mnb", xq.double(), qe.double()).float()  # exact integers (< 2**31)
    y = (isum * D.unsqueeze(0) * dx.unsqueeze(1)).sum(-1)
    y = y - (dx * xq.sum(-1)) @ M.t()
    return y.to(x.dtype)


def kquant_matmul_panels_reference(x: torch.Tensor, w: torch.Tensor, qtype: str) -> torch.Tensor:
    """What the panel kernel computes (up to summation order): x @ dequantize(W)^T in fp32."""
    return x.float() @ kquant_dequantize_reference(w, qtype, x.shape[1]).t()


# ---- dispatchers -------------------------------------------------------------------------------
def kquant_matmul(x: torch.Tensor, w: torch.Tensor, qtype: str) -> torch.Tensor:
    if use_native_quant(x):
        return torch.ops.kiln.kquant_matmul(x, w, KQUANT_CODES[qtype])
    return kquant_matmul_reference(x, w, qtype)


def kquant_matmul_panels(x: torch.Tensor, w: torch.Tensor, qtype: str) -> torch.Tensor:
    if use_native_quant(x) and x.dtype == torch.float32:
        return torch.ops.kiln.kquant_matmul_panels(x, w, KQUANT_CODES[qtype])
    return kquant_matmul_panels_reference(x, w, qtype)


def kquant_dequantize(w: torch.Tensor, qtype: str, k: int, dtype: torch.dtype) -> torch.Tensor:
    if w.device.type == "cpu" and load_native():
        return torch.ops.kiln.kquant_dequantize(w, k, KQUANT_CODES[qtype], dtype)
    return kquant_dequantize_reference(w, qtype, k, dtype)
