"""AWQ (Lin et al., 2023): scale the input channels that see large activations up before
group-wise rounding, so the weights that matter most lose the least precision.

For a layer y = x Wᵀ the search tries s = mean|x|^α (α on a grid in [0, 1)), quantizes W·diag(s)
and keeps the α whose output (x / s)·Q(W·diag(s))ᵀ is closest to x Wᵀ on calibration rows.
With `clip`, each (row, group) range of W·diag(s) is then shrunk where that lowers the group's
output error (kiln.quantization.awq_clip, the paper's second step).
kiln stores `smooth` = s with the layer and divides the activations at run time (instead of
folding 1/s into the previous op), which works for every layer, GQA's o_proj included.
"""

from __future__ import annotations

import torch

from kiln.kernels.dequant import dequantize_codes
from kiln.quantization.awq_clip import clip_weight, search_clip
from kiln.quantization.primitives import IntScheme, group_qparams, quantize_codes


def awq_quantize(
    weight: torch.Tensor,
    x_sample: torch.Tensor,
    x_absmean: torch.Tensor,
    scheme: IntScheme,
    grid: int = 20,
    clip: bool = False,
    frozen_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """weight [N, K], x_sample [R, K] calibration inputs, x_absmean [K] mean |x| per channel →
    (codes [N, K] of W·diag(s), scale, zero, smooth s [K], chosen α).

    `clip`: also search a clip ratio per (row, group), leaving `frozen_rows` (bool [N]) unclipped."""
    w = weight.detach().float()
    x = x_sample.float()
    reference = x @ w.t()
    best: tuple[float, float, torch.Tensor] | None = None
    base = x_absmean.float().clamp(min=1e-5)
    for step in range(grid):
        alpha = step / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # keep the scales centred around 1
        ws = w * s.unsqueeze(0)
        sc, zr = group_qparams(ws, scheme)
        wq = dequantize_codes(quantize_codes(ws, sc, zr, scheme), sc, zr, scheme.group_size)
        err = ((x / s) @ wq.t() - reference).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    _, alpha, s = best
    ws = w * s.unsqueeze(0)
    if clip:
        ratio = search_clip(ws, x / s, scheme, frozen_rows)
        ws = clip_weight(ws, ratio, scheme.group_len(ws.shape[1]))
    scale, zero = group_qparams(ws, scheme)
    return quantize_codes(ws, scale, zero, scheme), scale, zero, s, alpha
