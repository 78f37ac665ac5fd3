"""`LinearMethod`: what a `Linear`'s weights are, how they load, and how its output is computed.

A `Linear` owns the layer's shape and shards; its method decides the storage (a dense `weight`,
GGUF blocks, kiln's INT/FP8 codes...) and the math. Every hook has a default here, so callers call
them on any method and never probe for one:

  create_weights(layer)                 once, when the method is set, before any tensor is loaded
  load_param(layer, name, tensor, shard) per checkpoint tensor
  process_weights_after_loading(layer, dense)  once, after the last tensor (repacking, dense copies)
  apply(layer, x)                       every forward
  decode_plan_entry(layer, dtype)       when the fused decode step builds its plan (after loading)

Invariant: after `process_weights_after_loading`, `apply` and the plan entry compute the same thing
(the fused step's bit-identity test holds them to it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from kiln.kernels.decode_step import LinearEntry
    from kiln.layers.gguf_quant import GGUFQuantizedTensor
    from kiln.layers.linear import Linear


class LinearMethod(ABC):
    """Base of every way a `Linear` can hold and apply its weights (see the module docstring)."""

    #: A checkpoint holds this method's own tensors (qweight, scales, ...), each covering every shard
    #: of a fused layer at once, instead of a dense `weight` per shard (kiln's quantized folders).
    quantized_checkpoint: ClassVar[bool] = False

    @property
    @abstractmethod
    def name(self) -> str:
        """Which path the layer takes, in words (`kiln info` prints it)."""

    def create_weights(self, layer: "Linear") -> None:
        """Replace or add the layer's tensors before loading. Default: keep the dense `weight`."""

    def checkpoint_params(self, layer: "Linear") -> list[str]:
        """Names of the tensors a checkpoint provides for this layer, bias aside."""
        return ["weight"]

    def load_param(self, layer: "Linear", name: str, tensor: "torch.Tensor | GGUFQuantizedTensor",
                   shard: str | None = None) -> None:
        """Copy one checkpoint tensor into the layer. Default: `weight` or `bias` rows of `shard`, a GGUF
        block tensor dequantized first; ValueError (naming the expected shape) when it does not fit."""
        load_dense_rows(layer, name, tensor, shard)

    def tp_layout(self, layer: "Linear", name: str) -> tuple[int | None, int | None, int]:
        """How checkpoint tensor `name` lies over the layer, for tensor-parallel slicing: (its dim along the
        output rows or None, its dim along the input columns or None, input columns per index along that
        dim). Default: a dense `weight` [out, in] and `bias` [out]."""
        if name == "weight":
            return 0, 1, 1
        if name == "bias":
            return 0, None, 1
        raise ValueError(f"{self.name}: no tensor-parallel layout for {name!r}")

    def process_weights_after_loading(self, layer: "Linear", dense: torch.Tensor | None = None) -> None:
        """Once every tensor is loaded. `dense`: an existing dense copy of the weight to adopt (a tied
        embedding serving as LM head). Default: nothing to do."""

    @abstractmethod
    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        """y = x W^T (+ b) for activations x [..., in] in the model dtype."""

    def decode_plan_entry(self, layer: "Linear", dtype: torch.dtype) -> "LinearEntry | None":
        """This layer's part of the fused decode step's plan for activations of `dtype`, or None when the
        fused step cannot run it (the plan builder then reports this method's `name` as the reason and
        the model keeps the plain path). Default: None."""
        return None


def load_dense_rows(layer: "Linear", name: str, tensor: "torch.Tensor | GGUFQuantizedTensor",
                    shard: str | None) -> None:
    """Copy `tensor` into the rows of `shard` in the layer's dense `weight` or `bias`."""
    from kiln.layers.gguf_quant import GGUFQuantizedTensor  # gguf_quant subclasses LinearMethod

    if isinstance(tensor, GGUFQuantizedTensor):
        tensor = tensor.dequantize()
    param = getattr(layer, name, None) if name in ("weight", "bias") else None
    if param is None:
        raise ValueError(f"this layer has no {name}")
    target = param.data[layer.shard_slice(shard)]
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(f"shape mismatch: expected {tuple(target.shape)}, got {tuple(tensor.shape)}")
    target.copy_(tensor)  # copy_ casts element by element: no converted temporary
