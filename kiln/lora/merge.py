"""Fold a LoRA adapter into its base model's dense weights: W' = W + s · B A for every adapted
projection (kiln.lora.adapter has s folded into B). `kiln lora merge` (kiln.entrypoints.cli_lora)
loads, merges, re-quantizes, saves and measures around this."""

from __future__ import annotations

import torch
from torch import nn

from kiln.layers.linear import Linear
from kiln.lora.adapter import LoRAAdapter, LoRAError


@torch.no_grad()
def merge_into(model: nn.Module, adapter: LoRAAdapter) -> None:
    """Add the adapter's deltas to `model`'s dense Linear weights in place (fp32 math)."""
    for path, delta in adapter.layers.items():
        layer = model.get_submodule(path)
        weight = getattr(layer, "weight", None) if isinstance(layer, Linear) else None
        if weight is None or not weight.is_floating_point():
            raise LoRAError(f"{path} does not hold dense weights; load the base with quantized_weights='dequantize'")
        for j in sorted(delta.shards):
            rows = layer.shard_slice(layer.shard_names[j])
            update = delta.b[rows].float() @ delta.a[:, j].float()
            weight[rows] = (weight[rows].float() + update).to(weight.dtype)
