"""LoRA adapters: PEFT folders loaded onto kiln's fused layers, served many at once from fixed slots
(batched per-adapter low-rank deltas on top of any base weight format), or merged into the weights
(`kiln lora merge`). See README "LoRA adapters"."""

from kiln.lora.request import LoRARequest

__all__ = ["LoRARequest"]
