"""The LM head of a causal LM whose embedding may be tied, shared by every model family in kiln.

A model class mixes this in and owns `config`, `dtype`, `device`, `embed_tokens`, `lm_head` (None when tied),
`quantized_tied_head` (None unless set here), `keep_gguf_blocks` and `keep_dense_copies`.
Invariant: logits are fp32 whichever head computes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kiln.kernels.dense_matmul import dense_kernel_rows, dense_linear
from kiln.layers.linear import Linear

if TYPE_CHECKING:
    from kiln.layers.gguf_quant import GGUFQuantizedTensor


class TiedHeadMixin:
    _tied_head_rows: int | None = None  # the dense tied head's kernel limit (kiln.kernels.dense_matmul)

    def attach_quantized_tied_head(self, blocks: "GGUFQuantizedTensor") -> None:
        """Keep the tied embedding's GGUF blocks as a quantized LM head (embedding lookups stay dense)."""
        from kiln.layers.gguf_quant import block_method, family_of

        family = family_of({blocks.qtype})
        if not self.keep_gguf_blocks or family is None:
            return
        head = Linear(self.config.hidden_size, [self.config.vocab_size], dtype=self.dtype, device=self.device)
        head.set_method(block_method(family, self.keep_dense_copies))
        head.weight_loader("weight", blocks)
        self.quantized_tied_head = head

    def finalize_quantized_layers(self, root: torch.nn.Module | None = None) -> None:
        """After loading: quantized layers repack or build their dense copies (the tied head adopts the embedding).
        `root`: only the Linears inside it (one decoder layer, as soon as its weights are in: the streamed load)."""
        for module in (root if root is not None else self).modules():
            if isinstance(module, Linear):
                dense = getattr(self.embed_tokens, "weight", None) if module is self.quantized_tied_head else None
                module.method.process_weights_after_loading(module, dense)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, hidden] → fp32 logits [N, vocab]."""
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        if self.quantized_tied_head is not None:
            return self.quantized_tied_head(hidden).float()
        weight = self.embed_tokens.weight
        if self._tied_head_rows is None:  # decided once the weights are final (kiln.kernels.dense_matmul)
            self._tied_head_rows = dense_kernel_rows(weight.dtype, weight.device)
        return dense_linear(hidden, weight, None, self._tied_head_rows).float()
