"""The model registry: which entry serves which checkpoint, and the one error for an unknown architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.errors import KilnError, ModelLoadError
from kiln.loader.safetensors_loader import hf_model_config
from kiln.models.llama import LlamaForCausalLM
from kiln.models.registry import architecture_for_hf, get_architecture

SUPPORTED = ("llama", "mistral", "qwen2", "gemma3", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
             "Gemma3ForCausalLM")


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_gguf_names_map_to_the_llama_model(name: str) -> None:
    entry = get_architecture(name, "x.gguf")
    assert entry.name == name and entry.model_class is LlamaForCausalLM
    assert entry.weight_names.packed_modules is LlamaForCausalLM.packed_modules


def test_only_llama_cpp_permuted_architectures_are_unpermuted() -> None:
    assert [get_architecture(n, "x").gguf_rope_permuted for n in ("llama", "mistral", "qwen2")] == [True, True, False]


@pytest.mark.parametrize("name", ["phi3", "gpt2", None, 7])
def test_unknown_architecture_is_one_user_error_listing_the_supported_ones(name: object) -> None:
    with pytest.raises(ModelLoadError) as info:
        get_architecture(name, "model.gguf")
    message = str(info.value)
    assert isinstance(info.value, KilnError)
    assert message.startswith(f"model.gguf: unsupported architecture {name!r}")
    assert all(s in message for s in SUPPORTED)


@pytest.mark.parametrize("config, expected", [
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "qwen2"),
    ({"architectures": ["MistralForCausalLM"]}, "mistral"),
    ({"architectures": ["LlamaForSomethingElse"], "model_type": "llama"}, "llama"),  # model_type is the fallback
    ({"model_type": "mistral"}, "mistral"),
    ({"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}, "gemma3"),
])
def test_hf_config_finds_its_entry(config: dict, expected: str) -> None:
    assert architecture_for_hf(config, "config.json").name == expected


def test_unknown_hf_architecture_names_the_class(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}))
    with pytest.raises(ModelLoadError) as info:
        hf_model_config(tmp_path)
    message = str(info.value)
    assert "unsupported architecture 'Phi3ForCausalLM'" in message and all(s in message for s in SUPPORTED)


def test_hf_config_missing_key_is_reported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    with pytest.raises(ModelLoadError, match="missing key 'num_attention_heads'"):
        hf_model_config(tmp_path)


def test_weight_names_route_gguf_and_hf_names_to_kiln_parameters() -> None:
    names = get_architecture("llama", "x").weight_names
    assert names.hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert names.hf_name("output_norm.weight") == "model.norm.weight"
    assert names.hf_name("blk.3.attn_q_norm.weight") is None
    assert names.target("model.layers.3.self_attn.k_proj.bias") == ("layers.3.self_attn.qkv_proj", "bias", "k")
    assert names.target("model.layers.0.mlp.up_proj.weight") == ("layers.0.mlp.gate_up_proj", "weight", "up")
    assert names.target("lm_head.weight") == ("lm_head", "weight", None)
