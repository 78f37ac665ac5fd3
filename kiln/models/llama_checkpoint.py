"""How Llama-family checkpoints describe themselves: the llama, mistral and qwen2 registry entries.

All three run `LlamaForCausalLM`; they differ only in names and defaults: Qwen2 has q/k/v biases by
default, and llama.cpp's converter permutes the Q/K rows of `llama` and `mistral` models (interleaved
RoPE) but not those of `qwen2` (NeoX RoPE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.config import ModelConfig, RopeScaling
from kiln.errors import ModelLoadError
from kiln.models.architecture import GGUFHeader, ModelArchitecture, WeightNames
from kiln.models.llama import PACKED_MODULES, LlamaForCausalLM

# GGUF per-layer tensor (blk.N.<key>) → Hugging Face sub-module under model.layers.N
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
WEIGHT_NAMES = WeightNames(GGUF_LAYER_NAMES, GGUF_GLOBAL_NAMES, PACKED_MODULES)


def hf_layer_windows(raw: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    """Mistral-style `sliding_window` (every layer, or Qwen2's layers from `max_window_layers` on) as
    per-layer windows; () when the model attends over everything (no window, `use_sliding_window`
    false, or a window no shorter than the context)."""
    window = raw.get("sliding_window")
    if not window or raw.get("use_sliding_window") is False:
        return ()
    if isinstance(raw.get("layer_types"), list) and len(raw["layer_types"]) == layers:  # transformers 5
        windows = tuple(int(window) if t == "sliding_attention" else None for t in raw["layer_types"])
        return windows if any(w is not None for w in windows) else ()
    if int(window) >= int(raw.get("max_position_embeddings", 4096)):
        return ()
    first = int(raw.get("max_window_layers", 0)) if raw.get("model_type") == "qwen2" else 0
    return tuple(int(window) if i >= first else None for i in range(layers))


def config_from_gguf(header: GGUFHeader) -> ModelConfig:
    """GGUF metadata (`<arch>.*`, `tokenizer.ggml.*`, `general.name`) → ModelConfig."""
    key = header.arch_key
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", hidden // heads))
    tokens = header.get("tokenizer.ggml.tokens")
    vocab = int(key("vocab_size", len(tokens) if tokens else None))
    names = header.tensor_names
    scaling = None
    if header.get(f"{header.architecture}.rope.scaling.type") == "linear":
        scaling = RopeScaling("linear", factor=float(key("rope.scaling.factor")))
    eos = header.get("tokenizer.ggml.eos_token_id")
    eot = header.get("tokenizer.ggml.eot_token_id")
    eos_ids = tuple(sorted({int(i) for i in (eos, eot) if i is not None}))
    bos = header.get("tokenizer.ggml.bos_token_id")
    layers = int(key("block_count"))
    window = key("attention.sliding_window", required=False)
    context = int(key("context_length", 4096))
    return ModelConfig(
        architecture=header.architecture,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=context,
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
        name=str(header.get("general.name", header.path.stem)),
        # A Mistral-style window that llama.cpp's converter recorded: every layer slides.
        layer_windows=(int(window),) * layers if window and int(window) < context else (),
    )


def rope_scaling_from_hf(raw: dict[str, Any], source: Path) -> RopeScaling | None:
    """`rope_scaling` (or transformers 5's `rope_parameters`) → RopeScaling; llama3 and linear only."""
    # transformers 5 writes RoPE settings under "rope_parameters"; older files at top level.
    rope_params = raw.get("rope_parameters") or {}
    rs = raw.get("rope_scaling") or None
    if rs is None and rope_params.get("rope_type", "default") != "default":
        rs = rope_params
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(rs["factor"]),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return RopeScaling("linear", factor=float(rs["factor"]))
    if kind not in (None, "default"):
        raise ModelLoadError(source, f"unsupported rope_scaling type {kind!r}")
    return None


def config_from_hf(arch: str, raw: dict[str, Any], folder: Path) -> ModelConfig:
    """A Hugging Face config.json (already parsed) of architecture `arch` → ModelConfig; KeyError names a
    missing key."""
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    scaling = rope_scaling_from_hf(raw, folder / "config.json")
    rope_params = raw.get("rope_parameters") or {}
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return ModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids),
        name=raw.get("_name_or_path", folder.name) or folder.name,
        layer_windows=hf_layer_windows(raw, int(raw["num_hidden_layers"])),
    )


def _entry(name: str, hf_class: str, rope_permuted: bool) -> ModelArchitecture:
    return ModelArchitecture(name, hf_class, LlamaForCausalLM, WEIGHT_NAMES, config_from_gguf, config_from_hf,
                             gguf_rope_permuted=rope_permuted)


ARCHITECTURES = (
    _entry("llama", "LlamaForCausalLM", rope_permuted=True),
    _entry("mistral", "MistralForCausalLM", rope_permuted=True),
    _entry("qwen2", "Qwen2ForCausalLM", rope_permuted=False),
)
