"""How Gemma 3 checkpoints describe themselves: the `gemma3` registry entry (GGUF and Hugging Face).

GGUF (llama.cpp's converter): `gemma3.*` keys; the local/global layout is not stored (llama.cpp
hard-codes it: every sixth layer global) nor is the local RoPE base (10,000); Q/K rows are in HF
order (NeoX RoPE, no permutation); norm weights already hold `1 + w`.
Hugging Face (`Gemma3ForCausalLM`, model_type gemma3_text): `layer_types`, `sliding_window`,
`rope_parameters` per layer type (transformers 5) or `rope_theta` / `rope_local_base_freq`; norm
weights hold `w`, so the loader adds the one (`extra["norm_offset"]`, read by the model's norms).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.config import ModelConfig, RopeScaling
from kiln.errors import ModelLoadError
from kiln.models.architecture import GGUFHeader, ModelArchitecture, WeightNames
from kiln.models.gemma3 import Gemma3ForCausalLM, gemma_layer_windows
from kiln.models.llama import PACKED_MODULES

GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
WEIGHT_NAMES = WeightNames(GGUF_LAYER_NAMES, GGUF_GLOBAL_NAMES, PACKED_MODULES)

# Gemma's turn format. The system prompt has no turn of its own: it opens the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if loop.first and system %}{{ system + '\n\n' }}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def config_from_gguf(header: GGUFHeader) -> ModelConfig:
    """GGUF `gemma3.*` metadata → ModelConfig (windows in llama.cpp's fixed 5-local-1-global layout)."""
    key = header.arch_key
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    layers = int(key("block_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    tokens = header.get("tokenizer.ggml.tokens")
    scaling = None
    if header.get("gemma3.rope.scaling.type") == "linear":
        scaling = RopeScaling("linear", factor=float(key("rope.scaling.factor")))
    eos, eot = header.get("tokenizer.ggml.eos_token_id"), header.get("tokenizer.ggml.eot_token_id")
    bos = header.get("tokenizer.ggml.bos_token_id")
    cfg = ModelConfig(
        architecture=header.architecture, vocab_size=int(key("vocab_size", len(tokens) if tokens else None)),
        hidden_size=hidden, intermediate_size=int(key("feed_forward_length")), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=int(key("attention.head_count_kv", heads)), head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 1_000_000.0)), rope_scaling=scaling,
        max_position_embeddings=int(key("context_length", 32768)),
        tie_word_embeddings="output.weight" not in header.tensor_names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=tuple(sorted({int(i) for i in (eos, eot) if i is not None})),
        name=str(header.get("general.name", header.path.stem)),
        layer_windows=gemma_layer_windows(layers, int(key("attention.sliding_window"))),
    )
    cfg.extra.update(rope_local_base=10000.0, query_pre_attn_scalar=float(head_dim), norm_offset=0.0)
    return cfg


def _layer_windows(raw: dict[str, Any], layers: int, source: Path) -> tuple[int | None, ...]:
    window = int(raw["sliding_window"])
    types = raw.get("layer_types")
    if types is None:
        return gemma_layer_windows(layers, window, int(raw.get("sliding_window_pattern", 6)))
    if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ModelLoadError(source, f"layer_types must list sliding_attention/full_attention for {layers} layers")
    return tuple(window if t == "sliding_attention" else None for t in types)


def config_from_hf(arch: str, raw: dict[str, Any], folder: Path) -> ModelConfig:
    """A Gemma3ForCausalLM config.json → ModelConfig; KeyError names a missing key."""
    source = folder / "config.json"
    if raw.get("attn_logit_softcapping") or raw.get("final_logit_softcapping"):
        raise ModelLoadError(source, "logit soft-capping (Gemma 2) is not supported")
    rope = raw.get("rope_parameters") or {}
    full, local = rope.get("full_attention", {}), rope.get("sliding_attention", {})
    scaling_raw = full if full.get("rope_type", "default") != "default" else raw.get("rope_scaling")
    scaling = None
    if scaling_raw:
        kind = scaling_raw.get("rope_type", scaling_raw.get("type"))
        if kind != "linear":
            raise ModelLoadError(source, f"unsupported Gemma 3 rope scaling {kind!r} (kiln supports linear)")
        scaling = RopeScaling("linear", factor=float(scaling_raw["factor"]))
    layers, heads, hidden = int(raw["num_hidden_layers"]), int(raw["num_attention_heads"]), int(raw["hidden_size"])
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    head_dim = int(raw.get("head_dim") or hidden // heads)
    cfg = ModelConfig(
        architecture=arch, vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]), num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads), head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(full.get("rope_theta", raw.get("rope_theta", 1_000_000.0))), rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        attention_bias=bool(raw.get("attention_bias", False)), bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids), name=raw.get("_name_or_path", folder.name) or folder.name,
        layer_windows=_layer_windows(raw, layers, source),
    )
    cfg.extra.update(rope_local_base=float(local.get("rope_theta", raw.get("rope_local_base_freq", 10000.0))),
                     query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar", head_dim)), norm_offset=1.0)
    return cfg


ARCHITECTURES = (
    ModelArchitecture("gemma3", "Gemma3ForCausalLM", Gemma3ForCausalLM, WEIGHT_NAMES, config_from_gguf,
                      config_from_hf, default_chat_template=GEMMA_CHAT_TEMPLATE),
)
