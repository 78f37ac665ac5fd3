"""kiln's quantized model folder: what `kiln quantize -o DIR` writes and `LLM(DIR)` loads.

    DIR/config.json            Hugging Face config (architecture, sizes, RoPE, tied embeddings) plus
                               "quantization_config": {"quant_method": "kiln", "format_version": 1,
                               "method", "bits", "group_size", "sym", "mean_bits", "calibration",
                               "heldout_kl_mean", "layers": {"model.layers.N.<module>": entry}}
    DIR/model.safetensors      full-precision tensors under their Hugging Face names (fp16), and for
                               each quantized module the tensors its entry's format names
    DIR/tokenizer.json, tokenizer_config.json (chat template, special tokens)

Layer entries (see kiln.layers.quant_linear; modules are kiln's fused ones, qkv_proj and gate_up_proj):
  {"format": "int", "bits": 4|8, "group_size": G|-1, "sym": bool, "smooth": bool}
      qweight uint8 [N, K/2] (int4: two codes per byte, even column low nibble) or [N, K] (int8),
      scales fp16 [N, K/G], qzeros uint8 [N, K/G]; w = (code - zero) * scale;
      smooth fp32 [K] (AWQ): the stored weight is W·diag(smooth), inputs are divided by smooth.
  {"format": "fp8"}  qweight float8_e4m3fn [N, K], scales fp32 [N]; w = q * scale.
  {"format": "w8a8"} qweight_t int8 [K, N], scales fp32 [N], smooth fp32 [K] (SmoothQuant).
Biases of fused modules are saved per shard under their Hugging Face names (q_proj.bias, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kiln.config import ModelConfig
from kiln.errors import ModelLoadError
from kiln.layers.linear import Linear

_HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SAVE_DTYPE = torch.float16


def hf_config(cfg: ModelConfig) -> dict:
    out: dict = {
        "architectures": [_HF_CLASS[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
        "torch_dtype": "float16",
        "_name_or_path": cfg.name,
    }
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": rs.rope_type, "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                               "high_freq_factor": rs.high_freq_factor,
                               "original_max_position_embeddings": rs.original_max_position_embeddings}
    return out


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of `model` under the name kiln's folder loader expects (see module docstring)."""
    unpacked: dict[tuple[str, str], str] = {(fused, shard): leaf for leaf, (fused, shard) in model.packed_modules.items()}
    out: dict[str, torch.Tensor] = {}
    linear_paths = set()
    for path, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        linear_paths.add(path)
        prefix = "lm_head" if path == "lm_head" else f"model.{path}"
        quantized = module.method.quantized_checkpoint
        for name in module.checkpoint_params():
            if name == "bias" and len(module.shard_names) > 1:
                parent, _, leaf = prefix.rpartition(".")
                for shard in module.shard_names:
                    out[f"{parent}.{unpacked[(leaf, shard)]}.bias"] = module.bias.data[module.shard_slice(shard)].to(SAVE_DTYPE)
                continue
            tensor = getattr(module, name).data if name in ("weight", "bias") else getattr(module, name)
            if name == "weight" and not quantized and len(module.shard_names) > 1:
                # a float fused layer (a merged LoRA model, kiln.lora.merge): per shard, as Hugging Face names it
                parent, _, leaf = prefix.rpartition(".")
                for shard in module.shard_names:
                    out[f"{parent}.{unpacked[(leaf, shard)]}.weight"] = tensor[module.shard_slice(shard)].to(SAVE_DTYPE)
                continue
            keep = quantized and name not in ("weight", "bias")
            out[f"{prefix}.{name}"] = tensor.contiguous() if keep else tensor.to(SAVE_DTYPE).contiguous()
    for name, param in model.named_parameters():
        module_path = name.rpartition(".")[0]
        if module_path in linear_paths:
            continue
        out[f"model.{name}"] = param.data.to(SAVE_DTYPE).contiguous()
    return out


def save_quantized(out_dir: Path | str, model: nn.Module, cfg: ModelConfig, tokenizer: "object",
                   quantization_config: dict | None) -> Path:
    """Write the folder; refuses a non-empty existing folder (nothing is overwritten)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.extra.get("rope_freq_factors") is not None and cfg.rope_scaling is None:
        raise ValueError("this model's RoPE frequency factors have no Hugging Face config form; cannot save it")
    config = hf_config(cfg)
    if quantization_config is not None:  # None: a float folder (kiln lora merge without --quantize)
        config["quantization_config"] = quantization_config
    save_file(checkpoint_tensors(model), str(out / "model.safetensors"), metadata={"format": "pt", "producer": "kiln"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.backend.save(str(out / "tokenizer.json"))
    tok_config = {
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "pad_token": None if tokenizer.pad_token_id is None else tokenizer.backend.id_to_token(tokenizer.pad_token_id),
        "add_bos_token": tokenizer.add_bos_token, "add_eos_token": False,
        "chat_template": tokenizer.chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return out


def plan_quantized_layers(model: nn.Module, config_json: dict, source: Path) -> dict | None:
    """Before loading a folder's tensors: switch the Linears its quantization_config names to their methods."""
    from kiln.layers.quant_linear import method_for

    qc = config_json.get("quantization_config")
    if qc is None:
        return None
    if qc.get("quant_method") != "kiln":
        raise ModelLoadError(source, f"quantization_config quant_method {qc.get('quant_method')!r} is not supported; "
                                     "kiln loads full-precision folders, its own (`kiln quantize`) quantized ones, "
                                     "and gptq, awq (GEMM) and compressed-tensors (pack-quantized) checkpoints")
    if qc.get("format_version") != 1:
        raise ModelLoadError(source, f"kiln quantized format version {qc.get('format_version')!r} is not 1")
    for name, entry in (qc.get("layers") or {}).items():
        path = name.removeprefix("model.")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ModelLoadError(source, f"quantization_config names {name!r}, which this architecture lacks") from None
        if not isinstance(module, Linear):
            raise ModelLoadError(source, f"quantization_config names {name!r}, which is not a linear layer")
        try:
            module.set_method(method_for(entry))
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(source, f"bad quantization_config entry for {name!r}: {exc}") from None
    return qc
