"""GGUF Q5_0 weights kept in 5 bits inside a `Linear` (the Q5 layout of kiln.kernels.quant_matmul).

Q5_0 (w = d * (q - 16), q in 0..31: 16 bytes of low nibbles, a 32-bit word of fifth bits, an fp16 d per
32 weights) is what llama.cpp's Q4_K_M recipe falls back to for matrices whose rows are not whole
256-weight super-blocks (most of the default model's, 27 of Gemma 3 270M's). Before this layout kiln
repacked it into Q8_0 (exact, 34 instead of 22 bytes per 32 weights); now a layer whose shards are all
Q5_0 keeps the low nibbles in the Q4 pair layout with m = -16 d (exact in fp16 and fp32, as Q4_0's -8 d)
and the fifth bits as one int32 word per block, and the Q4 kernels add 16 to the lanes whose bit is set.
A layer mixing Q5_0 with Q8_0 shards still takes the Q8_0 repack (kiln.layers.gguf_repack).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kiln.kernels.decode_step import LinearEntry, q5_entry
from kiln.kernels.quant_matmul import QK, dequantize_q5, pack_q4_pairs, quant_matmul_panels_q5, quant_matmul_q5
from kiln.layers.gguf_quant import GGUFQuantizedTensor, GGUFQuantLinearMethod

if TYPE_CHECKING:
    from kiln.layers.linear import Linear

Q5_0_BYTES = 22


def unpack_q5_0(t: GGUFQuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q5_0 blocks → (qs in the Q4 pair layout, qh int32 [n, nb], d fp16 [n, nb], m = -16 d fp16); exact."""
    n, k = t.shape
    nb = k // QK
    blocks = t.raw.reshape(n, nb, Q5_0_BYTES)
    d = torch.empty((n, nb, 2), dtype=torch.uint8).copy_(blocks[..., 0:2]).view(torch.float16).reshape(n, nb)
    # a fresh dense copy: a view (even one `.contiguous()` returns as is) may sit at an offset int32 cannot view
    qh = torch.empty((n, nb, 4), dtype=torch.uint8).copy_(blocks[..., 2:6]).view(torch.int32).reshape(n, nb)
    packed = blocks[..., 6:22]
    low = torch.cat((packed & 0x0F, packed >> 4), dim=-1)  # GGUF: byte j = element j | element j+16 << 4
    return pack_q4_pairs(low), qh.contiguous(), d.contiguous(), (-16.0 * d).contiguous()


class GGUFQ5LinearMethod(GGUFQuantLinearMethod):
    """x @ W^T for a Linear whose W stays in GGUF Q5_0 (the Q4 kernels plus the fifth bits)."""

    def __init__(self, keep_dense: bool = False, dense_threshold: int | None = None,
                 panel_rows: tuple[int, int] | None = None) -> None:
        # the Q4 crossovers: the same kernels with one masked add per block
        super().__init__("Q4", keep_dense, dense_threshold, panel_rows)

    @property
    def kernel_name(self) -> str:
        return "native int16·int5 kernel"

    def accepts(self, qtype: str) -> bool:
        return qtype == "Q5_0"

    def create_weights(self, layer: "Linear") -> None:
        super().create_weights(layer)
        layer.register_buffer("qh", torch.zeros(layer.d.shape, dtype=torch.int32, device=layer.d.device))

    def load_shard(self, layer: "Linear", t: GGUFQuantizedTensor, rows: slice) -> None:
        if not self.accepts(t.qtype):
            raise ValueError(f"tensor type {t.qtype} does not fit this layer's Q5_0 blocks")
        expected = (rows.stop - rows.start, layer.input_size)
        if t.shape != expected:
            raise ValueError(f"shape mismatch: expected {expected}, got {t.shape}")
        qs, qh, d, m = unpack_q5_0(t)
        layer.qs[rows].copy_(qs)
        layer.qh[rows].copy_(qh)
        layer.d[rows].copy_(d)
        layer.m[rows].copy_(m)
        self.source_types.add("Q5_0")

    def block_matmul(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return quant_matmul_q5(x, layer.qs, layer.qh, layer.d, layer.m)

    def panel_matmul(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return quant_matmul_panels_q5(x, layer.qs, layer.qh, layer.d, layer.m)

    def dequantize_weight(self, layer: "Linear", dtype: torch.dtype) -> torch.Tensor:
        return dequantize_q5(layer.qs, layer.qh, layer.d, layer.m, dtype)

    def decode_plan_entry(self, layer: "Linear", dtype: torch.dtype) -> LinearEntry:
        return q5_entry(layer.qs, layer.qh, layer.d, layer.m, layer.dense_weight, layer.bias,
                        self.block_max_rows(dtype), self.panel_max_rows(dtype))
