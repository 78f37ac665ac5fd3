"""Whole-sequence forward passes outside the engine, for evaluation and calibration.

Perplexity, KL divergence, calibration and sensitivity scans all need "every position's logits
for this token window" without a scheduler: one prefill through the model's own paged-attention
path, into a scratch KV cache sized for the window and dropped afterwards.
"""

from __future__ import annotations

import torch

from kiln.kernels.attention_metadata import build_attention_metadata

BLOCK_SIZE = 16


def scratch_kv_caches(model: torch.nn.Module, num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed per-layer (K, V) block tensors for one sequence of `num_tokens` tokens."""
    cfg = model.config
    n_blocks = (num_tokens + BLOCK_SIZE - 1) // BLOCK_SIZE
    shape = (n_blocks, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
    return [(torch.zeros(shape, dtype=model.dtype, device=model.device),
             torch.zeros(shape, dtype=model.dtype, device=model.device)) for _ in range(cfg.num_hidden_layers)]


@torch.inference_mode()
def window_hidden(model: torch.nn.Module, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Final hidden states [T, hidden] of one causal prefill over `token_ids` (positions 0..T-1)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=model.device)
    n = int(ids.numel())
    if n == 0:
        raise ValueError("token window is empty")
    n_blocks = (n + BLOCK_SIZE - 1) // BLOCK_SIZE
    meta = build_attention_metadata([n], [n], [list(range(n_blocks))], BLOCK_SIZE)
    return model(ids, torch.arange(n, device=model.device), meta, scratch_kv_caches(model, n))


@torch.inference_mode()
def window_logits(model: torch.nn.Module, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, vocab] at every position of one causal prefill over `token_ids`."""
    return model.compute_logits(window_hidden(model, token_ids))
