"""compressed-tensors folders across tools: made by the `compressed-tensors` library and loaded by kiln,
and written by `kiln quantize --format compressed-tensors` and loaded by transformers.

The references are the other tools' own computations, not kiln's:
- a folder the library made is compared with the library's fake-quantized model (the same quantized
  weights run by transformers' own Llama, before the library packs them);
- a folder kiln wrote is loaded by transformers (which decompresses it through `compressed-tensors`)
  and compared with kiln running its own folder of the same weights.

The plain-torch path (dequantized weights, fp32 matmuls) must agree to float rounding; the native
kernels (int16 activations, fp16 scales) within a small KL.

Asymmetric (zero-point) folders: transformers 5.24 with compressed-tensors 0.20 cannot read them back
(it allocates unpacked zero points, the library writes them packed along the rows, and loading fails
on the size mismatch), so kiln's asymmetric output is checked by compressed-tensors' own decompressor.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers  # the test extra has it, and compressed-tensors

from kiln.eval.forward import window_logits
from kiln.kernels import switches
from kiln.loader.model_loader import load_model

from loader.tiny_model import TinyModels


IDS = list(range(3, 40))


def _kl_max(ref: torch.Tensor, other: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref.float(), -1), torch.log_softmax(other.float(), -1)
    return (p.exp() * (p - q)).sum(-1).max().item()


def _hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


def _library_folder(src: Path, out: Path, bits: int, group: int | None, sym: bool) -> torch.Tensor:
    """Quantize `src` with compressed-tensors (min-max scales per group or channel), save it packed, and
    return the library's fake-quantized logits on IDS: the reference for whoever loads the folder."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if group else "channel",
                            group_size=group)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"], quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.data
            g = w.reshape(w.shape[0], -1, group) if group else w.reshape(w.shape[0], 1, -1)
            scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), module.quantization_scheme.weights)
            # kiln's INT layout keeps fp16 scales; the library keeps the model's dtype (fp32 here, bf16 for
            # a real checkpoint, which fp16 holds exactly). fp16-exact scales make the comparison exact.
            scale = scale.half().float()
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
            if not sym:
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape)
                                                    .to(module.weight_zero_point.dtype))
    reference = _hf_logits(model)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).exists() and not (out / name).exists():
            (out / name).write_bytes((src / name).read_bytes())
    return reference


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 32, False), (8, None, True)],
                         ids=["w4a16-g32-sym", "w4a16-g32-asym", "w8a16-channel-sym"])
def test_folder_made_by_compressed_tensors_loads_in_kiln(tiny: TinyModels, tmp_path: Path, monkeypatch,
                                                          bits: int, group: int | None, sym: bool) -> None:
    folder = tmp_path / "ct"
    reference = _library_folder(tiny.hf["untied"], folder, bits, group, sym)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    native = load_model(folder, dtype="float32")
    assert any(n.endswith("qweight") for n, _ in native.model.named_buffers()), "not kept in kiln's INT layout"
    assert _kl_max(reference, window_logits(native.model, IDS)) < 1e-4
    monkeypatch.setattr(switches, "_active", replace(switches.active(), quant_kernels=False))
    plain = window_logits(load_model(folder, dtype="float32").model, IDS)
    torch.testing.assert_close(plain, reference, rtol=1e-4, atol=1e-4)


def _kiln_export(tiny: TinyModels, calib_file: Path, out: Path, sym: bool) -> Path:
    from kiln.entrypoints.cli import main as kiln_main

    args = ["quantize", str(tiny.hf["untied"]), "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--sym" if sym else "--no-sym", "--calib-file", str(calib_file), "--calib-samples", "2",
            "--calib-seqlen", "64"]
    assert kiln_main([*args, "-o", str(out / "kiln")]) == 0
    assert kiln_main([*args, "--format", "compressed-tensors", "-o", str(out / "ct")]) == 0
    return out


def test_kiln_compressed_tensors_output_loads_in_transformers(tiny: TinyModels, calib_file: Path, tmp_path: Path,
                                                              monkeypatch) -> None:
    out = _kiln_export(tiny, calib_file, tmp_path, sym=True)
    theirs = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(out / "ct", dtype=torch.float32))
    monkeypatch.setattr(switches, "_active", replace(switches.active(), quant_kernels=False))
    mine = window_logits(load_model(out / "kiln", dtype="float32").model, IDS)
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)


def test_kiln_asymmetric_output_decompresses_in_compressed_tensors(tiny: TinyModels, calib_file: Path,
                                                                   tmp_path: Path, monkeypatch) -> None:
    """compressed-tensors' own pack-quantized decompressor turns kiln's packed codes, scales and zero points
    back into dense weights; transformers' Llama with those weights computes what kiln's plain path does."""
    from collections import defaultdict

    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    out = _kiln_export(tiny, calib_file, tmp_path, sym=False)
    qconfig = json.loads((out / "ct" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(qconfig["config_groups"]["group_0"])
    assert scheme.weights.symmetric is False
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    dense: dict[str, torch.Tensor] = {}
    for name, t in load_file(str(out / "ct" / "model.safetensors")).items():
        module, _, leaf = name.rpartition(".")
        if leaf.startswith("weight_"):
            modules[module][leaf] = t
        else:
            dense[name] = t
    assert modules and all("weight_zero_point" in parts for parts in modules.values())
    for module, parts in modules.items():
        # the decompressor computes in the scales' dtype (fp16 as kiln writes them); fp32 scales holding the
        # same values make it compute in fp32, as kiln's plain path does
        parts = {**parts, "weight_scale": parts["weight_scale"].float()}
        dense[f"{module}.weight"] = PackedQuantizationCompressor.decompress(parts, scheme)["weight"].float()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny.hf["untied"], dtype=torch.float32)
    hf.load_state_dict(dense, strict=True)
    theirs = _hf_logits(hf)
    monkeypatch.setattr(switches, "_active", replace(switches.active(), quant_kernels=False))
    mine = window_logits(load_model(out / "kiln", dtype="float32").model, IDS)
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)


@pytest.mark.real_model
def test_default_model_quantized_by_compressed_tensors_loads_in_kiln(default_gguf_path: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """The default model, dequantized by transformers from its GGUF, quantized W4A16 asym g64 by the
    compressed-tensors library and saved packed: kiln's load of that folder against the library's own
    fake-quantized model."""
    dense = tmp_path / "dense"
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(str(default_gguf_path.parent),
                                                                  gguf_file=default_gguf_path.name, dtype=torch.float32)
    # transformers will not save a model it loaded from GGUF: the same weights in a plain model of its config
    config = copy.deepcopy(from_gguf.config)
    config.__dict__.pop("quantization_config", None)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(from_gguf.state_dict())
    model.save_pretrained(dense)
    del from_gguf
    transformers.AutoTokenizer.from_pretrained(str(default_gguf_path.parent),
                                               gguf_file=default_gguf_path.name).save_pretrained(dense)
    del model
    reference = _library_folder(dense, tmp_path / "ct", 4, 64, sym=False)
    native = load_model(tmp_path / "ct", dtype="float32")
    assert any(n.endswith("qweight") for n, _ in native.model.named_buffers())
    assert _kl_max(reference, window_logits(native.model, IDS)) < 1e-3
    monkeypatch.setattr(switches, "_active", replace(switches.active(), quant_kernels=False))
    plain = window_logits(load_model(tmp_path / "ct", dtype="float32").model, IDS)
    assert _kl_max(reference, plain) < 1e-5
    assert torch.equal(plain.argmax(-1), reference.argmax(-1))


def _library_w8a8_folder(src: Path, folder: Path, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-compressor's W8A8 scheme of `kind` ("int": int-quantized int8, "float": float-quantized FP8) made by
    the compressed-tensors library on `src` (8-bit per-channel weights, dynamic per-token 8-bit activations)
    and saved to `folder`. Returns the library's forward with its activations quantized, and the weights it
    stored, dequantized, run in a plain transformers model (the weight-only reference) — both on IDS."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="channel"),
        input_activations=QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="token", dynamic=True))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                                        quantization_status=QuantizationStatus.INITIALIZED))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.data
            scale, _ = calculate_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True),
                                         module.quantization_scheme.weights)
            if kind == "int":  # kiln's INT layout keeps fp16 scales (see _library_folder)
                scale = scale.half().float()
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
    with_quantized_activations = _hf_logits(model)
    fmt = f"{kind}-quantized"
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    (folder / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == fmt
    stored = load_file(str(folder / "model.safetensors"))
    dense = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = dense.state_dict()
    weight_dtype = torch.int8 if kind == "int" else torch.float8_e4m3fn
    for name, t in stored.items():
        if name.endswith(".weight") and t.dtype == weight_dtype:
            state[name] = t.float() * stored[name.replace(".weight", ".weight_scale")].float()
    dense.load_state_dict(state)
    return with_quantized_activations, _hf_logits(dense)


def test_w8a8_int8_folder_made_by_compressed_tensors_loads_as_int8_weights(tiny: TinyModels, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """llm-compressor's W8A8 int8 scheme (int-quantized: int8 per-channel weights, dynamic per-token int8
    activations), made by the library, loads as kiln's INT8 per-channel layer (its nearest method: the
    activations are not rounded to int8 per token). Against the library's own stored weights it must agree to
    float rounding; from the library's int8-activation forward it differs by that rounding alone."""
    folder = tmp_path / "w8a8"
    with_int8_activations, weights_only = _library_w8a8_folder(tiny.hf["untied"], folder, "int")
    native = load_model(folder, dtype="float32")
    assert native.model.layers[0].self_attn.qkv_proj.method.name.startswith("int8")
    assert _kl_max(weights_only, window_logits(native.model, IDS)) < 1e-4
    # kiln differs from the int8-activation forward by the activation rounding alone: as much as the
    # library's own weight-only forward does
    activation_rounding = _kl_max(with_int8_activations, weights_only)
    assert _kl_max(with_int8_activations, window_logits(native.model, IDS)) <= 1.05 * activation_rounding + 1e-5
    monkeypatch.setattr(switches, "_active", replace(switches.active(), quant_kernels=False))
    plain = window_logits(load_model(folder, dtype="float32").model, IDS)
    torch.testing.assert_close(plain, weights_only, rtol=1e-4, atol=1e-4)


def test_fp8_folder_made_by_compressed_tensors_loads_as_fp8_weights(tiny: TinyModels, tmp_path: Path) -> None:
    """llm-compressor's FP8 scheme (float-quantized: float8_e4m3fn per-channel weights, dynamic per-token fp8
    activations), made by the library, loads as kiln's FP8 layer (dequantize + GEMM, activations unquantized):
    equal to the library's stored weights run densely, and as far from the library's fp8-activation forward
    as that weight-only forward is."""
    folder = tmp_path / "fp8"
    with_fp8_activations, weights_only = _library_w8a8_folder(tiny.hf["untied"], folder, "float")
    loaded = load_model(folder, dtype="float32")
    assert loaded.model.layers[0].self_attn.qkv_proj.method.name.startswith("fp8")
    mine = window_logits(loaded.model, IDS)
    torch.testing.assert_close(mine, weights_only, rtol=1e-4, atol=1e-4)
    assert _kl_max(with_fp8_activations, mine) <= 1.05 * _kl_max(with_fp8_activations, weights_only) + 1e-5
