"""GPTQ (Frantar et al., 2022): quantize a weight column by column, each column's rounding error
pushed onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

The Hessian is H = 2/n · Σ x xᵀ over calibration activations x (the layer's inputs). Group
scales/zeros are fixed up front from the original weight ("static groups"), so act-order
(processing columns by decreasing H_ii) never changes which group a column belongs to and the
saved layout stays the plain one of kiln.quantization.primitives.
"""

from __future__ import annotations

import torch

from kiln.quantization.primitives import IntScheme, group_qparams, quantize_codes


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: IntScheme,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K], hessian [K, K] → (codes uint8 [N, K], scale [N, G], zero [N, G]).

    `damp` adds damp·median(diag H) to the diagonal (numerical stability, the paper's λ; see below).
    """
    w = weight.detach().float().clone()
    n, k = w.shape
    h = hessian.detach().float().clone()
    if h.shape != (k, k):
        raise ValueError(f"Hessian must be [{k}, {k}], got {tuple(h.shape)}")
    dead = torch.diag(h) == 0  # inputs that never fire: any value is as good; quantize zeros
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale, zero = group_qparams(w, scheme)
    glen = scheme.group_len(k)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w = w[:, perm]
    h = h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp)

    group_of = perm // glen  # the group each processed column belongs to, in original order
    q = torch.zeros_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            g = group_of[i1 + i]
            s, z = scale[:, g], zero[:, g]
            qcol = (torch.clamp(torch.round(col / s) + z, 0, scheme.qmax) - z) * s
            q[:, i1 + i] = qcol
            e = (col - qcol) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    q = q[:, torch.argsort(perm)]
    return quantize_codes(q, scale, zero, scheme), scale, zero


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)^-1 (row i: the update coefficients for columns > i).

    λ = damp · median(diag H), not the paper's mean: one massive-activation channel (SmolLM2 has
    a channel 10^6 x the others) makes the mean so large that the damping swamps every other
    column's curvature and GPTQ degenerates to round-to-nearest. In float64, because that channel
    also makes H badly conditioned; λ grows tenfold while H + λI is not numerically positive definite
    (few calibration rows give a rank-deficient H).
    """
    h64 = h.double()
    base = torch.median(torch.diag(h64)).clamp(min=1e-12)
    for attempt in range(8):
        damped = h64.clone()
        damped.diagonal().add_(damp * (10.0 ** attempt) * base)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            factor, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return factor.float()
    raise ValueError("GPTQ: the calibration Hessian stays singular even with heavy damping; use more --calib-samples")
