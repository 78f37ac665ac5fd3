"""Shard a Llama-family model for one tensor-parallel rank, from outside the model file.

`shard_model` runs once the model is built and before any weight is planned or loaded
(`load_model(prepare_model=...)`): it shrinks each Linear to this rank's share, gives it the
`tp_slice` that cuts checkpoint tensors to match, sets the attention's per-rank head counts, adds
one all-reduce after each row-parallel layer (o_proj, down_proj), swaps in a vocabulary-parallel
embedding and wraps `compute_logits` in an all-gather. Loading then proceeds as for one process, so
a quantization method chosen by the loader (GGUF blocks, kiln INT) sees per-rank sizes.

Per forward every rank runs the same collectives in the same order: 1 all-reduce for the embedding,
2 per decoder layer, 1 all-gather per logits call. The fused native decode step (one C++ call for the
whole stack) has no place for them, so TP ranks run decode op by op (`fused_decode_step = False`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.distributed.comm import TPGroup
from kiln.distributed.slicing import ColumnSlice, RowSlice
from kiln.distributed.topology import RankShare
from kiln.layers.gguf_quant import GGUFQuantizedTensor
from kiln.layers.linear import DenseLinearMethod, Linear


def shard_model(model: nn.Module, group: TPGroup) -> RankShare:
    """Turn a freshly built (unloaded) Llama-family model into rank `group.rank`'s share of it."""
    from kiln.models.llama import LlamaForCausalLM

    if type(model) is not LlamaForCausalLM:  # another family's layers would need their own plan
        raise ValueError(f"tensor parallel runs the Llama model family (Llama, Mistral, Qwen2, SmolLM2) so far; "
                         f"{model.config.architecture} is not one of them: use --tensor-parallel-size 1")
    share = RankShare.of(model.config, group.rank, group.world)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _column_parallel(attn.qkv_proj, {"q": share.q_rows(), "k": share.kv_rows(), "v": share.kv_rows()})
        _row_parallel(attn.o_proj, share.q_rows(), group)
        attn.num_heads, attn.num_kv_heads = share.heads, share.kv_heads
        attn.q_size, attn.kv_size = share.heads * share.head_dim, share.kv_heads * share.head_dim
        _column_parallel(mlp.gate_up_proj, {"gate": share.mlp_rows(), "up": share.mlp_rows()})
        _row_parallel(mlp.down_proj, share.mlp_rows(), group)
    old = model.embed_tokens
    model.embed_tokens = VocabParallelEmbedding(share, old.embedding_dim, old.weight.dtype, old.weight.device, group,
                                                model)
    if model.lm_head is not None:
        _column_parallel(model.lm_head, {None: share.vocab_rows()}, padded=share.vocab_per_rank)
    model.compute_logits = _gathered_logits(model.compute_logits, group, share.vocab_size)
    model.tp_num_kv_heads = share.kv_heads  # the KV cache holds only this rank's heads
    model.fused_decode_step = False  # the fused C++ step has no all-reduce between its segments
    return share


def _resize(layer: Linear, output_sizes: list[int], input_size: int) -> None:
    if not isinstance(layer.method, DenseLinearMethod):
        raise RuntimeError("shard_model must run before the loader picks the layers' quantization methods")
    weight = layer.weight
    layer.output_sizes, layer.input_size = output_sizes, input_size
    layer.weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=weight.dtype, device=weight.device),
                                requires_grad=False)
    if layer.bias is not None:
        layer.bias = nn.Parameter(torch.zeros(sum(output_sizes), dtype=weight.dtype, device=weight.device),
                                  requires_grad=False)


def _column_parallel(layer: Linear, rows: dict[str | None, slice], padded: int | None = None) -> None:
    full = tuple(layer.output_sizes)
    sizes = [padded if padded is not None else rows[s].stop - rows[s].start for s in layer.shard_names]
    _resize(layer, sizes, layer.input_size)
    layer.tp_slice = ColumnSlice(rows, full, padded)


def _row_parallel(layer: Linear, cols: slice, group: TPGroup) -> None:
    _resize(layer, layer.output_sizes, cols.stop - cols.start)
    layer.tp_slice = RowSlice(cols, group.rank)

    def all_reduce(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return group.all_reduce(output)

    layer.register_forward_hook(all_reduce)


def _gathered_logits(local_logits: Callable[[torch.Tensor], torch.Tensor], group: TPGroup,
                     vocab_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        """Hidden [N, hidden] → fp32 logits [N, vocab]: this rank's vocabulary range, gathered from all."""
        full = group.all_gather_last_dim(local_logits(hidden))
        return full if full.shape[-1] == vocab_size else full[:, :vocab_size].contiguous()

    return compute_logits


class VocabParallelEmbedding(nn.Module):
    """Rank r's rows of the embedding; a token outside them contributes zeros, and one all-reduce sums
    the ranks (exact: every token has exactly one non-zero contribution)."""

    def __init__(self, share: RankShare, dim: int, dtype: torch.dtype, device: torch.device, group: TPGroup,
                 model: nn.Module) -> None:
        super().__init__()
        self.share, self.group = share, group
        self.rows = share.vocab_rows()
        self.weight = nn.Parameter(torch.zeros(share.vocab_per_rank, dim, dtype=dtype, device=device),
                                   requires_grad=False)
        self._model = [model]  # a list, so the model is no submodule of its own embedding

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.rows.start) & (ids < self.rows.stop)
        local = torch.where(inside, ids - self.rows.start, 0)
        out = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return self.group.all_reduce(out)

    def weight_loader(self, param: str, tensor: Any, shard: str | None = None) -> None:
        """This rank's vocabulary rows of the embedding; GGUF blocks of a tied embedding also become the
        rank's quantized LM head (as `attach_quantized_tied_head` does for one process)."""
        rows = ColumnSlice({None: self.rows}, (self.share.vocab_size,), self.share.vocab_per_rank)
        if isinstance(tensor, GGUFQuantizedTensor):
            part = GGUFQuantizedTensor(tensor.qtype, rows._pad(tensor.raw[self.rows], 0), tensor.cols)
            self._attach_quantized_head(part)
            tensor = part.dequantize()
        else:
            tensor = rows._pad(tensor[self.rows], 0)
        if tuple(tensor.shape) != tuple(self.weight.shape):
            raise ValueError(f"shape mismatch: expected {tuple(self.weight.shape)}, got {tuple(tensor.shape)}")
        self.weight.data.copy_(tensor.to(self.weight.dtype))

    def _attach_quantized_head(self, blocks: GGUFQuantizedTensor) -> None:
        from kiln.layers.gguf_quant import block_method, family_of

        model = self._model[0]
        family = family_of({blocks.qtype})
        if not getattr(model, "keep_gguf_blocks", False) or family is None or getattr(model, "lm_head", 1) is not None:
            return
        head = Linear(self.embedding_dim, [self.share.vocab_per_rank], dtype=self.weight.dtype, device=self.weight.device)
        head.set_method(block_method(family, model.keep_dense_copies))
        head.weight_loader("weight", blocks)
        model.quantized_tied_head = head
