"""Quantize a tiny model end to end: save, load back through LLM's loader, the quality gate, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from dataclasses import replace

import pytest
import torch

from kiln.entrypoints.cli import main as kiln_main
from kiln.errors import ModelLoadError
from kiln.kernels import switches
from kiln.eval.forward import window_logits
from kiln.loader.model_loader import load_model
from kiln.quantization.checkpoint import save_quantized
from kiln.quantization.quantize import QualityGateError, QuantizeOptions, quantize_model

from loader.tiny_model import TinyModels



def _opts(calib_file: Path, **kw) -> QuantizeOptions:
    base = dict(calib_file=calib_file, calib_samples=2, calib_seqlen=64, progress=False)
    base.update(kw)
    return QuantizeOptions(**base)


SPECS = [
    dict(method="rtn", bits=8),
    dict(method="rtn", bits=4, group_size=32),
    dict(method="gptq", bits=4, group_size=32),
    dict(method="awq", bits=4, group_size=32),
    dict(method="smoothquant", bits=8),
    dict(method="fp8", bits=8),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s['method']}{s['bits']}")
def test_save_load_round_trip(tiny: TinyModels, calib_file: Path, tmp_path: Path, spec: dict, monkeypatch) -> None:
    monkeypatch.setattr(switches, "_active", replace(switches.active(), quant_kernels=False))  # the reference path, exact; the native one is tested below
    src = tiny.hf["untied"]  # has an untied lm_head (kept dense) and every fused layer
    loaded = load_model(src, dtype="float32")
    ids = list(range(3, 40))
    before = window_logits(loaded.model, ids)
    report = quantize_model(loaded.model, loaded.tokenizer, _opts(calib_file, **spec))
    quantized = window_logits(loaded.model, ids)
    assert not torch.equal(before, quantized)  # the layers really changed
    assert report.kl_mean < (0.05 if spec["bits"] == 8 else 0.5)
    out = save_quantized(tmp_path / "q", loaded.model, loaded.config, loaded.tokenizer, report.quantization_config)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["method"] == spec["method"]
    assert len(config["quantization_config"]["layers"]) == 2 * 4  # 2 layers x (qkv, o, gate_up, down)
    back = load_model(out, dtype="float32")
    for p in loaded.model.parameters():  # the folder keeps unquantized tensors in fp16
        p.data = p.data.half().float()
    torch.testing.assert_close(window_logits(back.model, ids), window_logits(loaded.model, ids), rtol=1e-5, atol=1e-5)
    for name, buf in loaded.model.named_buffers():  # quantized tensors come back bit for bit
        if "layers." in name:
            assert torch.equal(dict(back.model.named_buffers())[name].view(torch.uint8), buf.view(torch.uint8)), name
    assert back.tokenizer.encode("the of and") == loaded.tokenizer.encode("the of and")


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, -1)])
def test_native_block_kernel_serves_kiln_int_layouts(tiny: TinyModels, calib_file: Path, tmp_path: Path,
                                                     bits: int, group: int, monkeypatch) -> None:
    from kiln.kernels.native import load_native

    if not load_native():
        pytest.fail("native kernels did not build; kiln's CPU path needs them")
    loaded = load_model(tiny.hf["untied"], dtype="float32")
    report = quantize_model(loaded.model, loaded.tokenizer, _opts(calib_file, method="rtn", bits=bits, group_size=group))
    out = save_quantized(tmp_path / "q", loaded.model, loaded.config, loaded.tokenizer, report.quantization_config)
    native = load_model(out, dtype="float32")
    layer = native.model.layers[0].mlp.down_proj
    assert "native block kernel" in layer.method.name
    monkeypatch.setattr(switches, "_active", replace(switches.active(), quant_kernels=False))
    reference = load_model(out, dtype="float32")
    assert "reference path" in reference.model.layers[0].mlp.down_proj.method.name
    ids = list(range(3, 40))
    for rows in (ids[:1], ids):  # one decode row (block kernel) and a prefill (dequantize + GEMM)
        a = torch.log_softmax(window_logits(native.model, rows), -1)
        b = torch.log_softmax(window_logits(reference.model, rows), -1)
        kl = (b.exp() * (b - a)).sum(-1)
        # INT8: exact weights, int16 activations. INT4: plus the zero offset -scale*zero rounded to fp16.
        assert kl.max().item() < (1e-6 if bits == 8 else 1e-4)


def test_max_kl_refuses_and_names_layers(tiny: TinyModels, calib_file: Path) -> None:
    loaded = load_model(tiny.hf["tied"], dtype="float32")
    with pytest.raises(QualityGateError, match=r"layers\.\d+\.(self_attn|mlp)\.\w+ \(") as info:
        quantize_model(loaded.model, loaded.tokenizer, _opts(calib_file, method="rtn", bits=4, group_size=128, max_kl=1e-7))
    assert "Nothing was saved" in str(info.value)


def test_cli_max_kl_writes_nothing(tiny: TinyModels, calib_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "refused"
    code = kiln_main(["quantize", str(tiny.hf["tied"]), "--method", "rtn", "--bits", "4", "--group-size", "32",
                      "--calib-file", str(calib_file), "--calib-samples", "2", "--calib-seqlen", "64",
                      "--max-kl", "1e-7", "-o", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-kl" in err
    assert not out.exists()


def test_cli_bad_arguments_are_one_line(tiny: TinyModels, tmp_path: Path, capsys) -> None:
    code = kiln_main(["quantize", str(tiny.hf["tied"]), "--method", "fp8", "--bits", "4", "-o", str(tmp_path / "x")])
    assert code == 2 and "8-bit method" in capsys.readouterr().err
    code = kiln_main(["quantize", str(tiny.hf["tied"]), "--method", "rtn", "--calib-file", str(tmp_path / "none.txt"),
                      "-o", str(tmp_path / "y")])
    assert code == 2 and "calibration file" in capsys.readouterr().err


def test_target_bits_promotes_the_most_sensitive_layers(tiny: TinyModels, calib_file: Path) -> None:
    loaded = load_model(tiny.hf["tied"], dtype="float32")
    report = quantize_model(loaded.model, loaded.tokenizer,
                            _opts(calib_file, method="rtn", bits=4, group_size=32, target_bits=6.0))
    qc = report.quantization_config
    bits = {name: entry["bits"] for name, entry in qc["layers"].items()}
    assert 8 in bits.values() and 4 in bits.values()
    assert 4.0 < qc["mean_bits"] <= 6.0
    worst = report.sensitivity[0][0]
    assert bits[f"model.{worst}"] == 8  # any one layer of the tiny model fits in the 2-bit headroom
    assert report.sensitivity == sorted(report.sensitivity, key=lambda t: -t[1])


def test_unknown_quantization_config_is_refused(tiny: TinyModels, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "foreign"
    shutil.copytree(tiny.hf["tied"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="quant_method .bitsandbytes. is not supported"):
        load_model(folder)


@pytest.mark.real_model
def test_default_model_int8_stays_close(default_gguf_path: Path) -> None:
    loaded = load_model(default_gguf_path, dtype="float32", quantized_weights="dequantize")
    report = quantize_model(loaded.model, loaded.tokenizer, QuantizeOptions(method="rtn", bits=8, calib_samples=2,
                                                                            progress=False))
    assert report.kl_mean < 0.05 and report.top1_agreement > 0.85
