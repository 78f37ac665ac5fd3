"""GGUF K-quant quantizers (Q4_K, Q5_K, Q6_K): float rows → the bytes GGUF stores, all super-blocks at once.

The `gguf` library only *de*quantizes K-quants; these write them. The fitting follows what llama.cpp's
reference quantizer (`quantize_row_q*_K_ref` in ggml-quants.c, the path `llama-quantize` takes without an
importance matrix) does, re-derived and vectorized over every super-block with torch:

Q4_K / Q5_K (super-block of 256 = 8 sub-blocks of 32; value = d·sc_j·q − dmin·m_j, q in [0, 2^b − 1]):
  1. per sub-block, weights w_i = rms(sub-block) + |x_i|; start from min = min(x, 0), scale = (max − min)/nmax;
  2. try candidate inverse scales (nmax + rmin + k·rdelta)/(max − min), k = 0..nstep (Q4_K: rmin −1,
     20 steps; Q5_K: −0.5, 15 steps, rdelta 0.1); round x to levels with each, solve the 2×2 weighted least
     squares for (scale, min) on those levels (min clamped to ≤ 0: the format stores −min ≥ 0), keep the
     candidate with the smallest weighted squared error;
  3. per super-block, d = max scale / 63 and dmin = max(−min) / 63 (fp16); sub-block scales and mins
     become 6-bit integers of them; the levels are re-rounded against the fp16/6-bit-rounded scales.
Q6_K (super-block of 256 = 16 sub-blocks of 16; value = d·sc_j·(q − 32), sc_j int8, q 6-bit):
  1. per sub-block, with weights x_i², start from scale = −max_abs_signed/32 and try inverse scales
     −(32 + 0.1·k)/max, k = −9..9, each followed by the weighted least-squares scale Σwxl/Σwl² of its
     levels; keep the one that maximises (Σwxl)²/Σwl² (= minimises the weighted error);
  2. d = scale of the sub-block with the largest |scale| / −128 (fp16); sub-block scales int8 of it;
     levels re-rounded against d·sc_j.
`search=False` keeps only each step 1's starting point (plain round-to-nearest of the same format): the
baseline the tests compare the search against.

Byte layouts (per super-block, little-endian) as GGUF stores them, checked by `gguf.quants.dequantize`:
  Q4_K (144 B): d f16, dmin f16, scales[12], qs[128]
  Q5_K (176 B): d f16, dmin f16, scales[12], qh[32], qs[128]
  Q6_K (210 B): ql[128], qh[64], scales[16] int8, d f16
The 12 scale bytes of Q4_K/Q5_K pack eight 6-bit (scale, min) pairs: bytes 0-3 / 4-7 hold the low 6 bits
of scales / mins 0-3 and, in their top 2 bits, the high 2 bits of scales / mins 4-7; bytes 8-11 hold the
low 4 bits of scale (low nibble) and min (high nibble) 4-7. Quants of Q4_K/Q5_K go in 64-value chunks:
byte l of a chunk's 32 holds value l (low nibble) and value l + 32 (high nibble); Q5_K's fifth bits sit
in qh[l], bit 2c / 2c + 1 for chunk c. Q6_K: per 128-value half, ql[l] = low nibbles of values l / l + 64,
ql[l + 32] = those of l + 32 / l + 96, qh[l] = the four values' high 2 bits at shifts 0, 2, 4, 6.

Rounding is round-half-to-even, like llama.cpp's `nearest_int`; sums run left to right in float32 and the
candidate scales are rounded in float32, as the C loops compute them, because the searches keep the first
of near-equal candidates. The bytes then equal llama.cpp's reference quantizer's in 99.8-100 % of
super-blocks (tests/convert/test_kquant_quantize.py; the default model: Q6_K all, Q4_K/Q5_K all but ~30 of
3.5 M blocks): the rest are near-ties its compiled arithmetic (fused multiply-adds) breaks the other way.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_CHUNK = 8192  # super-blocks per pass: temporaries stay a few MB (cache-friendly) yet each op is large
_EPS = 1e-15  # below this a Q6_K sub-block is all zero (llama.cpp's GROUP_MAX_EPS)


def quantize_kquant(data: np.ndarray | torch.Tensor, qtype: str, search: bool = True) -> np.ndarray:
    """Rows [..., n] (n a multiple of 256) → uint8 [..., n / 256 · block bytes] in GGUF's layout of `qtype`
    ('Q4_K', 'Q5_K' or 'Q6_K'), the shape `gguf.quants.quantize` returns for the other types."""
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"no K-quant quantizer for {qtype!r} (have {', '.join(BLOCK_BYTES)})")
    x = torch.as_tensor(np.asarray(data, dtype=np.float32) if isinstance(data, np.ndarray) else data)
    x = x.detach().to("cpu", torch.float32)
    if x.ndim < 1 or x.shape[-1] % QK_K:
        raise ValueError(f"{qtype} needs rows that are a whole number of {QK_K}-value super-blocks, "
                         f"got shape {tuple(x.shape)}")
    lead, n = tuple(x.shape[:-1]), x.shape[-1]
    blocks = x.reshape(-1, QK_K)
    fn = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}[qtype]
    out = torch.empty(blocks.shape[0], BLOCK_BYTES[qtype], dtype=torch.uint8)
    # One torch thread: the ops are small and memory-bound, and on a shared CPU two OpenMP workers wait on
    # each other at every op (two threads measured 7-50x slower than one on the shared 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, blocks.shape[0], _CHUNK):
            out[start:start + _CHUNK] = fn(blocks[start:start + _CHUNK].contiguous(), search)
    finally:
        torch.set_num_threads(threads)
    return out.reshape(*lead, n // QK_K * BLOCK_BYTES[qtype]).numpy()


# ----------------------------------------------------------------------------- Q4_K / Q5_K

def _ordered_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim, left to right, in float32 ([n, k] → [n, 1]): the order of the reference's C
    loops. The search keeps the first of near-equal candidates, so a different summation order (torch's
    pairwise one) picks a neighbouring candidate in a few percent of sub-blocks: same error, other bytes."""
    cols = t.t().contiguous()
    acc = cols[0].clone()
    for col in cols[1:]:
        acc += col
    return acc.unsqueeze(-1)


def _f32_step(rmin: float, rdelta: float, k: int, nmax: int) -> torch.Tensor:
    """rmin + rdelta·k + nmax rounded at each step in float32, as the C reference computes it: in double the
    candidate can differ in its last bit, which moves near-tie values to the other level."""
    one = torch.tensor
    return (one(rmin, dtype=torch.float32) + one(rdelta, dtype=torch.float32) * k) + nmax


def _fit_scale_min(x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                   search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-blocks x [n, 32] → (scale ≥ 0, m ≥ 0) [n] with x ≈ scale·q − m, q in [0, nmax] (step 1-2 above)."""
    w = (_ordered_sum(x * x) / x.shape[-1]).sqrt() + x.abs()
    hi = x.amax(-1, keepdim=True)
    minv = x.amin(-1, keepdim=True).clamp(max=0)
    flat = hi == minv  # constant sub-block (≤ 0): scale 0, the min carries the value
    span = torch.where(flat, torch.ones_like(hi), hi - minv)
    levels = torch.round(nmax / span * (x - minv)).clamp_(0, nmax)
    scale = span / nmax
    err = _ordered_sum(w * (scale * levels + minv - x).square())
    if search:
        sw = _ordered_sum(w)
        sx = _ordered_sum(w * x)
        for k in range(nstep + 1):
            # the candidate grid follows the best min so far (as llama.cpp's search does): a fit that
            # lowered the min re-centres the next candidates on it
            span = torch.where(flat, torch.ones_like(hi), hi - minv)
            levels = torch.round(_f32_step(rmin, rdelta, k, nmax) / span * (x - minv)).clamp_(0, nmax)
            wl = w * levels
            sl = _ordered_sum(wl)
            sl2 = _ordered_sum(wl * levels)
            sxl = _ordered_sum(wl * x)
            det = sw * sl2 - sl * sl
            cand_scale = (sw * sxl - sx * sl) / det
            cand_min = (sl2 * sx - sl * sxl) / det
            # the format stores −min ≥ 0: a positive min is pinned to 0 and the scale refit alone
            pinned = cand_min > 0
            cand_scale = torch.where(pinned, sxl / sl2, cand_scale)
            cand_min = torch.where(pinned, torch.zeros_like(cand_min), cand_min)
            cand_err = _ordered_sum(w * (cand_scale * levels + cand_min - x).square())
            better = (det > 0) & (cand_err < err)
            scale = torch.where(better, cand_scale, scale)
            minv = torch.where(better, cand_min, minv)
            err = torch.where(better, cand_err, err)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale.squeeze(-1), (0.0 - minv).squeeze(-1)  # 0 − (−0.0) = +0.0: no negative-zero dmin


def _six_bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per super-block [B, 8] non-negative values → (fp16 step [B], 6-bit integers [B, 8]) with step = max/63."""
    top = values.amax(-1, keepdim=True)
    inv = torch.where(top > 0, 63 / top, torch.zeros_like(top))
    ints = torch.round(inv * values).clamp_(0, 63)
    return (top / 63).to(torch.float16).squeeze(-1), ints.to(torch.uint8)


def _pack_scales_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins per super-block [B, 8] → the 12 bytes [B, 12] of Q4_K/Q5_K."""
    out = torch.empty(sc.shape[0], 12, dtype=torch.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _levels_k4(x: torch.Tensor, search: bool, nmax: int, rmin: float, nstep: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Super-blocks x [B, 256] → (d f16 [B], dmin f16 [B], scale bytes [B, 12], levels uint8 [B, 256])."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    scale, mins = _fit_scale_min(sub, nmax, rmin, 0.1, nstep, search)
    d, sc = _six_bit(scale.reshape(nb, 8))
    dmin, mn = _six_bit(mins.reshape(nb, 8))
    step = (d.float()[:, None] * sc.float()).reshape(-1, 1)
    offset = (dmin.float()[:, None] * mn.float()).reshape(-1, 1)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    levels = torch.round((sub + offset) / safe).clamp_(0, nmax)
    levels = torch.where(step == 0, torch.zeros_like(levels), levels)  # d·sc = 0: the level is irrelevant
    return d, dmin, _pack_scales_k4(sc, mn), levels.to(torch.uint8).reshape(nb, QK_K)


def _nibbles(levels: torch.Tensor) -> torch.Tensor:
    """Levels [B, 256] (low 4 bits used) → [B, 128]: per 64-chunk, byte l = value l | value l+32 << 4."""
    chunks = (levels & 15).reshape(-1, 4, 2, 32)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(-1, 128)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.contiguous().view(torch.uint8).reshape(-1, 2)


def _q4_k(x: torch.Tensor, search: bool) -> torch.Tensor:
    d, dmin, scales, levels = _levels_k4(x, search, 15, -1.0, 20)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), scales, _nibbles(levels)], dim=1)


def _q5_k(x: torch.Tensor, search: bool) -> torch.Tensor:
    d, dmin, scales, levels = _levels_k4(x, search, 31, -0.5, 15)
    high = (levels >> 4).reshape(-1, 4, 2, 32)  # chunk c, half h → bit 2c + h of qh[l]
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 4, 2, 1)
    qh = (high << shifts).sum(dim=(1, 2), dtype=torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), scales, qh, _nibbles(levels)], dim=1)


# ----------------------------------------------------------------------------- Q6_K

def _fit_signed_scale(x: torch.Tensor, search: bool) -> torch.Tensor:
    """Sub-blocks x [n, 16] → signed scale [n] with x ≈ scale·l, l in [−32, 31] (step 1 of Q6_K above)."""
    idx = x.abs().argmax(-1, keepdim=True)
    peak = x.gather(-1, idx)
    peak = torch.where(peak == 0, torch.ones_like(peak), peak)  # all-zero rows: any scale, zeroed later
    if not search:
        return (-peak / 32).squeeze(-1)
    w = x.square()
    wx = w * x

    def fit(inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = torch.round(inv * x).clamp_(-32, 31)
        return _ordered_sum(wx * levels), _ordered_sum(w * levels * levels)

    sxl, sl2 = fit(-32 / peak)
    scale = torch.where(sl2 > 0, sxl / sl2, torch.zeros_like(sxl))
    best = scale * sxl
    for k in (*range(-9, 0), *range(1, 10)):
        sxl, sl2 = fit(-_f32_step(0.0, 0.1, k, 32) / peak)
        better = (sl2 > 0) & (sxl * sxl > best * sl2)
        scale = torch.where(better, sxl / sl2, scale)
        # (Σwxl/Σwl²)·Σwxl, rounded as the reference rounds it so that near-ties break alike
        best = torch.where(better, scale * sxl, best)
    return scale.squeeze(-1)


def _q6_k(x: torch.Tensor, search: bool) -> torch.Tensor:
    nb = x.shape[0]
    sub = x.reshape(nb, 16, 16)
    scale = _fit_signed_scale(sub.reshape(-1, 16), search).reshape(nb, 16)
    scale = torch.where(sub.abs().amax(-1) < _EPS, torch.zeros_like(scale), scale)
    idx = scale.abs().argmax(-1, keepdim=True)
    top = scale.gather(-1, idx)
    zero = top.abs() < _EPS  # the whole super-block is (near) zero: all bytes 0
    top = torch.where(zero, torch.ones_like(top), top)
    inv = -128 / top
    d = torch.where(zero, torch.zeros_like(top), 1 / inv).to(torch.float16)
    sc = torch.round(inv * scale).clamp_(-128, 127)
    sc = torch.where(zero, torch.zeros_like(sc), sc)
    step = (d.float() * sc).unsqueeze(-1)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    levels = torch.round(sub / safe).clamp_(-32, 31) + 32
    levels = torch.where(step == 0, torch.full_like(levels, 32), levels).to(torch.uint8).reshape(nb, 2, 4, 32)
    # per 128-value half: quarters 0..3 of 32 values
    ql = torch.cat([(levels[:, :, 0] & 15) | ((levels[:, :, 2] & 15) << 4),
                    (levels[:, :, 1] & 15) | ((levels[:, :, 3] & 15) << 4)], dim=2).reshape(nb, 128)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = ((levels >> 4) << shifts).sum(dim=2, dtype=torch.uint8).reshape(nb, 64)
    sc_bytes = sc.to(torch.int8).view(torch.uint8)
    zero_rows = zero.squeeze(-1)
    out = torch.cat([ql, qh, sc_bytes, _f16_bytes(d.squeeze(-1))], dim=1)
    out[zero_rows] = 0
    return out
