"""RMSNorm, with an optional fused residual add (one pass instead of two)."""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels.fused import add_rms_norm


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-torch RMSNorm in fp32, as HF Llama computes it (cast back to x's dtype)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32, device="cpu") -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def weight_loader(self, param_name: str, loaded: torch.Tensor, shard: str | None = None) -> None:
        if tuple(loaded.shape) != tuple(self.weight.shape):
            raise ValueError(f"shape mismatch: expected {tuple(self.weight.shape)}, got {tuple(loaded.shape)}")
        self.weight.data.copy_(loaded.to(self.weight.dtype))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual)."""
        out, new_residual = add_rms_norm(x, residual, self.weight, self.eps)
        return out if residual is None else (out, new_residual)
