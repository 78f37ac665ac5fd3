"""GGUF types that kiln's native block kernels run after a repack at load: Q4_K → Q4_1, and Q5_0 → Q8_0 in a
layer that mixes it with Q8_0 shards (a layer of Q5_0 only keeps 5 bits: kiln.layers.gguf_q5).

Both are what llama.cpp's Q4_K_M files hold besides Q8_0 and Q6_K (Gemma 3 270M: 81 Q5_0 and 27
Q4_K matrices). The kernels (kiln.kernels.quant_matmul) read 32-weight blocks with fp16 scales:

- Q5_0 (w = d * (q - 16), q in 0..31, fp16 d per 32 weights) is Q8_0 with int8 q - 16: exact,
  at 34 instead of 22 bytes per block.
- Q4_K super-blocks (256 weights: fp16 d and dmin, eight 6-bit scales and mins, 4-bit q) hold
  w = d * sc_j * q - dmin * m_j per 32-weight sub-block j: Q4_1 (w = d1 * q + m1) with
  d1 = d * sc_j and m1 = -dmin * m_j. Those products are rounded to fp16 (a relative error of at
  most 2^-11 of a block's scale, about 1/16 of one 4-bit step), so this repack is *not* bit-exact;
  tests/test_gguf_repack.py bounds it against the `gguf` library's dequantization. 20 instead of
  18 bytes per 32 weights.

Q6_K and Q5_K are not repacked: their layers run on the K-quant super-block kernels as stored
(kiln.layers.kquant_linear; an exact Q4_K kernel exists there too, but measured slower than this
repack: benchmarks/results/kquant_kernels.json). Q2_K, Q3_K and the other types are dequantized at
load (`kiln info` says which path each layer takes).
"""

from __future__ import annotations

import numpy as np

# source GGUF type → (the native type it becomes, source bytes per block, weights per source block)
REPACKED = {"Q5_0": ("Q8_0", 22, 32), "Q4_K": ("Q4_1", 144, 256)}


def repack_target(qtype: str) -> str:
    """The native block type `qtype` runs as (itself when it is not repacked)."""
    return REPACKED[qtype][0] if qtype in REPACKED else qtype


def repack(qtype: str, raw: np.ndarray) -> np.ndarray:
    """Raw blocks uint8 [rows, row bytes] of `qtype` → the same weights as raw blocks of `repack_target(qtype)`."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, REPACKED[qtype][1])
    out = _q5_0_to_q8_0(blocks) if qtype == "Q5_0" else _q4_k_to_q4_1(blocks)
    return out.reshape(rows, -1)


def _q5_0_to_q8_0(b: np.ndarray) -> np.ndarray:
    """[rows, nb, 22] Q5_0 blocks → [rows, nb, 34] Q8_0 blocks (exact)."""
    qh = b[..., 2:6].copy().view("<u4")  # [rows, nb, 1]: bit j is the fifth bit of weight j
    qs = b[..., 6:22]
    low = np.concatenate((qs & 0x0F, qs >> 4), axis=-1).astype(np.int16)  # weights 0..15, then 16..31
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)
    q = (low | (high << 4)) - 16
    out = np.empty(b.shape[:-1] + (34,), dtype=np.uint8)
    out[..., 0:2] = b[..., 0:2]  # the same fp16 d
    out[..., 2:] = q.astype(np.int8).view(np.uint8)
    return out


def _k4_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs packed in a Q4_K super-block's 12 scale bytes → [..., 8] each."""
    s = scales.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _q4_k_to_q4_1(b: np.ndarray) -> np.ndarray:
    """[rows, nsb, 144] Q4_K super-blocks → [rows, nsb * 8, 20] Q4_1 blocks (scales rounded to fp16)."""
    rows, nsb = b.shape[:2]
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)  # [rows, nsb, 1]
    dmin = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = _k4_scales(b[..., 4:16])
    qs = b[..., 16:144].reshape(rows, nsb, 4, 32)  # four 64-weight chunks: low nibbles first, then high
    q = np.stack((qs & 0x0F, qs >> 4), axis=3).reshape(rows, nsb, 8, 32)  # sub-block j = 2 * chunk + half
    out = np.empty((rows, nsb, 8, 20), dtype=np.uint8)
    out[..., 0:2] = (d * sc).astype(np.float16).view(np.uint8).reshape(rows, nsb, 8, 2)
    out[..., 2:4] = (-dmin * mn).astype(np.float16).view(np.uint8).reshape(rows, nsb, 8, 2)
    out[..., 4:] = q[..., :16] | (q[..., 16:] << 4)  # Q4_1 byte i: weight i | weight i + 16 << 4
    return out.reshape(rows, nsb * 8, 20)
