"""Rotary position embeddings (HF "rotate half" layout), with Llama-3 and linear scaling.

The cos/sin table is precomputed once for all positions up to max_position and indexed
by each token's absolute position, so a flat batch of tokens from many sequences at
different positions is rotated in one op.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.config import RopeScaling


def _inv_freq(head_dim: int, base: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, smooth in between.
        old_ctx = scaling.original_max_position_embeddings
        low_wavelen = old_ctx / scaling.low_freq_factor
        high_wavelen = old_ctx / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {scaling.rope_type!r} (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        scaling: RopeScaling | None = None,
        device: torch.device | str = "cpu",
        freq_factors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if torch.device(device).type == "meta":
            # the tables are computed here, never loaded: a model built on the meta device (the streamed
            # load under a weight budget, kiln.loader.streamed_load) still needs real ones
            device = "cpu"
        inv_freq = _inv_freq(head_dim, base, scaling)
        if freq_factors is not None:  # GGUF's rope_freqs tensor (Llama 3.1 scaling, precomputed)
            inv_freq = inv_freq / freq_factors.to(torch.float64)
        t = torch.arange(max_position, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        # float32 tables: HF computes cos/sin in fp32 and so do we, whatever the model dtype.
        self.register_buffer("cos", freqs.cos().float().to(device), persistent=False)
        self.register_buffer("sin", freqs.sin().float().to(device), persistent=False)
        self.head_dim = head_dim

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] by their tokens' absolute positions [T]."""
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1 = x[..., :half].float()
    x2 = x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
