"""Plain-torch paged attention: the slow twin every fast attention path is tested against.

It gathers each sequence's context out of the blocks (dequantizing a quantized cache, see
kv_quant) and runs textbook causal softmax attention in fp32. Correct and simple; never used
on the hot path.
"""

from __future__ import annotations

import math

import torch

from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.kernels.kv_quant import QuantizedKV


def gather_context(cache: torch.Tensor | QuantizedKV, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[num_blocks, block_size, Hkv, D] cache → the first seq_len tokens [seq_len, Hkv, D]
    (a quantized cache comes back dequantized, in fp32)."""
    if isinstance(cache, QuantizedKV):
        return cache.gather(block_ids, seq_len)
    block_size = cache.shape[1]
    n_blocks = (seq_len + block_size - 1) // block_size
    return cache[block_ids[:n_blocks].long()].reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor | QuantizedKV,
    v_cache: torch.Tensor | QuantizedKV,
    meta: AttentionMetadata,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] (K/V of these tokens already written) → out [T, Hq, D].

    `window`: a query at position p sees only keys p - window < k <= p (sliding-window layers);
    None: every earlier key."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty_like(q)
    for i in range(meta.num_seqs):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        seq_len = meta.seq_lens[i]
        k = gather_context(k_cache, meta.block_tables[i], seq_len).float()
        v = gather_context(v_cache, meta.block_tables[i], seq_len).float()
        group = num_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        qi = q[start:end].float()  # [L, Hq, D]
        scores = torch.einsum("lhd,shd->hls", qi, k) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len).unsqueeze(1)
        k_pos = torch.arange(seq_len).unsqueeze(0)
        hidden = k_pos > q_pos
        if window is not None:
            hidden |= k_pos <= q_pos - window
        scores = scores.masked_fill(hidden.unsqueeze(0), float("-inf"))
        probs = scores.softmax(dim=-1)
        out[start:end] = torch.einsum("hls,shd->lhd", probs, v).to(q.dtype)
    return out
