"""A model's paged KV caches, and one forward over a flat batch of sequences.

Everything that runs a model holds its KV in the same layout: per layer a (K, V) pair of block
tensors [num_blocks, block_size, Hkv, D] (kiln.kernels.kv_quant allocates the tensors, float or
quantized). The model runner allocates its caches here; the draft-model proposer and the
whole-window forwards of evaluation and calibration (kiln.eval.forward) also run their batches
through `forward_batch`, so a flat batch is laid out one way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch

from typing import TYPE_CHECKING

from kiln.kernels.kv_quant import KVCache, allocate_kv_caches
from kiln.kernels.attention_metadata import build_attention_metadata

if TYPE_CHECKING:
    from kiln.core.kv_cache_groups import KVCacheGroup


def model_kv_dtype(model: torch.nn.Module) -> str:
    """The cache dtype name for K/V stored exactly in the model's dtype ('auto' may differ: a
    float32 model on the CPU gets a float16 cache, see kv_quant.full_precision_kv_dtype)."""
    return str(model.dtype).removeprefix("torch.")


def allocate_model_kv_caches(model: torch.nn.Module, num_blocks: int, block_size: int,
                             kv_cache_dtype: str = "auto", groups: "list[KVCacheGroup] | None" = None) -> list[KVCache]:
    """Zeroed per-layer (K, V) caches of `num_blocks` blocks for `model`, on its device.

    `kv_cache_dtype`: one of config.KV_CACHE_DTYPES; raises ValueError for one the model cannot use.
    `groups` (a hybrid cache, kiln.core.kv_cache_groups): the i-th layer of every group shares the
    i-th page tensor (the groups' block ids never overlap), so only `layers_per_block` tensors exist.
    """
    cfg = model.config
    # Under tensor parallel each rank caches only its own KV heads (kiln.distributed sets the count).
    kv_heads = getattr(model, "tp_num_kv_heads", None) or cfg.num_key_value_heads
    shape = (num_blocks, block_size, kv_heads, cfg.head_dim)
    if groups is None:
        return allocate_kv_caches(cfg.num_hidden_layers, shape, kv_cache_dtype, model.dtype, model.device)
    pages = allocate_kv_caches(len(groups[0].layers), shape, kv_cache_dtype, model.dtype, model.device)
    caches: list[KVCache | None] = [None] * cfg.num_hidden_layers
    for group in groups:
        for i, layer in enumerate(group.layers):
            caches[layer] = pages[i]
    return caches  # type: ignore[return-value]  # every layer is in exactly one group


def forward_batch(
    model: torch.nn.Module,
    kv_caches: list[KVCache],
    new_tokens: Sequence[Sequence[int]],
    starts: Sequence[int],
    block_tables: Sequence[list[int]],
    block_size: int,
    last_only: bool = False,
) -> torch.Tensor:
    """Final hidden states of one flat batch: sequence i's `new_tokens[i]` at positions
    starts[i], starts[i] + 1, ..., attending to its `starts[i]` cached tokens before them.

    Their K/V are written into, and the context read from, the blocks `block_tables[i]` of
    `kv_caches`. Returns [total new tokens, hidden], or [num sequences, hidden] (each sequence's
    last new token) with `last_only`.
    Invariants the caller keeps: sequences with one new token come first (the decode kernel takes
    them as one contiguous range); each block table covers starts[i] + len(new_tokens[i]) tokens.
    """
    device = model.device
    query_lens = [len(t) for t in new_tokens]
    seq_lens = [s + q for s, q in zip(starts, query_lens)]
    meta = build_attention_metadata(query_lens, seq_lens, list(block_tables), block_size, device)
    ids = [t for tokens in new_tokens for t in tokens]
    positions = [p for s, q in zip(starts, query_lens) for p in range(s, s + q)]
    hidden = model(torch.tensor(ids, dtype=torch.long, device=device),
                   torch.tensor(positions, dtype=torch.long, device=device), meta, kv_caches)
    if not last_only:
        return hidden
    last = torch.tensor([end - 1 for end in accumulate(query_lens)], device=hidden.device)
    return hidden[last]
