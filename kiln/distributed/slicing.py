"""Cut one checkpoint tensor down to a rank's part, as it loads (`Linear.tp_slice`).

A column-parallel layer keeps some output rows of each shard (q/k/v, gate/up, a vocabulary range);
a row-parallel one keeps a range of input columns. Dense tensors are sliced directly; GGUF blocks are
sliced as raw bytes (rows, or whole 32-column blocks), so Q4_0/Q4_1/Q8_0 stay in their blocks and
keep running on the native kernels; kiln's quantized buffers are sliced along the dims their method
declares (`LinearMethod.tp_layout`: INT4 codes two columns per byte, group scales one index per
group). A cut that would split a block or a quantization group is a ValueError that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.kernels.kquant_matmul import KQUANT_BYTES, QKK
from kiln.layers.gguf_quant import BLOCK_BYTES, GGUFQuantizedTensor
from kiln.layers.linear import Linear

QK = 32  # GGUF block: 32 weights


@dataclass(frozen=True)
class ColumnSlice:
    """Keep `rows[shard]` of each shard's output rows (in the checkpoint's full layer), padded with zero
    rows up to `padded` per shard when set (the last rank's vocabulary range)."""

    rows: dict[str | None, slice]
    full_sizes: tuple[int, ...]
    padded: int | None = None

    def __call__(self, layer: Linear, name: str, tensor: Any, shard: str | None) -> Any:
        if isinstance(tensor, GGUFQuantizedTensor):
            part = self.rows[shard]
            return GGUFQuantizedTensor(tensor.qtype, self._pad(tensor.raw[part], 0), tensor.cols)
        out_dim, _, _ = layer.method.tp_layout(layer, name)
        if out_dim is None:
            return tensor
        if shard is None and layer.shard_names != [None]:
            # a quantized buffer covering every shard of a fused layer at once: each shard's kept rows
            index = torch.cat([torch.arange(self.rows[s].start, self.rows[s].stop) + offset
                               for s, offset in zip(layer.shard_names, _offsets(self.full_sizes))])
            return tensor.index_select(out_dim, index.to(tensor.device))
        part = self.rows[shard]
        return self._pad(tensor.narrow(out_dim, part.start, part.stop - part.start), out_dim)

    def _pad(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        if self.padded is None or t.shape[dim] >= self.padded:
            return t
        shape = list(t.shape)
        shape[dim] = self.padded - t.shape[dim]
        return torch.cat([t, torch.zeros(shape, dtype=t.dtype, device=t.device)], dim=dim)


@dataclass(frozen=True)
class RowSlice:
    """Keep input columns `cols`; a bias is added once (rank 0 keeps it, the others hold zeros)."""

    cols: slice
    rank: int

    def __call__(self, layer: Linear, name: str, tensor: Any, shard: str | None) -> Any:
        start, stop = self.cols.start, self.cols.stop
        if isinstance(tensor, GGUFQuantizedTensor):
            # whole blocks (32 weights) or K-quant super-blocks (256) stay blocks
            unit, size = (QKK, KQUANT_BYTES[tensor.qtype]) if tensor.qtype in KQUANT_BYTES \
                else (QK, BLOCK_BYTES.get(tensor.qtype, 0))
            if start % unit == 0 and stop % unit == 0 and size:
                return GGUFQuantizedTensor(tensor.qtype, tensor.raw[:, start // unit * size:stop // unit * size],
                                           stop - start)
            tensor = tensor.dequantize()  # the layer is dense anyway (its columns are no whole blocks)
        if name == "bias":
            return tensor if self.rank == 0 else torch.zeros_like(tensor)
        _, in_dim, unit = layer.method.tp_layout(layer, name)
        if in_dim is None:
            return tensor
        if start % unit or stop % unit:
            raise ValueError(f"tensor parallel: this rank's input columns [{start}, {stop}) split the "
                             f"{layer.method.name} layer's groups of {unit} columns; pick a tensor_parallel_size "
                             f"whose share of the columns is a multiple of {unit}")
        return tensor.narrow(in_dim, start // unit, (stop - start) // unit)


def _offsets(sizes: tuple[int, ...]) -> list[int]:
    out, at = [], 0
    for s in sizes:
        out.append(at)
        at += s
    return out
