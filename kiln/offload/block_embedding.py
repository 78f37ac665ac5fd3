"""Token embeddings read from the quantized tied LM head's blocks instead of a dense table.

A GGUF model whose embedding is tied to the LM head and kept in blocks (the default model's Q8_0
`token_embd`) holds the same matrix twice: the blocks for the head and a dense fp32 table for lookups
(113 MiB of the default model's ~250 MiB). Under a weight budget that table is the largest thing in RAM,
so `BlockEmbedding` dequantizes only the rows a step looks up, from the head's blocks.

Invariant: each row equals the dense table's row. The table was filled by the `gguf` library's
dequantization and the rows here by kiln's block dequantization, which compute the same products
(tests/offload compare them for Q8_0, Q4_0 and Q4_1 heads; K-quant and Q5 heads dequantize through
their layers' own exact dequantization, tested against the gguf library in tests/test_kquant_kernels.py
and tests/test_q5_kernels.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class BlockEmbedding(nn.Module):
    """`embedding(ids)` = dequantized rows `ids` of a block-quantized Linear's weight."""

    def __init__(self, head: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = [head]  # a list: not a sub-module, so its blocks are counted once (as the head's)
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = sum(head.output_sizes), head.input_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        flat = input_ids.reshape(-1)
        rows = SimpleNamespace(**{name: buf.index_select(0, flat) if buf.dim() > 0 and buf.shape[0] == self.num_embeddings
                                  else buf for name, buf in head.named_buffers(recurse=False)},
                               input_size=head.input_size)
        out = head.method.dequantize_weight(rows, self.dtype)
        return out.reshape(*input_ids.shape, self.embedding_dim)


def serve_embedding_from_blocks(model: nn.Module) -> bool:
    """Replace a dense tied embedding table by lookups into the quantized head's blocks (True if done)."""
    head = getattr(model, "quantized_tied_head", None)
    embed = getattr(model, "embed_tokens", None)
    if head is None or not isinstance(embed, nn.Embedding):
        return False
    model.embed_tokens = BlockEmbedding(head, embed.weight.dtype)
    dense = getattr(head, "dense_weight", None)
    if dense is embed.weight or (dense is not None and dense.is_mkldnn):
        head.dense_weight = None  # the head's dense copy (the table itself, or packed from it); lean mode has none
    return True
