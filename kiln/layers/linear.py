"""Linear layers whose weights are loaded shard by shard.

A layer owns its parameters and knows how to load each one (`weight_loader`), so the
GGUF and safetensors loaders only have to map a checkpoint name to (parameter, shard).
Fused layers (q,k,v → qkv_proj; gate,up → gate_up_proj) place each shard at its row
offset; the model code never knows which file format the weights came from.

The storage and the math go through a `LinearMethod` (kiln.layers.linear_method) so a quantized
format can replace the matmul without the model file branching on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels.decode_step import LinearEntry, dense_entry
from kiln.kernels.dense_matmul import dense_kernel_rows, dense_linear
from kiln.layers.linear_method import LinearMethod

if TYPE_CHECKING:
    from kiln.layers.gguf_quant import GGUFQuantizedTensor


class DenseLinearMethod(LinearMethod):
    """Plain `x @ W.T (+ b)` in the layer's dtype: on CPU, decode-sized batches on kiln's dense kernel
    (kiln.kernels.dense_matmul: up to the tuned number of rows), the rest on torch's GEMM (oneDNN / MKL on
    CPU, cuBLAS on CUDA)."""

    name = "dense"

    def __init__(self) -> None:
        self._max_rows: int | None = None  # decided at first use, once the weights' dtype and device are final

    def max_rows(self, layer: "Linear") -> int:
        if self._max_rows is None:
            self._max_rows = dense_kernel_rows(layer.weight.dtype, layer.weight.device)
        return self._max_rows

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        limit = self.max_rows(layer)
        if limit == 0:
            return F.linear(x, layer.weight, layer.bias)
        return dense_linear(x, layer.weight, layer.bias, limit)

    def decode_plan_entry(self, layer: "Linear", dtype: torch.dtype) -> LinearEntry:
        return dense_entry(layer.weight, layer.bias, self.max_rows(layer) if layer.weight.dtype == dtype else 0)


class Linear(nn.Module):
    """y = x W^T + b with W of shape [sum(output_sizes), input_size].

    `shard_names` lists the logical sub-matrices stacked along the output dimension, in
    order (a plain Linear has a single shard named None).
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        shard_names: list[str | None] | None = None,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.shard_names = list(shard_names) if shard_names is not None else [None]
        if len(self.shard_names) != len(self.output_sizes):
            raise ValueError("shard_names and output_sizes must have the same length")
        out = sum(output_sizes)
        self.weight = nn.Parameter(torch.empty(out, input_size, dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        self.method: LinearMethod = DenseLinearMethod()
        self.loaded_shards: set[tuple[str, str | None]] = set()
        # Tensor parallel (set from outside by kiln.distributed, before loading): cuts each checkpoint
        # tensor down to this rank's part; the layer's sizes are already this rank's.
        self.tp_slice: Callable[[Linear, str, Any, str | None], Any] | None = None
        # LoRA (set by kiln.lora when the engine serves adapters): adds this batch's low-rank deltas to
        # the output of the method's apply, so adapters run on top of any weight format.
        self.lora: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def shard_slice(self, shard: str | None) -> slice:
        idx = self.shard_names.index(shard)
        start = sum(self.output_sizes[:idx])
        return slice(start, start + self.output_sizes[idx])

    def set_method(self, method: LinearMethod) -> None:
        """Switch to another LinearMethod before loading; it may replace `weight` by its own buffers."""
        method.create_weights(self)
        self.method = method

    def checkpoint_params(self) -> list[str]:
        """Names a checkpoint must provide for this layer (whatever buffers the method keeps)."""
        return self.method.checkpoint_params(self) + (["bias"] if self.bias is not None else [])

    def weight_loader(self, param_name: str, loaded: "torch.Tensor | GGUFQuantizedTensor", shard: str | None = None) -> None:
        """Hand a checkpoint tensor to the method (`weight`/`bias` at `shard`'s rows, or one of its own
        buffers); ValueError naming the expected shape when the checkpoint disagrees."""
        if self.tp_slice is not None:
            loaded = self.tp_slice(self, param_name, loaded, shard)
        self.method.load_param(self, param_name, loaded, shard)
        self.loaded_shards.add((param_name, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora is not None:
            return self.lora(self.method.apply(self, x), x)
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_sizes}, method={self.method.name}"
