"""Whole-sequence forward passes outside the engine, for evaluation and calibration.

Perplexity, KL divergence, calibration and sensitivity scans all need "every position's logits
for this token window" without a scheduler: one prefill through the model's own paged-attention
path (kiln.worker.forward, as the draft model and the engine's runner use it), into a scratch KV
cache in the model's own dtype, sized for the window and dropped afterwards.
"""

from __future__ import annotations

import torch

from kiln.core.kv_cache_utils import cdiv
from kiln.kernels.kv_quant import KVCache
from kiln.worker.forward import allocate_model_kv_caches, forward_batch, model_kv_dtype

BLOCK_SIZE = 16


def scratch_kv_caches(model: torch.nn.Module, num_tokens: int) -> list[KVCache]:
    """Zeroed per-layer (K, V) block tensors for one sequence of `num_tokens` tokens."""
    return allocate_model_kv_caches(model, cdiv(num_tokens, BLOCK_SIZE), BLOCK_SIZE, model_kv_dtype(model))


@torch.inference_mode()
def window_hidden(model: torch.nn.Module, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Final hidden states [T, hidden] of one causal prefill over `token_ids` (positions 0..T-1)."""
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    if not ids:
        raise ValueError("token window is empty")
    n = len(ids)
    caches = scratch_kv_caches(model, n)
    return forward_batch(model, caches, [ids], [0], [list(range(cdiv(n, BLOCK_SIZE)))], BLOCK_SIZE)


@torch.inference_mode()
def window_logits(model: torch.nn.Module, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, vocab] at every position of one causal prefill over `token_ids`."""
    return model.compute_logits(window_hidden(model, token_ids))
