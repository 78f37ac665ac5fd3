"""Round-to-nearest building blocks shared by every method: group scales, codes, packing.

This is the offline (quantizing) side; unpacking and dequantizing, which the layers need at run
time too, live in kiln.kernels.dequant. One integer layout serves INT8 per-channel and INT4
group-wise weights alike:

    w[n, k] ≈ (code[n, k] - zero[n, g]) * scale[n, g],   g = k // group_size

with unsigned codes in [0, 2**bits - 1], `scale` fp16 and `zero` an integer in the same range
(symmetric schemes fix zero = 2**(bits-1), so codes - zero are the signed values). When the group
size does not divide K (SmolLM2's hidden size 576 is 4.5 groups of 128) the last group is shorter:
there are ceil(K / group_size) groups. INT4 codes are
packed two per byte (even column in the low nibble). A group size equal to the input size is
per-output-channel quantization. FP8 E4M3 weights keep a per-output-channel fp32 scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.kernels.dequant import dequantize_codes, grouped

FP8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class IntScheme:
    """bits ∈ {4, 8}; group_size divides the input size (or -1: one group per row); sym: zero fixed at 2**(bits-1)."""

    bits: int
    group_size: int
    sym: bool

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (per channel), got {self.group_size}")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        return -(-in_features // self.group_len(in_features))

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def group_qparams(w: torch.Tensor, scheme: IntScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [N, G] fp32, zero [N, G] fp32 holding integers) from the range of each group of `w` [N, K]."""
    wg = grouped(w.float(), scheme.group_len(w.shape[1]))
    if scheme.sym:
        half = 1 << (scheme.bits - 1)
        # Codes span [zero - half, zero + half - 1]: the positive side reaches half - 1 steps.
        scale = wg.abs().amax(-1) / (half - 1)
        zero = torch.full_like(scale, float(half))
    else:
        lo = wg.amin(-1).clamp(max=0.0)
        hi = wg.amax(-1).clamp(min=0.0)
        zero = torch.round(-lo / ((hi - lo) / scheme.qmax).clamp(min=1e-12)).clamp(0, scheme.qmax)
        # With the zero point rounded to an integer, widen the step just enough that both ends of the
        # range still land on a code: an outlier weight (a "super weight") is then stored almost
        # exactly instead of being clipped by up to half a step.
        up = torch.where(zero < scheme.qmax, hi / (scheme.qmax - zero).clamp(min=1), torch.zeros_like(hi))
        down = torch.where(zero > 0, -lo / zero.clamp(min=1), torch.zeros_like(lo))
        scale = torch.maximum(up, down)
    scale = _fp16_at_least(scale.clamp(min=1e-8))  # stored in fp16: quantize with what is stored
    return scale, zero


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 values ≥ x (fp32 result), so a scale never shrinks when stored."""
    h = x.to(torch.float16)
    below = h.float() < x
    h[below] = torch.nextafter(h[below], torch.full_like(h[below], float("inf")))
    return h.float()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: IntScheme) -> torch.Tensor:
    """Unsigned integer codes (uint8) [N, K] of `w` under per-group (scale, zero)."""
    n, k = w.shape
    wg = grouped(w.float(), scheme.group_len(k))
    q = torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp(0, scheme.qmax).reshape(n, -1)[:, :k].to(torch.uint8)


def fake_quantize(w: torch.Tensor, scheme: IntScheme) -> torch.Tensor:
    """RTN quantize-dequantize of `w` (fp32 result): what a stored RTN weight computes with."""
    scale, zero = group_qparams(w, scheme)
    return dequantize_codes(quantize_codes(w, scale, zero, scheme), scale, zero, scheme.group_size)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], [N, K] (K even) → [N, K/2] bytes, even column in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError("INT4 packing needs an even number of columns")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel scaled E4M3: (float8_e4m3fn [N, K], scale fp32 [N]); w ≈ q * scale."""
    scale = (w.float().abs().amax(-1) / FP8_E4M3_MAX).clamp(min=1e-12)
    q = (w.float() / scale.unsqueeze(-1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale
