"""AWQ's second step (Lin et al., 2023, and AutoAWQ's `_search_best_clip`): shrink each group's
weight range before rounding when that brings the group's share of the layer output closer.

Round-to-nearest sizes a group's step to cover its extreme weights; one outlier then coarsens every
other weight of the group. Clipping the range to r·[min, max] (r on a grid from 1 down to 0.55)
trades a clipped outlier for a finer step. The choice is made per (output row, group) by the error
of that group's partial dot products on calibration inputs, Σ_t (x_t,g · (Q(w_n,g) - w_n,g))²: with
one scale per (row, group) the groups are independent, so the search is exact per group. Rows of
the query and key projections are never clipped (AutoAWQ's rule: attention scores are the
most sensitive to them).
"""

from __future__ import annotations

import torch

from kiln.kernels.dequant import dequantize_codes, grouped
from kiln.quantization.primitives import IntScheme, group_qparams, quantize_codes

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))  # 1.00, 0.95, ..., 0.55
ROW_CHUNK = 1024  # rows searched at once: bounds the [T, rows, groups] partial products in memory


def clip_weight(w: torch.Tensor, ratio: torch.Tensor, group_len: int) -> torch.Tensor:
    """w [N, K] with each (row, group) clamped to ratio[n, g]·[min(w, 0), max(w, 0)] of that group."""
    n, k = w.shape
    wg = grouped(w.float(), group_len)
    lo = wg.amin(-1, keepdim=True).clamp(max=0.0) * ratio.unsqueeze(-1)
    hi = wg.amax(-1, keepdim=True).clamp(min=0.0) * ratio.unsqueeze(-1)
    return torch.maximum(torch.minimum(wg, hi), lo).reshape(n, -1)[:, :k]


def _fake_quant(w: torch.Tensor, scheme: IntScheme) -> torch.Tensor:
    scale, zero = group_qparams(w, scheme)
    return dequantize_codes(quantize_codes(w, scale, zero, scheme), scale, zero, scheme.group_size)


def search_clip(w: torch.Tensor, x: torch.Tensor, scheme: IntScheme, frozen_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The clip ratio [N, G] per (row, group) of w [N, K] that minimises the error of that group's
    partial outputs on calibration rows x [T, K]; 1.0 for `frozen_rows` (bool [N]) and on ties."""
    n, k = w.shape
    glen = scheme.group_len(k)
    xg = grouped(x.float(), glen)  # [T, G, L]
    best_ratio = torch.ones(n, xg.shape[1])
    for r0 in range(0, n, ROW_CHUNK):
        wc = w[r0:r0 + ROW_CHUNK].float()
        ref = torch.einsum("tgl,ngl->ngt", xg, grouped(wc, glen))
        best_err = torch.full(best_ratio[r0:r0 + ROW_CHUNK].shape, float("inf"))
        for r in CLIP_RATIOS:
            ratio = torch.full_like(best_err, r)
            wq = _fake_quant(clip_weight(wc, ratio, glen), scheme)
            err = (torch.einsum("tgl,ngl->ngt", xg, grouped(wq, glen)) - ref).pow(2).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio[r0:r0 + ROW_CHUNK][better] = r
    if frozen_rows is not None:
        best_ratio[frozen_rows] = 1.0
    return best_ratio
