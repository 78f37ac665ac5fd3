"""`kiln convert --to gguf`: files that load back to the same tensors, and that llama.cpp runs alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.convert.gguf_writer import convert_to_gguf, hf_tensors
from kiln.entrypoints.cli import main as kiln_main
from kiln.eval.forward import window_logits
from kiln.loader.model_loader import load_model

from loader.tiny_model import build_tiny_models, one_torch_thread


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


def _expected(t: torch.Tensor, qtype: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    a = t.numpy().astype(np.float32)
    if qtype == "f16":
        return torch.from_numpy(a.astype(np.float16).astype(np.float32))
    q = GGMLQuantizationType[qtype.upper()]
    return torch.from_numpy(np.asarray(dequantize(quantize(a, q), q), dtype=np.float32))


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_converted_file_loads_back_to_the_quantized_tensors(tiny, tmp_path: Path, qtype: str, source: str) -> None:
    src = tiny.gguf["untied"] if source == "gguf" else tiny.hf["untied"]
    loaded = load_model(src, dtype="float32", quantized_weights="dequantize")
    out = convert_to_gguf(loaded, tmp_path / "m.gguf", qtype)
    back = load_model(out, dtype="float32", quantized_weights="dequantize")
    original, reloaded = hf_tensors(loaded.model), hf_tensors(back.model)
    assert original.keys() == reloaded.keys()
    for name, t in original.items():
        expected = t if t.ndim == 1 else _expected(t, qtype)  # 1-D tensors stay F32
        torch.testing.assert_close(reloaded[name], expected, rtol=0, atol=1e-6, msg=name)
    assert back.tokenizer.encode("hello world") == loaded.tokenizer.encode("hello world")
    assert back.config.num_key_value_heads == loaded.config.num_key_value_heads


def test_existing_output_needs_force(tiny, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    code = kiln_main(["convert", str(tiny.gguf["tied"]), "--type", "q8_0", "-o", str(out)])
    assert code == 2 and "--force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert kiln_main(["convert", str(tiny.gguf["tied"]), "--type", "q8_0", "-o", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.real_model
def test_llama_cpp_runs_converted_files_like_kiln(default_gguf_path: Path, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    loaded = load_model(default_gguf_path, dtype="float32", quantized_weights="dequantize")
    ids = loaded.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return", add_special_tokens=True)
    for qtype, reference_model in (("f16", loaded.model), ("q8_0", None)):
        out = convert_to_gguf(loaded, tmp_path / f"{qtype}.gguf", qtype)
        if reference_model is None:
            reference_model = load_model(out, dtype="float32", quantized_weights="dequantize").model
        ours = torch.log_softmax(window_logits(reference_model, ids), -1)
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
        llm.eval(ids)
        theirs = torch.log_softmax(torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float32), -1)
        kl = (ours.exp() * (ours - theirs)).sum(-1)
        # llama.cpp multiplies Q8_0 weights with int8-quantized activations; kiln's reference here
        # uses fp32 activations, so Q8_0 differs by that rounding (f16: by fp16 accumulation only).
        assert kl.mean().item() < 0.01 and kl.max().item() < 0.05, (qtype, kl)
        assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() > 0.9
