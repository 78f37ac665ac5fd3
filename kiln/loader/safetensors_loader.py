"""Hugging Face model folders: config.json + *.safetensors (single file or sharded with an index).

Only safetensors are read — never pickle-based `.bin` checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kiln.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from kiln.errors import ModelLoadError

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(folder, "no config.json in this folder (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(path, f"invalid JSON ({exc})") from None


def hf_model_config(folder: Path) -> ModelConfig:
    raw = read_config_json(folder)
    archs = raw.get("architectures") or []
    arch = _HF_ARCHITECTURES.get(archs[0] if archs else "", raw.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            folder / "config.json",
            f"unsupported architecture {archs[0] if archs else raw.get('model_type')!r}; "
            f"kiln supports: {', '.join(sorted(_HF_ARCHITECTURES))}",
        )
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        scaling = None
        # transformers 5 writes RoPE settings under "rope_parameters"; older files at top level.
        rope_params = raw.get("rope_parameters") or {}
        rs = raw.get("rope_scaling") or None
        if rs is None and rope_params.get("rope_type", "default") != "default":
            rs = rope_params
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind == "llama3":
                scaling = RopeScaling(
                    "llama3",
                    factor=float(rs["factor"]),
                    low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
                )
            elif kind == "linear":
                scaling = RopeScaling("linear", factor=float(rs["factor"]))
            elif kind not in (None, "default"):
                raise ModelLoadError(folder / "config.json", f"unsupported rope_scaling type {kind!r}")
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
        )
    except KeyError as exc:
        raise ModelLoadError(folder / "config.json", f"missing key {exc.args[0]!r}") from None


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except json.JSONDecodeError as exc:
            raise ModelLoadError(index, f"invalid JSON ({exc})") from None
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(folder, "no *.safetensors files (kiln never loads pickle .bin checkpoints)")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f, "listed in model.safetensors.index.json but missing")
    return files


def iter_safetensors_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for file in safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as exc:
            raise ModelLoadError(file, f"corrupt or truncated safetensors file ({exc})") from None
