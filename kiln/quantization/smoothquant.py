"""SmoothQuant (Xiao et al., 2022): migrate activation outliers into the weights so both fit INT8.

Per input channel j: s_j = max|X_j|^α / max|W_j|^(1-α). The layer then computes
(X / s) · (W·diag(s))ᵀ, with X / s quantized per token at run time and W·diag(s) per output channel
offline (kiln.layers.quant_linear.W8A8LinearMethod).
"""

from __future__ import annotations

import torch


def smooth_scales(weight: torch.Tensor, x_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s [K] for weight [N, K] and activation channel maxima [K]; α=0 leaves activations alone."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    w_max = weight.detach().float().abs().amax(0).clamp(min=1e-5)
    a_max = x_absmax.float().clamp(min=1e-5)
    return (a_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=1e-5)


def w8a8_weight(weight: torch.Tensor, smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 W·diag(s) transposed to [K, N], fp32 scale [N]) — symmetric per output channel."""
    ws = weight.detach().float() * smooth.unsqueeze(0)
    scale = (ws.abs().amax(1) / 127.0).clamp(min=1e-8)
    q = torch.round(ws / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q.t().contiguous(), scale
