"""Write a model kiln has loaded as a GGUF file llama.cpp runs (`kiln convert --to gguf`).

What is written: llama.cpp's `llama` (Llama/Mistral/SmolLM2) or `qwen2` metadata; the tokenizer
(copied key by key from a GGUF source; built from tokenizer.json for a byte-level BPE folder);
every 2-D weight in the requested type — F16, Q8_0, Q4_0 or Q4_1 via the `gguf` library's own
quantizers, token embedding and output included (rows not a multiple of 32 long fall back to
F16) — and norms/biases in F32. Q and K rows are permuted into llama.cpp's interleaved-RoPE order
for the llama architecture (the inverse of what kiln's GGUF loader undoes). Weights come from the
model as kiln computes with them: kiln-quantized layers are dequantized first, so converting a
kiln INT4 folder to q4_0 re-quantizes its dequantized weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kiln.layers.linear import Linear
from kiln.loader.gguf_loader import _GLOBAL_NAMES, _LAYER_NAMES, _qk_heads

TYPES = ("f16", "q8_0", "q4_0", "q4_1")
_HF_TO_GGUF_LAYER = {hf: gg for gg, hf in _LAYER_NAMES.items()}
_HF_TO_GGUF_GLOBAL = {hf: gg for gg, hf in _GLOBAL_NAMES.items()}


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """kiln's rotate-half row order → llama.cpp's interleaved one (inverse of gguf_loader.unpermute_qk)."""
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_name(hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`."""
    module, _, param = hf_name.rpartition(".")
    if module.startswith("model.layers."):
        _, _, idx, sub = module.split(".", 3)
        return f"blk.{idx}.{_HF_TO_GGUF_LAYER[sub]}.{param}"
    return f"{_HF_TO_GGUF_GLOBAL[module]}.{param}"


def hf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor under its Hugging Face name, fp32, fused layers split into their shards."""
    unpacked = {(fused, shard): leaf for leaf, (fused, shard) in model.packed_modules.items()}
    out: dict[str, torch.Tensor] = {}
    linear_paths = set()
    for path, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        linear_paths.add(path)
        weight = (module.method.dequantized_weight(module, torch.float32) if hasattr(module.method, "dequantized_weight")
                  else module.weight.data.float())
        prefix = "lm_head" if path == "lm_head" else f"model.{path}"
        parent, _, leaf = prefix.rpartition(".")
        for shard in module.shard_names:
            name = prefix if shard is None else f"{parent}.{unpacked[(leaf, shard)]}"
            rows = module.shard_slice(shard)
            out[f"{name}.weight"] = weight[rows]
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias.data[rows].float()
    for name, param in model.named_parameters():
        if name.rpartition(".")[0] not in linear_paths:
            out[f"model.{name}"] = param.data.float()
    return out


def _copy_tokenizer_from_gguf(writer: "object", source: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[-1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


def _tokenizer_from_hf(writer: "object", tokenizer: "object", folder: Path) -> None:
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or not tokenizer.byte_level:
        raise ValueError("only byte-level BPE tokenizers (GPT-2 style) can be written from a folder; "
                         "convert from the original GGUF instead")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(tokenizer.all_special_ids)
    added = tokenizer.added_token_ids
    types = [3 if i in special else 4 if i in added else 1 for i in range(len(tokens))]  # control / user / normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(config.get("gguf_pre", "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(tokenizer.add_bos_token)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def convert_to_gguf(loaded: "object", out_path: Path | str, qtype: str, force: bool = False) -> Path:
    """Write `loaded` (a kiln LoadedModel) to `out_path` with 2-D weights in `qtype`; returns the path."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType
    from gguf.quants import quantize

    if qtype not in TYPES:
        raise ValueError(f"--type must be one of {', '.join(TYPES)}, got {qtype!r}")
    out = Path(out_path)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    cfg = loaded.config
    ggml = {"f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0,
            "q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1}[qtype]
    arch = "qwen2" if cfg.architecture == "qwen2" else "llama"
    writer = GGUFWriter(str(out), arch)
    writer.add_name(cfg.name or "kiln-converted")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1}[qtype])
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
    if loaded.file_format == "gguf":
        _copy_tokenizer_from_gguf(writer, Path(loaded.source))
    else:
        _tokenizer_from_hf(writer, loaded.tokenizer, Path(loaded.source))

    factors = cfg.extra.get("rope_freq_factors")
    if factors is not None:  # llama3 RoPE scaling travels as a tensor in GGUF
        writer.add_tensor("rope_freqs.weight", np.asarray(factors, dtype=np.float32))
    for hf_name, tensor in hf_tensors(loaded.model).items():
        name = gguf_name(hf_name)
        data = tensor.cpu().numpy().astype(np.float32)
        heads = _qk_heads(name, cfg)
        if heads is not None:
            data = permute_qk(data, heads)
        if data.ndim == 1:
            writer.add_tensor(name, data)
        elif ggml == GGMLQuantizationType.F16 or data.shape[1] % 32:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(data, ggml), raw_dtype=ggml)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
