"""Block-quantized weight matmul (GGUF Q4_0 / Q4_1 / Q8_0 layouts) and its plain-torch twin.

Packed layout (what `kiln.layers.gguf_quant` produces at load, and the kernel reads):
  * Q4: `qs` uint8 [N, ceil(K/64), 32], each row's blocks in chunks of 16 (`CHUNK_BLOCKS`)
    followed by a tail of the remaining nb % 16 blocks. Chunk c is 256 bytes, 8 groups of 32: byte
    2j + h of group g holds element 2g + h of the chunk's block j in its low nibble and element
    2g + 16 + h in its high nibble. Zero-extended to int16, a group's two nibble planes are two
    vectors whose int32 lane j is a pair of elements of block j, so an integer dot product over
    the chunk accumulates every block in its own lane and one float multiply-add per 16 blocks
    applies the scales (csrc/quant_gemm.cpp). The tail keeps the pair layout: byte j of pair p
    holds element j of tail block 2p (low nibble) and of tail block 2p+1 (high nibble; zero past
    the last block). `d`, `m` float16 [N, K/32]; w = d * q + m, q in [0, 15]. (GGUF Q4_0 is
    stored with m = -8 d, so one kernel serves both.)
  * Q8: `qs` int8 [N, K]; `d` float16 [N, K/32]; w = d * q. `m` is unused (pass an empty tensor).
  * Q5 (GGUF Q5_0): the pair layout (as the Q4 tail, for every block) for the low four bits,
    `d` / `m` with m = -16 d, plus `qh`
    int32 [N, K/32] whose bit j is bit 4 of element j: w = d * (q + 16 h) + m (exact, as Q4_0's -8 d).
Scales stay float16 as in GGUF, so the repack is exact and the weights take 20 (Q4) or 34 (Q8)
bytes per 32, like the file.

The matmul quantizes each activation row per 32-block to int16 (scale max|x| / 32767, rounding
half away from zero; int8 with `set_activation_bits(8)`) and does exact integer block dot products, like the reference below;
results differ from the reference only by float summation order. (int16 rather than llama.cpp's
int8 activations: same weight bytes, ~1e-5 instead of ~3e-3 nats of KL on the default model.)
"""

from __future__ import annotations


import torch

from kiln.kernels import switches
from kiln.kernels.native import load_native

QK = 32
ACTIVATION_QMAX = {16: 32767.0, 8: 127.0}  # activation bits → the quantization's largest level
_activation_bits = 16


def set_activation_bits(bits: int) -> None:
    """Quantize activation blocks to `bits` in every native kernel of this process and in the twins below.

    16 is what kiln runs. 8 is llama.cpp's choice, kept here as a measured alternative, not an engine option:
    the chunked Q4 kernel then multiplies 4 bytes per int32 lane with vpdpbusd (AVX512-VNNI), 1.1x faster
    at one row and 1.2-1.3x at 9 (in-cache, this machine), but single-stream decode measured no faster
    (it is bound by streaming the weights), it costs 2.8e-3 nats of KL on the default model (16 bits:
    < 1e-6), and speculative verification is only lossless when every verification row runs on the block
    kernel, since the panel and dense paths compute in fp32 (README, "int8 activations")."""
    global _activation_bits
    if bits not in ACTIVATION_QMAX:
        raise ValueError(f"activation bits must be 8 or 16, got {bits!r}")
    if load_native():
        torch.ops.kiln.set_activation_bits(bits)
    _activation_bits = bits


def activation_bits() -> int:
    """The activation quantization's bits now in force (16 unless `set_activation_bits` said 8)."""
    return _activation_bits


def use_native_quant(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and switches.active().quant_kernels and load_native()


# ---- references --------------------------------------------------------------------------------
CHUNK_BLOCKS = 16  # blocks per chunk of the Q4 layout (one int32 lane per block in a 512-bit vector)


def unpack_q4_pairs(qs: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """uint8 [N, P, 32] pair-interleaved → uint8 [N, num_blocks * 32] of 4-bit values in element order."""
    n, pairs, _ = qs.shape
    both = torch.stack((qs & 0x0F, qs >> 4), dim=2)  # [N, P, 2, 32]: block 2p, block 2p+1
    return both.reshape(n, pairs * 2 * QK)[:, : num_blocks * QK]


def pack_q4_pairs(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, nb, 32] of 4-bit values → the pair-interleaved uint8 [N, ceil(nb/2), 32]."""
    n, nb, _ = q.shape
    if nb % 2:
        q = torch.cat((q, torch.zeros(n, 1, QK, dtype=q.dtype)), dim=1)
    q = q.view(n, -1, 2, QK)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).contiguous()


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, nb, 32] of 4-bit values → the chunked Q4 layout uint8 [N, ceil(nb/2), 32] (module docstring)."""
    n, nb, _ = q.shape
    full = nb // CHUNK_BLOCKS * CHUNK_BLOCKS
    parts = []
    if full:
        c = q[:, :full].reshape(n, full // CHUNK_BLOCKS, CHUNK_BLOCKS, QK)  # [N, C, j, e]
        lo = c[..., : QK // 2].reshape(n, -1, CHUNK_BLOCKS, 8, 2)  # element 2g + h → [N, C, j, g, h]
        hi = c[..., QK // 2:].reshape(n, -1, CHUNK_BLOCKS, 8, 2)  # element 2g + 16 + h
        parts.append((lo | (hi << 4)).permute(0, 1, 3, 2, 4).reshape(n, -1, QK))  # [N, C * 8, 32]: g, j, h
    if nb > full:
        parts.append(pack_q4_pairs(q[:, full:]))
    return torch.cat(parts, dim=1).contiguous()


def unpack_q4(qs: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The chunked Q4 layout uint8 [N, P, 32] → uint8 [N, num_blocks * 32] of 4-bit values in element order."""
    n = qs.shape[0]
    full = num_blocks // CHUNK_BLOCKS * CHUNK_BLOCKS
    parts = []
    if full:
        g = qs[:, : full // 2].reshape(n, -1, 8, CHUNK_BLOCKS, 2).permute(0, 1, 3, 2, 4)  # [N, C, j, g, h]
        block = torch.cat(((g & 0x0F).reshape(n, -1, CHUNK_BLOCKS, QK // 2),
                           (g >> 4).reshape(n, -1, CHUNK_BLOCKS, QK // 2)), dim=-1)  # [N, C, j, 32]
        parts.append(block.reshape(n, full * QK))
    if num_blocks > full:
        parts.append(unpack_q4_pairs(qs[:, full // 2:], num_blocks - full))
    return torch.cat(parts, dim=1)


def dequantize_reference(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor, is_q4: bool,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense W [N, K] from the packed form."""
    n, nb = d.shape
    if is_q4:
        q = unpack_q4(qs.view(n, -1, QK), nb).float().view(n, nb, QK)
        w = q * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)
    else:
        w = qs.view(n, nb, QK).float() * d.float().unsqueeze(-1)
    return w.reshape(n, nb * QK).to(dtype)


def unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """int32 [N, nb] of Q5 high-bit words → uint8 [N, nb, 32] of 0 / 1 (element j: bit j)."""
    bits = torch.arange(QK, dtype=torch.int64)
    return ((qh.to(torch.int64).unsqueeze(-1) >> bits) & 1).to(torch.uint8)


def dequantize_q5_reference(qs: torch.Tensor, qh: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense W [N, K] from the Q5 layout."""
    n, nb = d.shape
    q = unpack_q4_pairs(qs.view(n, -1, QK), nb).view(n, nb, QK).float() + 16.0 * unpack_high_bits(qh).float()
    w = q * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)
    return w.reshape(n, nb * QK).to(dtype)


def quantize_activations_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → (int16 (or int8, see `set_activation_bits`) values [M, K/32, 32] as float, per-block
    scale dx [M, K/32])."""
    m_rows, k = x.shape
    xb = x.float().view(m_rows, k // QK, QK)
    dx = xb.abs().amax(-1) / ACTIVATION_QMAX[_activation_bits]
    inv = torch.where(dx > 0, 1.0 / dx, torch.zeros_like(dx))
    v = xb * inv.unsqueeze(-1)
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)  # round half away from zero, like std::round
    return q, dx


def quant_matmul_reference(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                           is_q4: bool) -> torch.Tensor:
    """y [M, N] = x @ W^T with int16-quantized activation blocks (the kernel's arithmetic)."""
    n, nb = d.shape
    xq, dx = quantize_activations_reference(x)  # [M, nb, 32], [M, nb]
    wq = unpack_q4(qs.view(n, -1, QK), nb).double().view(n, nb, QK) if is_q4 else qs.view(n, nb, QK).double()
    isum = torch.einsum("mbj,nbj->mnb", xq.double(), wq).float()  # exact integers (< 2**31), as in the kernel
    y = (isum * d.float().unsqueeze(0) * dx.unsqueeze(1)).sum(-1)
    if is_q4:
        sx = dx * xq.sum(-1)  # [M, nb]
        y = y + sx @ m.float().t()
    return y.to(x.dtype)


def quant_matmul_q5_reference(x: torch.Tensor, qs: torch.Tensor, qh: torch.Tensor, d: torch.Tensor,
                              m: torch.Tensor) -> torch.Tensor:
    """The Q5 layout's y = x @ W^T with int16-quantized activation blocks (the kernel's arithmetic)."""
    n, nb = d.shape
    xq, dx = quantize_activations_reference(x)
    wq = unpack_q4_pairs(qs.view(n, -1, QK), nb).double().view(n, nb, QK) + 16.0 * unpack_high_bits(qh).double()
    isum = torch.einsum("mbj,nbj->mnb", xq.double(), wq).float()
    y = (isum * d.float().unsqueeze(0) * dx.unsqueeze(1)).sum(-1)
    y = y + (dx * xq.sum(-1)) @ m.float().t()
    return y.to(x.dtype)


# ---- dispatchers -------------------------------------------------------------------------------
def quant_matmul(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor, is_q4: bool) -> torch.Tensor:
    if use_native_quant(x):
        return torch.ops.kiln.quant_matmul(x, qs, d, m, is_q4)
    return quant_matmul_reference(x, qs, d, m, is_q4)


def quant_matmul_panels_reference(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                                  is_q4: bool) -> torch.Tensor:
    """y [M, N] = x @ dequantize(W)^T in fp32 (what the panel kernel computes, up to summation order)."""
    return x.float() @ dequantize_reference(qs, d, m, is_q4, torch.float32).t()


def quant_matmul_panels(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                        is_q4: bool) -> torch.Tensor:
    """fp32 x [M, K] (medium M: batched decode) @ W^T with W dequantized panel by panel in L1:
    no resident fp32 copy, and faster than torch's GEMM on these shapes (benchmarks/quant_kernels.py)."""
    if use_native_quant(x) and x.dtype == torch.float32:
        return torch.ops.kiln.quant_matmul_panels(x, qs, d, m, is_q4)
    return quant_matmul_panels_reference(x, qs, d, m, is_q4)


def dequantize(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor, is_q4: bool, dtype: torch.dtype) -> torch.Tensor:
    if d.device.type == "cpu" and load_native():
        return torch.ops.kiln.quant_dequantize(qs, d, m, is_q4, dtype)
    return dequantize_reference(qs, d, m, is_q4, dtype)


def quant_matmul_q5(x: torch.Tensor, qs: torch.Tensor, qh: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    if use_native_quant(x):
        return torch.ops.kiln.quant_matmul_q5(x, qs, qh, d, m)
    return quant_matmul_q5_reference(x, qs, qh, d, m)


def quant_matmul_panels_q5(x: torch.Tensor, qs: torch.Tensor, qh: torch.Tensor, d: torch.Tensor,
                           m: torch.Tensor) -> torch.Tensor:
    if use_native_quant(x) and x.dtype == torch.float32:
        return torch.ops.kiln.quant_matmul_panels_q5(x, qs, qh, d, m)
    return x.float() @ dequantize_q5_reference(qs, qh, d, m, torch.float32).t()


def dequantize_q5(qs: torch.Tensor, qh: torch.Tensor, d: torch.Tensor, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if d.device.type == "cpu" and load_native():
        return torch.ops.kiln.quant_dequantize_q5(qs, qh, d, m, dtype)
    return dequantize_q5_reference(qs, qh, d, m, dtype)
