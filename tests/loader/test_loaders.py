"""GGUF and safetensors loaders on a tiny random Llama: identical weights in, identical logits out,
and both agree with transformers (which also checks the GGUF Q/K un-permutation end to end)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kiln.kernels.attention_metadata import build_attention_metadata
from kiln.loader.model_loader import LoadedModel, load_model

from .tiny_model import (
    SPECIAL_TOKENS,
    TinyCheckpoint,
    TinyModels,
    TinySpec,
    build_tiny_models,
    one_torch_thread,
    write_gguf,
    write_hf_folder,
)

# Lengths 1 (the decode kernel), 16 (one full block), 37 (three blocks), plus special tokens.
SEQUENCES = [
    [5],
    [1, 40, 77, 12, 200, 3, 99, 150, 260, 270, 45, 46, 47, 2, 8, 9],
    [(i * 37 + 11) % TinySpec().vocab for i in range(37)],
]
CONFIG_FIELDS = [
    "architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
    "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_ids",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


@pytest.fixture(scope="module")
def loaded(tiny: TinyModels):
    cache: dict[tuple[str, str], LoadedModel] = {}

    def get(fmt: str, key: str) -> LoadedModel:
        if (fmt, key) not in cache:
            path = tiny.gguf[key] if fmt == "gguf" else tiny.hf[key]
            cache[fmt, key] = load_model(path, dtype="float32", device="cpu", quantized_weights="dequantize")
        return cache[fmt, key]

    return get


@pytest.fixture(scope="module")
def hf_reference(tiny: TinyModels):
    transformers = pytest.importorskip("transformers")
    cache = {}

    def get(key: str):
        if key not in cache:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny.hf[key]), dtype=torch.float32)
            cache[key] = model.eval()
        return cache[key]

    return get


def prefill_logits(loaded: LoadedModel, token_ids: list[int]) -> torch.Tensor:
    """All-position logits of one prefill forward through kiln's paged attention."""
    model, cfg, block_size = loaded.model, loaded.config, 16
    n_blocks = (len(token_ids) + block_size - 1) // block_size
    caches = [
        (torch.zeros(n_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim),
         torch.zeros(n_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim))
        for _ in range(cfg.num_hidden_layers)
    ]
    meta = build_attention_metadata([len(token_ids)], [len(token_ids)], [list(range(n_blocks))], block_size)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(token_ids), torch.arange(len(token_ids)), meta, caches))


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


# ----------------------------------------------------------------------------- same weights, same logits

@pytest.mark.parametrize("gguf_key, hf_key", [("tied", "tied"), ("tied", "tied_sharded"), ("untied", "untied")])
def test_gguf_and_safetensors_give_identical_parameters_and_logits(loaded, gguf_key: str, hf_key: str) -> None:
    a, b = loaded("gguf", gguf_key), loaded("safetensors", hf_key)
    assert (a.file_format, b.file_format) == ("gguf", "safetensors")
    params_a, params_b = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), f"{name} differs between the GGUF and safetensors loads"
    for ids in SEQUENCES:
        la, lb = prefill_logits(a, ids), prefill_logits(b, ids)
        assert la.shape == (len(ids), TinySpec().vocab)
        assert (la - lb).abs().max().item() < 1e-5


def test_sharded_folder_equals_single_file(loaded) -> None:
    single, sharded = loaded("safetensors", "tied"), loaded("safetensors", "tied_sharded")
    for (name, p), (_, q) in zip(single.model.named_parameters(), sharded.model.named_parameters()):
        assert torch.equal(p, q), name


def test_parameters_are_the_checkpoint_values(tiny: TinyModels, loaded) -> None:
    """Fused q/k/v and gate/up hold each shard at its rows; every parameter is written (no torch.empty left)."""
    model = loaded("gguf", "untied").model
    hf = tiny.untied.hf
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    q, k, v = hf["model.layers.1.self_attn.q_proj.weight"], hf["model.layers.1.self_attn.k_proj.weight"], \
        hf["model.layers.1.self_attn.v_proj.weight"]
    assert torch.equal(attn.qkv_proj.weight, torch.cat([q, k, v]))
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([hf["model.layers.1.mlp.gate_proj.weight"],
                                                           hf["model.layers.1.mlp.up_proj.weight"]]))
    assert torch.equal(model.lm_head.weight, hf["lm_head.weight"])
    assert torch.equal(model.norm.weight, hf["model.norm.weight"])


def test_tied_and_untied_lm_head(tiny: TinyModels, loaded) -> None:
    for fmt in ("gguf", "safetensors"):
        tied, untied = loaded(fmt, "tied"), loaded(fmt, "untied")
        assert tied.config.tie_word_embeddings and tied.model.lm_head is None
        assert not untied.config.tie_word_embeddings and untied.model.lm_head is not None
        # The untied head is the checkpoint's own `output`/`lm_head`, not the embedding.
        hidden = torch.randn(3, TinySpec().hidden, generator=torch.Generator().manual_seed(0))
        expected = hidden @ tiny.untied.hf["lm_head.weight"].T
        assert torch.allclose(untied.model.compute_logits(hidden), expected, atol=1e-5)
        expected = hidden @ tiny.tied.hf["model.embed_tokens.weight"].T
        assert torch.allclose(tied.model.compute_logits(hidden), expected, atol=1e-5)


def test_tensor_types_reported(loaded) -> None:
    assert loaded("gguf", "tied").tensor_types == {"Q8_0": 7, "F16": 8, "F32": 5}
    assert loaded("gguf", "untied").tensor_types == {"F16": 1, "Q4_0": 4, "Q4_1": 4, "Q8_0": 4, "Q5_1": 2,
                                                     "BF16": 1, "F32": 5}
    assert loaded("safetensors", "tied_sharded").tensor_types == {"F32": 20}


# ----------------------------------------------------------------------------- against transformers

@pytest.mark.parametrize("key", ["tied", "untied"])
def test_logits_match_transformers(loaded, hf_reference, key: str) -> None:
    ref_model = hf_reference(key)
    assert ref_model.config.tie_word_embeddings == (key == "tied")
    for ids in SEQUENCES:
        ref = hf_logits(ref_model, ids)
        assert ref.abs().max().item() > 1.0  # not a degenerate model
        for fmt in ("safetensors", "gguf"):
            ours = prefill_logits(loaded(fmt, key), ids)
            assert (ours - ref).abs().max().item() < 1e-4, f"{fmt} {key} len {len(ids)}"


def test_unpermuted_qk_gguf_is_detected(tiny: TinyModels, hf_reference) -> None:
    """Sensitivity check: a GGUF whose Q/K rows are *not* in llama.cpp's order gives clearly different logits,
    so the match above really tests the un-permutation."""
    bad = load_model(tiny.gguf["tied_unpermuted"], dtype="float32", quantized_weights="dequantize")
    ids = SEQUENCES[2]
    assert (prefill_logits(bad, ids) - hf_logits(hf_reference("tied"), ids)).abs().max().item() > 1e-2


def test_wrong_rope_theta_is_detected(tiny: TinyModels, hf_reference, tmp_path: Path) -> None:
    """Sensitivity check: the same weights with kiln's default theta (10000) in the metadata give clearly
    different logits, so the transformers match also checks that rope.freq_base / rope_theta are read."""
    ckpt = TinyCheckpoint(dataclasses.replace(tiny.tied.spec, rope_theta=10000.0), tiny.tied.gguf_raw, tiny.tied.hf)
    other = load_model(write_gguf(ckpt, tmp_path / "theta-10000.gguf"), dtype="float32", quantized_weights="dequantize")
    assert other.config.rope_theta == 10000.0
    ids = SEQUENCES[2]
    assert (prefill_logits(other, ids) - hf_logits(hf_reference("tied"), ids)).abs().max().item() > 1e-2


# ----------------------------------------------------------------------------- config and tokenizer

@pytest.mark.parametrize("key", ["tied", "untied"])
def test_gguf_config_equals_config_json(loaded, key: str) -> None:
    from_gguf, from_json = loaded("gguf", key).config, loaded("safetensors", key).config
    spec = TinySpec(tied=key == "tied")
    for name in CONFIG_FIELDS:
        a, b = getattr(from_gguf, name), getattr(from_json, name)
        if name == "rms_norm_eps":  # GGUF stores float32
            assert a == pytest.approx(b, rel=1e-6)
        else:
            assert a == b, f"{name}: GGUF {a!r} != config.json {b!r}"
    expected = dict(architecture="llama", vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn,
                    num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                    head_dim=spec.head_dim, rope_theta=spec.rope_theta, max_position_embeddings=spec.context,
                    tie_word_embeddings=spec.tied, bos_token_id=1, eos_token_ids=(2,))
    assert {k: getattr(from_json, k) for k in expected} == expected
    assert from_json.rms_norm_eps == spec.eps


def test_tokenizers_agree(loaded) -> None:
    a, b = loaded("gguf", "tied").tokenizer, loaded("safetensors", "tied").tokenizer
    for text in ["the cat sat on the mat", "hello world 2024!", "<|im_start|>user\nhi<|im_end|>", "ünïcödé 😀"]:
        assert a.encode(text) == b.encode(text), text
        assert a.decode(a.encode(text), skip_special_tokens=False) == text
    assert a.encode(" the cat") == [a.token_to_id("Ġthe"), a.token_to_id("Ġcat")]
    assert (a.bos_token_id, a.eos_token_id) == (b.bos_token_id, b.eos_token_id) == (1, 2)
    assert a.eos_token == b.eos_token == SPECIAL_TOKENS[2]
    messages = [{"role": "user", "content": "hi"}]
    assert a.apply_chat_template(messages) == b.apply_chat_template(messages)


def test_config_json_written_by_transformers_5(tiny: TinyModels, tmp_path: Path) -> None:
    """transformers >= 5 writes RoPE settings as `rope_parameters: {rope_theta, rope_type}`, with no
    top-level `rope_theta`. kiln must read it, or it silently runs such folders with theta 10000."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny.tied.config_json()
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type",
                                                                                    "rope_scaling", "torch_dtype")})
    hf_cfg.architectures = ["LlamaForCausalLM"]
    folder = write_hf_folder(tiny.tied, tmp_path / "hf-v5-config", config=hf_cfg.to_diff_dict())
    written = json.loads((folder / "config.json").read_text())
    if "rope_theta" in written:
        pytest.skip("this transformers version writes a top-level rope_theta")
    assert written["rope_parameters"]["rope_theta"] == TinySpec().rope_theta
    cfg = load_model(folder, dtype="float32").config
    assert cfg.rope_theta == TinySpec().rope_theta, (
        f"kiln bug: config.json's rope_parameters.rope_theta ({TinySpec().rope_theta}) ignored, "
        f"kiln used rope_theta={cfg.rope_theta} (kiln/loader/safetensors_loader.py hf_model_config)"
    )
