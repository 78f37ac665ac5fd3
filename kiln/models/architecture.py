"""What the loaders need to know about one model architecture, and what they may assume of its model.

An architecture (`ModelArchitecture`) bundles the model class with everything that differs between
architectures on the checkpoint side: how tensors are named (`WeightNames`) and how a GGUF header or a
Hugging Face config.json becomes a `ModelConfig`. kiln.models.registry maps architecture names to
these entries; the loaders and the runner ask it and never name a model class themselves.

Nothing here imports the `gguf` library: a config parser reads a `GGUFHeader`, which the GGUF loader
fills from the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from kiln.config import ModelConfig
from kiln.errors import ModelLoadError

if TYPE_CHECKING:
    from kiln.kernels.attention_metadata import AttentionMetadata
    from kiln.kernels.kv_quant import KVCache


class CausalLM(Protocol):
    """What the loader, the model runner and the engine use of a model, whatever its architecture.

    Constructed as `model_class(config, dtype, device)`; every tensor lives on `device` in `dtype`
    (quantized layers keep their own storage types). `forward` takes a flat token batch and the
    paged KV caches (one per layer) and returns final hidden states; `compute_logits` turns the rows
    that sample into fp32 logits. The GGUF loader sets `keep_gguf_blocks` / `keep_dense_copies`
    before loading and calls `finalize_quantized_layers` once every tensor is in (per decoder layer
    under a weight budget, where the model is built on the meta device and materialized layer by layer).
    """

    config: ModelConfig
    dtype: torch.dtype
    device: torch.device
    keep_gguf_blocks: bool
    keep_dense_copies: bool

    def finalize_quantized_layers(self, root: torch.nn.Module | None = None) -> None: ...

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: "AttentionMetadata",
                 kv_caches: "list[KVCache]") -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class WeightNames:
    """How one architecture's checkpoint tensor names map onto kiln's parameters.

    Hugging Face names are the common currency. A GGUF tensor is first renamed to its HF name
    (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`); an HF name then becomes a
    kiln (module path, parameter, shard): the `model.` prefix dropped, and a packed sub-module
    (q_proj → shard "q" of qkv_proj) resolved to its fused module. Invariant: every name the
    model's `named_parameters` holds is reachable this way from exactly one checkpoint name per shard.
    """

    gguf_layer: Mapping[str, str]  # GGUF per-layer name (blk.N.<key>) → HF sub-module under model.layers.N
    gguf_global: Mapping[str, str]  # GGUF top-level name → HF module (token_embd → model.embed_tokens)
    packed_modules: Mapping[str, tuple[str, str]]  # HF sub-module → (kiln fused module, shard)

    def hf_name(self, gguf_name: str) -> str | None:
        """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; None for a name this table lacks."""
        parts = gguf_name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in self.gguf_layer:
            return f"model.layers.{parts[1]}.{self.gguf_layer[parts[2]]}.{parts[3]}"
        if len(parts) == 2 and parts[0] in self.gguf_global:
            return f"{self.gguf_global[parts[0]]}.{parts[1]}"
        return None

    def target(self, hf_name: str) -> tuple[str, str, str | None]:
        """HF name → (module path in kiln's model, parameter name, shard or None)."""
        name = hf_name.removeprefix("model.")
        module_path, _, param = name.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        if leaf in self.packed_modules:
            fused, shard = self.packed_modules[leaf]
            return f"{parent}.{fused}" if parent else fused, param, shard
        return module_path, param, None


@dataclass(frozen=True)
class GGUFHeader:
    """The metadata of one GGUF file, as a config parser reads it.

    `lookup(key)` gives a key's decoded value, or None when the file lacks it; values are decoded
    only when asked for (a vocabulary holds hundreds of thousands of strings).
    """

    architecture: str  # general.architecture
    lookup: Callable[[str], Any]
    tensor_names: frozenset[str]
    path: Path

    def get(self, key: str, default: Any = None) -> Any:
        value = self.lookup(key)
        return default if value is None else value

    def arch_key(self, name: str, default: Any = None, required: bool = True) -> Any:
        """`<architecture>.<name>` (e.g. llama.block_count); ModelLoadError when required and absent."""
        value = self.get(f"{self.architecture}.{name}", default)
        if value is None and required:
            raise ModelLoadError(self.path, f"missing metadata key {self.architecture}.{name}")
        return value


@dataclass(frozen=True)
class ModelArchitecture:
    """One registered architecture (see kiln.models.registry).

    `name` is the GGUF `general.architecture` value and `ModelConfig.architecture`; `hf_class` the
    Hugging Face `architectures[0]` value. `config_from_hf(name, raw, folder)` may raise KeyError for a
    missing key (the loader reports it); both parsers raise ModelLoadError for anything else.
    `gguf_rope_permuted`: llama.cpp's converter stored this architecture's Q/K rows in its
    interleaved-RoPE order, which the GGUF loader undoes (and the GGUF writer redoes).
    `default_chat_template`: the architecture's own turn format, used when a file ships no template
    (instead of the ChatML guess).
    """

    name: str
    hf_class: str
    model_class: type[torch.nn.Module]  # model_class(config, dtype, device) is a CausalLM
    weight_names: WeightNames
    config_from_gguf: Callable[[GGUFHeader], ModelConfig]
    config_from_hf: Callable[[str, dict[str, Any], Path], ModelConfig]
    gguf_rope_permuted: bool = False
    default_chat_template: str | None = None
