"""A decoder architecture as the planner needs it: shapes, tied embeddings and per-layer attention windows.

`ArchSpec` is deliberately wider than kiln's runtime `ModelConfig`: the planner budgets models kiln
does not run yet (Gemma 3's sliding-window layers, a 70B model that is not on disk), so it parses a
Hugging Face config.json or a GGUF header itself. Invariants: `len(layer_windows) == num_layers`;
a window of None means full attention over the whole context; num_heads % num_kv_heads == 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Which model types tie the LM head to the embedding when config.json does not say (transformers' defaults).
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text"}


@dataclass(frozen=True)
class ArchSpec:
    """Shapes of a decoder-only transformer with gated MLP (Llama, Mistral, Qwen2, Gemma 3)."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    max_context: int
    layer_windows: tuple[int | None, ...]
    attention_bias: bool = False
    qk_norm: bool = False  # Gemma 3: an RMSNorm over each query and key head
    norms_per_layer: int = 2  # Gemma 3 has four (pre/post attention, pre/post MLP)

    def __post_init__(self) -> None:
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(f"{self.name}: {len(self.layer_windows)} layer windows for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: {self.num_heads} query heads is not a multiple of {self.num_kv_heads} KV heads")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    @property
    def sliding_layers(self) -> int:
        return sum(w is not None for w in self.layer_windows)


def _windows(raw: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    """Per-layer attention windows from config.json's `layer_types`, `sliding_window_pattern` or `sliding_window`."""
    window = raw.get("sliding_window")
    if not window or raw.get("use_sliding_window") is False:
        return (None,) * layers
    window = int(window)
    types = raw.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    pattern = raw.get("sliding_window_pattern")
    if pattern:  # Gemma 3: every `pattern`-th layer is global, the others slide
        return tuple(None if (i + 1) % int(pattern) == 0 else window for i in range(layers))
    if raw.get("model_type") == "qwen2":  # Qwen2 slides only above max_window_layers
        first = int(raw.get("max_window_layers", layers))
        return tuple(window if i >= first else None for i in range(layers))
    return (window,) * layers  # Mistral 7B v0.1: every layer slides


def arch_from_hf_config(raw: dict[str, Any], name: str = "") -> ArchSpec:
    """A Hugging Face config.json (parsed) → ArchSpec. A multimodal wrapper's `text_config` is used when present."""
    if isinstance(raw.get("text_config"), dict):
        outer = raw
        raw = {**raw["text_config"]}
        raw.setdefault("tie_word_embeddings", outer.get("tie_word_embeddings"))
    model_type = str(raw.get("model_type", "llama"))
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    layers = int(raw["num_hidden_layers"])
    tied = raw.get("tie_word_embeddings")
    return ArchSpec(
        name=name or str(raw.get("_name_or_path") or model_type),
        model_type=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        tie_word_embeddings=bool(model_type in _TIED_BY_DEFAULT if tied is None else tied),
        max_context=int(raw.get("max_position_embeddings", 4096)),
        layer_windows=_windows(raw, layers),
        attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type.startswith("gemma3"),
        norms_per_layer=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
    )


def arch_from_gguf_fields(fields: dict[str, Any], tensor_names: set[str], name: str) -> ArchSpec:
    """GGUF metadata (`general.architecture`, `<arch>.*` keys, already decoded) → ArchSpec."""
    arch = str(fields["general.architecture"])

    def key(k: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{k}", default)

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    layers = int(key("block_count"))
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = int(key("vocab_size", len(tokens) if tokens is not None else 0))
    window = key("attention.sliding_window")
    raw: dict[str, Any] = {"model_type": arch, "sliding_window": window}
    if arch == "gemma3":
        raw["sliding_window_pattern"] = 6  # llama.cpp's Gemma 3 layout: 5 local layers, then 1 global
    return ArchSpec(
        name=name, model_type=arch, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")), num_layers=layers, num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        tie_word_embeddings="output.weight" not in tensor_names,
        max_context=int(key("context_length", 4096)),
        layer_windows=_windows(raw, layers),
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        norms_per_layer=4 if "blk.0.post_attention_norm.weight" in tensor_names else 2,
    )
