"""Route checkpoint tensors (Hugging Face names) to the parameters' own weight loaders.

Both file-format loaders produce `(hf_name, tensor)` pairs; this module maps each name to
a module, parameter and shard (fused q/k/v and gate/up) with the architecture's `WeightNames`
(kiln.models.registry), checks shapes, and reports any parameter left unloaded. It is the single
place where names meet modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from kiln.errors import ModelLoadError
from kiln.layers.gguf_quant import GGUFQuantizedTensor
from kiln.layers.linear import Linear
from kiln.models.architecture import WeightNames
from kiln.models.registry import get_architecture


def expected_shards(model: nn.Module) -> set[tuple[str, str, str | None]]:
    """Every (module, parameter, shard) a complete checkpoint must provide."""
    needed: set[tuple[str, str, str | None]] = set()
    for mod_name, module in model.named_modules():
        if not isinstance(module, Linear):
            needed.update((mod_name, p, None) for p, _ in module.named_parameters(recurse=False))
            continue
        for p_name in module.checkpoint_params():
            by_shard = getattr(module.method, "buffers_by_shard", False)
            if p_name not in ("weight", "bias") and module.method.quantized_checkpoint and not by_shard:
                needed.add((mod_name, p_name, None))  # a quantized method's buffers cover all shards at once
                continue
            for shard in module.shard_names:
                needed.add((mod_name, p_name, shard))
    return needed


def weight_targets(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], source: Path | str,
                   names: WeightNames) -> Iterator[tuple[str, torch.Tensor, nn.Module, tuple[str, str, str | None]]]:
    """(checkpoint name, tensor, target module, (module path, param, shard)) for each tensor that loads: a tied
    model's `lm_head.weight` (the embedding is the source of truth) and RoPE's `inv_freq` (computed) are skipped;
    a name the architecture has no module for is a ModelLoadError."""
    tied = getattr(model, "lm_head", None) is None
    for hf_name, tensor in weights:
        if (tied and hf_name == "lm_head.weight") or "rotary_emb.inv_freq" in hf_name:
            continue
        target = names.target(hf_name)
        try:
            module = model.get_submodule(target[0])
        except AttributeError:
            raise ModelLoadError(source, f"unexpected tensor {hf_name!r} (not part of this architecture)") from None
        yield hf_name, tensor, module, target


def is_tied_block_embedding(model: nn.Module, module: nn.Module, hf_name: str, tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a tied model's embedding kept in GGUF blocks, which becomes its LM head."""
    return (isinstance(tensor, GGUFQuantizedTensor) and getattr(model, "lm_head", None) is None
            and hf_name.endswith("embed_tokens.weight") and not hasattr(module, "weight_loader")
            and hasattr(model, "attach_quantized_tied_head"))


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], source: Path | str,
                       names: WeightNames | None = None) -> None:
    """Load every tensor; raise ModelLoadError naming `source` on a shape mismatch or a missing tensor.

    `names`: the architecture's checkpoint names (default: the registry entry of `model.config`)."""
    if names is None:
        names = get_architecture(model.config.architecture, source).weight_names
    needed = expected_shards(model)
    for hf_name, tensor, module, (module_path, param, shard) in weight_targets(model, weights, source, names):
        try:
            if is_tied_block_embedding(model, module, hf_name, tensor):
                model.attach_quantized_tied_head(tensor)  # the LM head reads the blocks natively
            load_tensor(module, param, tensor, shard)
        except ValueError as exc:
            raise ModelLoadError(source, f"tensor {hf_name!r}: {exc}") from None
        needed.discard((module_path, param, shard))
    if needed:
        missing = sorted(f"{m}.{p}" + (f" ({s})" if s else "") for m, p, s in needed)
        raise ModelLoadError(source, f"missing tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))


def load_tensor(module: nn.Module, param: str, tensor: "torch.Tensor | GGUFQuantizedTensor", shard: str | None) -> None:
    """Copy one checkpoint tensor into `module.param` (at `shard`'s rows): through the module's own
    `weight_loader` when it has one, else dequantized and copied; ValueError on a shape mismatch."""
    if hasattr(module, "weight_loader"):
        module.weight_loader(param, tensor, shard)
        return
    if isinstance(tensor, GGUFQuantizedTensor):
        tensor = tensor.dequantize()
    target = getattr(module, param)
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"shape mismatch: expected {tuple(target.shape)}, got {tuple(tensor.shape)}")
    target.data.copy_(tensor)  # copy_ casts element by element: no converted temporary of a large tensor
