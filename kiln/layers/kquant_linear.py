"""GGUF K-quant weights (Q4_K, Q5_K, Q6_K) kept in the file's super-blocks inside a `Linear`.

The layer holds one uint8 buffer `kq` [N, K / 256 * block bytes]: every shard's rows exactly as the
file stores them (no repack, no dequantized copy unless `keep_dense`). Batches pick their kernel
like GGUFQuantLinearMethod's (this class reuses its `apply` and row limits): the K-quant block
kernel for decode-sized M, the panel kernel (fp32, AVX-512) for medium M, the dense GEMM above (on a
resident copy, or weights dequantized per call). Row limits come from `kiln tune`'s measurement of
this kind when there is one (kiln.kernels.tune), else from the Q4 block kernel's built-in ones.
A layer's shards must all be the same K type (kiln.layers.gguf_quant.family_of), and K a multiple of 256.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kiln.kernels.decode_step import LinearEntry, kquant_entry
from kiln.kernels.kquant_matmul import (
    KQUANT_BYTES,
    KQUANT_TYPES,
    QKK,
    kquant_dequantize,
    kquant_matmul,
    kquant_matmul_panels,
)
from kiln.kernels.tune import limits
from kiln.layers.gguf_quant import GGUFQuantizedTensor, GGUFQuantLinearMethod

if TYPE_CHECKING:
    from kiln.layers.linear import Linear


class KQuantLinearMethod(GGUFQuantLinearMethod):
    """x @ W^T for a Linear whose W stays in GGUF K-quant super-blocks of one type."""

    def __init__(self, qtype: str, keep_dense: bool = False, dense_threshold: int | None = None,
                 panel_rows: tuple[int, int] | None = None) -> None:
        if qtype not in KQUANT_TYPES:
            raise ValueError(f"qtype must be one of {sorted(KQUANT_TYPES)}, got {qtype!r}")
        super().__init__("Q4", keep_dense, dense_threshold, panel_rows)  # the block kernels' row-limit rules
        self.is_q4 = False  # not the Q4 block layout (kiln tune's Q4 measurement skips this layer)
        self.qtype = qtype

    def _tuned(self, dtype: torch.dtype) -> tuple[int, int] | None:
        # this kind's own measured crossovers where `kiln tune` timed it, else the Q4 ones
        if self.tuning is not None and dtype not in self._tuned_limits:
            self._tuned_limits[dtype] = (limits(self.tuning, dtype, self.keep_dense, kind=self.qtype)
                                         or limits(self.tuning, dtype, self.keep_dense))
        return super()._tuned(dtype)

    @property
    def kernel_name(self) -> str:
        return f"native {self.qtype} super-block kernel"

    def accepts(self, qtype: str) -> bool:
        return qtype == self.qtype

    def create_weights(self, layer: Linear) -> None:
        n, k = sum(layer.output_sizes), layer.input_size
        if k % QKK:
            raise ValueError(f"input size {k} is not a multiple of {QKK}, which {self.qtype} super-blocks need")
        device, dtype = layer.weight.device, layer.weight.dtype
        del layer.weight
        layer.register_buffer("kq", torch.zeros(n, k // QKK * KQUANT_BYTES[self.qtype], dtype=torch.uint8,
                                                device=device))
        layer.dense_weight = None
        from kiln.kernels.tune import copy_dtype

        layer.dense_dtype = copy_dtype(self.tuning, dtype) if self.keep_dense else dtype

    def load_shard(self, layer: Linear, t: GGUFQuantizedTensor, rows: slice) -> None:
        if not self.accepts(t.qtype):
            raise ValueError(f"tensor type {t.qtype} does not fit this layer's {self.qtype} super-blocks")
        expected = (rows.stop - rows.start, layer.input_size)
        if t.shape != expected:
            raise ValueError(f"shape mismatch: expected {expected}, got {t.shape}")
        layer.kq[rows].copy_(t.raw.reshape(layer.kq[rows].shape))
        self.source_types.add(self.qtype)

    def block_matmul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return kquant_matmul(x, layer.kq, self.qtype)

    def panel_matmul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return kquant_matmul_panels(x, layer.kq, self.qtype)

    def dequantize_weight(self, layer: Linear, dtype: torch.dtype) -> torch.Tensor:
        return kquant_dequantize(layer.kq, self.qtype, layer.input_size, dtype)

    def decode_plan_entry(self, layer: Linear, dtype: torch.dtype) -> LinearEntry:
        return kquant_entry(layer.kq, self.qtype, layer.dense_weight, layer.bias, self.block_max_rows(dtype),
                            self.panel_max_rows(dtype))
