"""A tiny random Gemma 3 (transformers' own Gemma3ForCausalLM, random weights, norms included) written
as a Hugging Face folder (`save_pretrained`) and as a GGUF file the way llama.cpp's converter writes one
(`gemma3.*` keys, norm weights stored as 1 + w, F32 tensors).

Six layers with a window of 8: layers 0-4 slide, layer 5 is global, so sequences of a few dozen
tokens exercise every window rule. Nothing here imports kiln.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from loader.tiny_model import BOS_ID, EOS_ID, MERGES, VOCAB_SIZE, vocabulary, write_hf_tokenizer

WINDOW = 8
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
          "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


@dataclass
class TinyGemma:
    hf_model: torch.nn.Module  # transformers Gemma3ForCausalLM, fp32, eval
    folder: Path
    gguf: Path


def make_hf_model(query_pre_attn_scalar: int = 16, seed: int = 0, layers: int = 6) -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=WINDOW, max_position_embeddings=4608,
        query_pre_attn_scalar=query_pre_attn_scalar, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=0,
        rms_norm_eps=1e-6, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # transformers initializes norms to 0 (a multiplier of 1): random ones catch a missing "+ 1".
            p.normal_(0.0, 0.3 if "norm" in name else 0.05)
    return model


def write_gguf(model: torch.nn.Module, path: Path) -> Path:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("kiln-tiny-gemma3")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    tokens, types = vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(True)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        array = t.float().numpy().copy()
        if "norm" in name:
            array = array + 1.0  # llama.cpp's converter stores Gemma's norm multiplier 1 + w
        parts = name.removeprefix("model.").split(".")
        if parts[0] == "layers":
            gguf_name = f"blk.{parts[1]}.{_LAYER['.'.join(parts[2:-1])]}.{parts[-1]}"
        else:
            gguf_name = {"embed_tokens": "token_embd", "norm": "output_norm"}[parts[0]] + "." + parts[-1]
        w.add_tensor(gguf_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def build(root: Path, query_pre_attn_scalar: int = 16) -> TinyGemma:
    """The model, its HF folder and its GGUF file under `root`."""
    model = make_hf_model(query_pre_attn_scalar)
    folder = root / f"hf-gemma3-{query_pre_attn_scalar}"
    model.save_pretrained(folder)
    write_hf_tokenizer(folder)
    return TinyGemma(model, folder, write_gguf(model, root / f"gemma3-{query_pre_attn_scalar}.gguf"))
