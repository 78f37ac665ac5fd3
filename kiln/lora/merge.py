"""`kiln lora merge`: fold a LoRA adapter into its base model's weights and write a model folder.

W' = W + s · B A for every adapted projection (kiln.lora.adapter has s folded into B). The base is
loaded with its weights dequantized to fp32, the deltas added there, and the result written as a
Hugging Face safetensors folder kiln (and transformers) load; `quantize` re-quantizes it first with a
`kiln quantize` method (the folder is then kiln's quantized format). The merged model's distance
from what it replaces, the base model serving the adapter (kiln.lora's batched path in fp32), is
measured as KL on a few WikiText windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kiln.layers.linear import Linear
from kiln.lora.adapter import LoRAAdapter, LoRAError

if TYPE_CHECKING:
    from kiln.quantization.quantize import QuantizeOptions


@dataclass
class MergeReport:
    out: Path
    quantized: str | None  # e.g. "gptq int4 g128", None for a float folder
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    n_tokens: int

    def describe(self) -> str:
        what = f"re-quantized ({self.quantized})" if self.quantized else "float16"
        return (f"saved {self.out}: merged, {what}; KL vs base+adapter over {self.n_tokens} tokens: mean "
                f"{self.kl_mean:.5f}, p99 {self.kl_p99:.4f}, top-1 agreement {self.top1_agreement:.1%}")


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


def merge_adapter(base: str, adapter_path: str, out: str | Path, quantize: "QuantizeOptions | None" = None,
                  kl_windows: int = 4, ctx: int = 512, progress: bool = True) -> MergeReport:
    """Merge, quantize when `quantize` says how, save to `out` (a new or empty folder), reload it and
    measure its KL against the base model serving the adapter."""
    from kiln.data import WIKITEXT2_TEST, data_path
    from kiln.eval.kl_divergence import kl_divergence
    from kiln.hub import resolve_model
    from kiln.loader.model_loader import load_model
    from kiln.lora.adapter import load_adapter
    from kiln.lora.manager import LoRAManager
    from kiln.quantization.checkpoint import save_quantized

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoRAError(f"{out} exists and is not an empty folder; choose a new output folder")
    opts = quantize
    if opts is not None:
        opts.validate()  # before the model loads
    source = resolve_model(base)
    loaded = load_model(source, dtype=torch.float32, quantized_weights="dequantize")
    adapter = load_adapter("merge", adapter_path, loaded.model, max_rank=1 << 16, dtype=torch.float32)
    merge_into(loaded.model, adapter)
    quantization_config = None
    if opts is not None:
        from kiln.quantization.quantize import quantize_model

        quantization_config = quantize_model(loaded.model, loaded.tokenizer, opts).quantization_config
    save_quantized(out, loaded.model, loaded.config, loaded.tokenizer, quantization_config)
    del loaded
    # the reference: the base model serving the adapter through kiln's LoRA path, in fp32
    reference = load_model(source, dtype=torch.float32, quantized_weights="dequantize")
    manager = LoRAManager(reference.model, 1, adapter.rank)
    manager.add("adapter", adapter_path)
    merged = load_model(out, dtype=torch.float32)
    text = data_path(WIKITEXT2_TEST).read_bytes().decode("utf-8", errors="replace")
    with manager.applied("adapter"):
        kl = kl_divergence(merged.model, reference.model, reference.tokenizer, text, ctx, kl_windows, progress=progress)
    label = None
    if opts is not None:
        label = f"{opts.method} int{opts.bits}" + ("" if opts.bits == 8 else f" g{opts.group_size}")
    return MergeReport(out, label, kl.kl_mean, kl.kl_p99, kl.top1_agreement, kl.n_tokens_scored)
