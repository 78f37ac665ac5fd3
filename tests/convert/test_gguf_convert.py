"""`kiln convert --to gguf`: files that load back to exactly the gguf library's own quantize→dequantize
of the weights, whose tokenizer metadata matches llama.cpp's converter, and that llama.cpp runs like kiln."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

from kiln.convert.gguf_writer import convert_to_gguf, gguf_name, hf_tensors, is_output_head, storage_type
from kiln.entrypoints.cli_convert import main as convert_main
from kiln.eval.forward import window_logits
from kiln.layers.linear import Linear
from kiln.loader.model_loader import load_model
from kiln.loader.weights import load_named_weights
from kiln.models.llama import LlamaForCausalLM

from loader.tiny_model import build_tiny_models, one_torch_thread

TYPES = ["f16", "q8_0", "q4_0", "q4_1"]
TEXT = "the cat sat on the mat 12345, hello world<|im_end|>"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


@pytest.fixture(scope="module")
def qwen2_folder(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untied tiny Llama as a Qwen2 folder (NeoX RoPE, q/k/v biases)."""
    folder = tmp_path_factory.mktemp("qwen2")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny.hf["untied"] / f, folder / f)
    config = json.loads((tiny.hf["untied"] / "config.json").read_text())
    config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_bias=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(tiny.hf["untied"] / "model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    for name in [n for n in tensors if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]:
        tensors[name.replace(".weight", ".bias")] = torch.randn(tensors[name].shape[0], generator=gen) * 0.5
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def llama3_folder(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untied tiny Llama with Llama 3.1 RoPE scaling (changes its logits by ~10 on TEXT's positions)."""
    folder = tmp_path_factory.mktemp("llama3") / "m"
    shutil.copytree(tiny.hf["untied"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _stype(hf_name: str, t: torch.Tensor, qtype: str, tied: bool, pure: bool = False):
    return storage_type(tuple(t.shape), qtype, is_output_head(gguf_name(hf_name), tied), pure)


def _expected(t: torch.Tensor, ggml) -> torch.Tensor:
    """What a tensor stored as `ggml` must load back as: the gguf library's own quantize → dequantize."""
    a = t.numpy().astype(np.float32)
    if ggml == Q.F32:
        return t
    if ggml == Q.F16:
        return torch.from_numpy(a.astype(np.float16).astype(np.float32))
    return torch.from_numpy(np.asarray(dequantize(quantize(a, ggml), ggml), dtype=np.float32))


def _model_with(loaded, tensors: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    model = LlamaForCausalLM(loaded.config, torch.float32)
    load_named_weights(model, tensors.items(), "expected")
    return model.eval()


def _fields(path: Path, prefix: str) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}


SOURCES = [("gguf", "untied"), ("gguf", "tied"), ("hf", "untied"), ("hf", "tied")]


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("source", SOURCES, ids=lambda s: "-".join(s))
def test_converted_file_loads_back_to_the_quantized_tensors(tiny, tmp_path: Path, qtype: str, source) -> None:
    fmt, kind = source
    tied = kind == "tied"
    pure = qtype == "q4_0" and fmt == "hf"  # --pure: the output head in Q4_0 too
    src = (tiny.gguf if fmt == "gguf" else tiny.hf)[kind]
    loaded = load_model(src, dtype="float32", quantized_weights="dequantize")
    out = convert_to_gguf(loaded, tmp_path / "m.gguf", qtype, progress=False, pure=pure)
    reader = gguf.GGUFReader(out)
    stored = {t.name: t.tensor_type for t in reader.tensors}
    assert ("output.weight" in stored) == (not tied)
    original = hf_tensors(loaded.model)
    types = {name: _stype(name, t, qtype, tied, pure) for name, t in original.items()}
    for name in original:
        assert stored.pop(gguf_name(name)) == types[name], name
    assert not stored
    head = types["model.embed_tokens.weight" if tied else "lm_head.weight"]
    assert head == {"f16": Q.F16, "q8_0": Q.Q8_0}.get(qtype, Q.Q4_0 if pure else Q.Q8_0)
    assert reader.fields["general.architecture"].contents() == "llama"

    back = load_model(out, dtype="float32", quantized_weights="dequantize")
    expected = {name: _expected(t, types[name]) for name, t in original.items()}
    reloaded = hf_tensors(back.model)
    assert reloaded.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(reloaded[name], t), name  # exactly the gguf library's quantize → dequantize
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
                  "bos_token_id", "eos_token_ids"):
        assert getattr(back.config, field) == getattr(loaded.config, field), field
    assert back.config.rms_norm_eps == pytest.approx(loaded.config.rms_norm_eps, rel=1e-6)  # stored as float32
    ids = loaded.tokenizer.encode(TEXT)
    assert back.tokenizer.encode(TEXT) == ids
    torch.testing.assert_close(window_logits(back.model, ids), window_logits(_model_with(loaded, expected), ids),
                               rtol=0, atol=1e-4)


def test_storage_types() -> None:
    assert storage_type((64,), "q4_0") == Q.F32
    assert storage_type((100, 48), "q8_0") == Q.F16  # rows not a whole number of 32-blocks
    assert storage_type((100, 64), "q4_1") == Q.Q4_1
    assert storage_type((100, 64), "q4_1", output_head=True) == Q.Q8_0
    assert storage_type((100, 64), "q4_1", output_head=True, pure=True) == Q.Q4_1
    assert storage_type((100, 48), "q4_0", output_head=True) == Q.F16
    assert storage_type((100, 64), "f16", output_head=True) == Q.F16
    assert is_output_head("token_embd.weight", tied=True) and not is_output_head("token_embd.weight", tied=False)
    assert is_output_head("output.weight", tied=False)


def test_llama3_rope_scaling_travels_as_rope_freqs(llama3_folder: Path, tmp_path: Path) -> None:
    loaded = load_model(llama3_folder, dtype="float32")
    assert loaded.config.rope_scaling.rope_type == "llama3"
    out = convert_to_gguf(loaded, tmp_path / "m.gguf", "q8_0", progress=False)
    freqs = {t.name: t for t in gguf.GGUFReader(out).tensors}["rope_freqs.weight"]
    assert freqs.tensor_type == Q.F32 and freqs.data.shape == (loaded.config.head_dim // 2,)
    back = load_model(out, dtype="float32", quantized_weights="dequantize")
    expected = {name: _expected(t, _stype(name, t, "q8_0", tied=False)) for name, t in hf_tensors(loaded.model).items()}
    ids = loaded.tokenizer.encode(TEXT + " " + TEXT)
    torch.testing.assert_close(window_logits(back.model, ids), window_logits(_model_with(loaded, expected), ids),
                               rtol=0, atol=1e-4)


def test_hf_tokenizer_metadata_matches_llama_cpp_layout(tiny, tmp_path: Path) -> None:
    """From tokenizer.json: the same tokenizer.ggml.* keys the llama.cpp-style tiny GGUF holds."""
    loaded = load_model(tiny.hf["tied"], dtype="float32", quantized_weights="dequantize")
    out = convert_to_gguf(loaded, tmp_path / "m.gguf", "q8_0", progress=False)
    ours, theirs = _fields(out, "tokenizer."), _fields(tiny.gguf["tied"], "tokenizer.")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours[key] == theirs[key], key
    assert ours["tokenizer.ggml.padding_token_id"] == 2 and ours["tokenizer.ggml.add_eos_token"] is False


def test_gguf_source_metadata_is_copied(tiny, tmp_path: Path) -> None:
    out = convert_to_gguf(load_model(tiny.gguf["untied"], dtype="float32", quantized_weights="dequantize"),
                          tmp_path / "m.gguf", "f16", progress=False)
    assert _fields(out, "tokenizer.") == _fields(tiny.gguf["untied"], "tokenizer.")


def test_qwen2_keeps_hf_row_order_and_f32_biases(qwen2_folder: Path, tmp_path: Path) -> None:
    loaded = load_model(qwen2_folder, dtype="float32", quantized_weights="dequantize")
    assert loaded.config.architecture == "qwen2" and loaded.config.attention_bias
    out = convert_to_gguf(loaded, tmp_path / "m.gguf", "q4_1", progress=False)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "qwen2"
    raw = {t.name: t for t in reader.tensors}
    src = hf_tensors(loaded.model)
    q = raw["blk.0.attn_q.weight"]  # no llama.cpp permutation for NeoX RoPE: HF rows as they are
    hf_q = src["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(dequantize(q.data, q.tensor_type), _expected(hf_q, Q.Q4_1).numpy())
    for p in ("q", "k", "v"):
        b = raw[f"blk.1.attn_{p}.bias"]
        assert b.tensor_type == Q.F32 and np.array_equal(b.data, src[f"model.layers.1.self_attn.{p}_proj.bias"].numpy())
    back = load_model(out, dtype="float32", quantized_weights="dequantize")
    reloaded = hf_tensors(back.model)
    for name, t in src.items():
        assert torch.equal(reloaded[name], _expected(t, _stype(name, t, "q4_1", tied=False))), name


def test_kiln_quantized_folder_converts_its_effective_weights(tiny, tmp_path: Path) -> None:
    """An INT4 folder (one layer AWQ-smoothed) is written as the weights kiln computes with."""
    from kiln.quantization.checkpoint import save_quantized
    from kiln.quantization.quantize import QuantizeOptions, install, quantization_config, quantize_layer

    loaded = load_model(tiny.hf["untied"], dtype="float32", quantized_weights="dequantize")
    opts = QuantizeOptions(method="rtn", bits=4, group_size=32, progress=False)
    linears = {n: m for n, m in loaded.model.named_modules() if n.startswith("layers.") and isinstance(m, Linear)}
    layers = {}
    for i, (name, m) in enumerate(linears.items()):
        w = m.weight.data.float()
        if i == 0:
            smooth = torch.linspace(0.5, 2.0, w.shape[1])
            lq = quantize_layer(w * smooth, None, opts, 4)
            lq.entry["smooth"], lq.tensors["smooth"] = True, smooth
        else:
            lq = quantize_layer(w, None, opts, 4)
        layers[name] = lq
    install(loaded.model, layers)
    sizes = {n: m.input_size * sum(m.output_sizes) for n, m in linears.items()}
    folder = save_quantized(tmp_path / "int4", loaded.model, loaded.config, loaded.tokenizer,
                            quantization_config(opts, layers, sizes, 0.0))
    quantized = load_model(folder, dtype="float32", quantized_weights="dequantize")
    out = convert_to_gguf(quantized, tmp_path / "m.gguf", "f16", progress=False)
    back = hf_tensors(load_model(out, dtype="float32", quantized_weights="dequantize").model)
    unpacked = {fused_shard: leaf for leaf, fused_shard in LlamaForCausalLM.packed_modules.items()}
    for name, lq in layers.items():
        parent, _, leaf = name.rpartition(".")
        w = lq.effective_weight()
        for shard in linears[name].shard_names:
            hf = f"model.{parent}.{leaf if shard is None else unpacked[(leaf, shard)]}.weight"
            shard_w = w[linears[name].shard_slice(shard)]
            torch.testing.assert_close(back[hf], _expected(shard_w, Q.F16), rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_models_keeping_gguf_blocks_convert_the_same(tiny, tmp_path: Path, kind: str) -> None:
    """A model loaded with its Q4/Q8 blocks kept for the native kernels gives the same tensors."""
    native = load_model(tiny.gguf[kind], dtype="float32", quantized_weights="native")
    dense = load_model(tiny.gguf[kind], dtype="float32", quantized_weights="dequantize")
    a, b = hf_tensors(native.model), hf_tensors(dense.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_and_errors(tiny, tmp_path: Path, capsys) -> None:
    loaded = load_model(tiny.gguf["tied"], dtype="float32", quantized_weights="dequantize")
    with pytest.raises(ValueError, match="q5_k"):
        convert_to_gguf(loaded, tmp_path / "a.gguf", "q5_k")
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="--force"):
        convert_to_gguf(loaded, out, "q8_0")
    assert convert_main(["convert", str(tiny.gguf["tied"]), "--to", "gguf", "--type", "q8_0", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert convert_main(["convert", str(tiny.gguf["tied"]), "--type", "q4_0", "-o", str(out), "--force"]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    assert {t.name: t.tensor_type for t in reader.tensors}["token_embd.weight"] == Q.Q8_0  # the tied output head
    assert convert_main(["convert", str(tiny.gguf["tied"]), "--type", "q4_0", "-o", str(out), "--force", "--pure"]) == 0
    assert {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}["token_embd.weight"] == Q.Q4_0
    with pytest.raises(SystemExit):
        convert_main(["convert", str(tiny.gguf["tied"]), "--type", "q3_k", "-o", str(tmp_path / "b.gguf")])
    missing = tmp_path / "missing.gguf"
    assert convert_main(["convert", str(missing), "--type", "f16", "-o", str(tmp_path / "c.gguf")]) == 2

    # A pre-tokenizer llama.cpp has no name for is refused, and no partial file is left behind.
    folder = tmp_path / "odd"
    shutil.copytree(tiny.hf["tied"], folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0] = {"type": "Digits", "individual_digits": False}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    before = set(tmp_path.iterdir())
    with pytest.raises(ValueError, match="pre-tokenizer"):
        convert_to_gguf(load_model(folder, dtype="float32"), tmp_path / "odd.gguf", "f16", progress=False)
    assert set(tmp_path.iterdir()) == before


def _llama_cpp(llama_cpp, path: Path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False)


def _llama_cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float32)


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    p, q = torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1)
    return (p.exp() * (p - q)).sum(-1)


@pytest.mark.parametrize("model", ["hf-untied", "gguf-tied", "qwen2", "llama3-rope"])
def test_llama_cpp_runs_tiny_conversions_like_kiln(tiny, qwen2_folder: Path, llama3_folder: Path, tmp_path: Path,
                                                   model: str) -> None:
    """f16: llama.cpp's logits equal kiln's to fp16 rounding (a wrong Q/K order is off by ~10);
    q4_0: llama.cpp reads the blocks as kiln does (its int8 activations aside)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    src = {"hf-untied": tiny.hf["untied"], "gguf-tied": tiny.gguf["tied"], "qwen2": qwen2_folder,
           "llama3-rope": llama3_folder}[model]
    loaded = load_model(src, dtype="float32", quantized_weights="dequantize")
    text = TEXT + " " + TEXT  # 40+ positions: enough for RoPE scaling to matter
    ids = loaded.tokenizer.encode(text)
    original = window_logits(loaded.model, ids)
    for qtype in ("f16", "q4_0"):
        out = convert_to_gguf(loaded, tmp_path / f"{qtype}.gguf", qtype, progress=False)
        llm = _llama_cpp(llama_cpp, out)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        theirs = _llama_cpp_logits(llm, ids)
        ours = window_logits(load_model(out, dtype="float32", quantized_weights="dequantize").model, ids)
        if qtype == "f16":  # a wrong Q/K row order, RoPE or norm is off by ~10 here
            torch.testing.assert_close(theirs, ours, rtol=0, atol=0.1)
            torch.testing.assert_close(theirs, original, rtol=0, atol=0.1)  # fp16 weights vs kiln's fp32 original
        else:
            assert _kl(ours, theirs).max().item() < 0.05
            assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.8


@pytest.fixture(scope="module")
def default_model():
    """The default model (kiln.hub.pull('smollm2-135m'), Q4_1) in fp32, loaded once for this module."""
    from kiln.hub import pull

    return load_model(pull("smollm2-135m"), dtype="float32", quantized_weights="dequantize")


TOKENIZER_TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Héllo wörld — 12345 + 6.78e-9 = ?  日本語のテキスト 🚀\t\ttabs   spaces\n\n",
    "<|im_start|>user\nWhat's the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]


def _assert_tokenizes_like(llm, tok) -> None:
    for text in TOKENIZER_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, add_special_tokens=False)
    assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id


@pytest.mark.real_model
def test_llama_cpp_runs_converted_default_model_like_kiln(default_model, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    loaded = default_model
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +"
    ids = loaded.tokenizer.encode(prompt)

    # q8_0: llama.cpp and kiln run the same converted file.
    q8 = convert_to_gguf(loaded, tmp_path / "q8_0.gguf", "q8_0", progress=False)
    llm = _llama_cpp(llama_cpp, q8)
    _assert_tokenizes_like(llm, loaded.tokenizer)
    theirs = _llama_cpp_logits(llm, ids)
    ours = window_logits(load_model(q8, dtype="float32", quantized_weights="dequantize").model, ids)
    # llama.cpp multiplies Q8_0 weights by int8-quantized activations; kiln's reference path keeps them fp32.
    kl = _kl(ours, theirs)
    assert kl.mean().item() < 0.01 and kl.max().item() < 0.05, kl
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9

    # f16: llama.cpp on the converted file vs kiln fp32 on the original (weights rounded to fp16: ~1e-3 relative).
    f16 = convert_to_gguf(loaded, tmp_path / "f16.gguf", "f16", progress=False)
    ours = window_logits(loaded.model, ids)
    theirs = _llama_cpp_logits(_llama_cpp(llama_cpp, f16), ids)
    kl = _kl(ours, theirs)
    assert kl.mean().item() < 1e-3 and kl.max().item() < 5e-3, kl
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.95
    assert (theirs - ours).abs().max().item() < 0.25


@pytest.mark.real_model
def test_llama_cpp_tokenizes_like_kiln_from_tokenizer_json(default_model, tmp_path: Path) -> None:
    """The default model's tokenizer saved as a tokenizer.json folder (as `kiln quantize` writes it) and
    rebuilt as GGUF metadata tokenizes like kiln in llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = default_model.tokenizer
    folder = tmp_path / "hf"
    folder.mkdir()
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.backend.id_to_token(tok.pad_token_id),
        "add_bos_token": tok.add_bos_token, "add_eos_token": False, "chat_template": tok.chat_template}))
    vocab, d = tok.vocab_size, 64  # a one-layer random model around the real vocabulary
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
        "intermediate_size": d, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "tie_word_embeddings": True}))
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    for name, shape in (("input_layernorm", (d,)), ("post_attention_layernorm", (d,)),
                        ("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d // 2, d)),
                        ("self_attn.v_proj", (d // 2, d)), ("self_attn.o_proj", (d, d)),
                        ("mlp.gate_proj", (d, d)), ("mlp.up_proj", (d, d)), ("mlp.down_proj", (d, d))):
        shapes[f"model.layers.0.{name}.weight"] = shape
    save_file({k: torch.randn(s, generator=gen) for k, s in shapes.items()}, str(folder / "model.safetensors"))
    out = convert_to_gguf(load_model(folder, dtype="float32"), tmp_path / "from-json.gguf", "f16", progress=False)
    _assert_tokenizes_like(_llama_cpp(llama_cpp, out), tok)
