"""GPTQ, AutoAWQ (GEMM) and compressed-tensors folders load into kiln's INT layout and compute what
kiln's own folder of the same weights computes.

The foreign folders are written here from a kiln-quantized tiny model in each format's documented
layout (kiln.quantization.foreign.writers); loading one back must give the same buffers, so the
same logits, as loading kiln's own folder. Bad configurations must fail with one error naming the
field and the value.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.errors import ModelLoadError
from kiln.eval.forward import window_logits
from kiln.kernels import switches
from kiln.kernels.dequant import unpack_int4
from kiln.loader.model_loader import load_model
from kiln.models.llama import PACKED_MODULES
from kiln.quantization.checkpoint import save_quantized
from kiln.quantization.foreign import writers
from kiln.quantization.foreign.layout import IntLayout
from kiln.quantization.quantize import QuantizeOptions, quantize_model

from loader.tiny_model import TinyModels

UNPACKED = {(fused, shard): leaf for leaf, (fused, shard) in PACKED_MODULES.items()}


def kiln_folder(tiny: TinyModels, calib_file: Path, out: Path, bits: int, group: int, sym: bool) -> Path:
    loaded = load_model(tiny.hf["untied"], dtype="float32")
    opts = QuantizeOptions(method="gptq", bits=bits, group_size=group, sym=sym, calib_file=calib_file, calib_samples=2,
                           calib_seqlen=64, progress=False)
    report = quantize_model(loaded.model, loaded.tokenizer, opts)
    return save_quantized(out, loaded.model, loaded.config, loaded.tokenizer, report.quantization_config)


def foreign_folder(kiln_dir: Path, out: Path, fmt: str, layout: IntLayout, perms: dict[str, torch.Tensor] | None = None,
                   **kw) -> Path:
    """kiln's folder rewritten in `fmt`: each fused module split into its checkpoint modules. `perms` (kiln
    module → input permutation): write those modules in act order (kiln's column j is the checkpoint's perm[j])."""
    config = json.loads((kiln_dir / "config.json").read_text())
    layers = config["quantization_config"]["layers"]
    tensors = load_file(str(kiln_dir / "model.safetensors"))
    model = load_model(kiln_dir, dtype="float32").model
    out_tensors: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        module = name.rpartition(".")[0]
        if module not in layers:
            out_tensors[name] = t
    for module in layers:
        linear = model.get_submodule(module.removeprefix("model."))
        codes = tensors[f"{module}.qweight"]
        codes = unpack_int4(codes) if layout.bits == 4 else codes
        scale, zero = tensors[f"{module}.scales"].float(), tensors[f"{module}.qzeros"]
        parent, _, leaf = module.rpartition(".")
        for shard in linear.shard_names:
            rows = linear.shard_slice(shard)
            hf_module = module if shard is None else f"{parent}.{UNPACKED[(leaf, shard)]}"
            perm = (perms or {}).get(module)
            if fmt == "gptq":
                part = writers.gptq_tensors(codes[rows], scale[rows], zero[rows], layout, perm=perm, **kw)
            elif fmt == "awq":
                part = writers.awq_tensors(codes[rows], scale[rows], zero[rows], layout)
            else:
                part = writers.compressed_tensors_tensors(codes[rows], scale[rows], zero[rows], layout, perm=perm)
            out_tensors.update({f"{hf_module}.{k}": v for k, v in part.items()})
    config["quantization_config"] = (writers.gptq_config(layout, **kw) if fmt == "gptq" else writers.awq_config(layout)
                                     if fmt == "awq" else writers.compressed_tensors_config(
                                         layout, ["lm_head"], "group" if perms else None))
    shutil.copytree(kiln_dir, out)
    save_file(out_tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


CASES = [
    ("gptq", 4, 32, False, {"v1": False}),
    ("gptq", 4, 32, True, {"v1": True, "desc_act": True}),  # act-order with static groups: a plain g_idx
    ("gptq", 8, -1, True, {"v1": True}),
    ("awq", 4, 32, False, {}),
    ("compressed-tensors", 4, 32, False, {}),
    ("compressed-tensors", 4, 64, True, {}),
    ("compressed-tensors", 8, -1, True, {}),
]


@pytest.mark.parametrize("fmt,bits,group,sym,kw", CASES, ids=lambda c: str(c))
def test_foreign_folder_loads_like_kiln_folder(tiny: TinyModels, calib_file: Path, tmp_path: Path, monkeypatch,
                                               fmt: str, bits: int, group: int, sym: bool, kw: dict) -> None:
    kiln_dir = kiln_folder(tiny, calib_file, tmp_path / "kiln", bits, group, sym)
    foreign = foreign_folder(kiln_dir, tmp_path / fmt, fmt, IntLayout(bits, group, sym), **kw)
    mine, theirs = load_model(kiln_dir, dtype="float32"), load_model(foreign, dtype="float32")
    assert type(theirs.model.layers[0].self_attn.qkv_proj.method) is type(mine.model.layers[0].self_attn.qkv_proj.method)
    assert theirs.model.layers[0].mlp.down_proj.method.name == mine.model.layers[0].mlp.down_proj.method.name
    for name, buf in mine.model.named_buffers():  # every quantized buffer comes back bit for bit
        if "layers." in name:
            assert torch.equal(dict(theirs.model.named_buffers())[name].view(torch.uint8), buf.view(torch.uint8)), name
    ids = list(range(3, 40))
    for rows in (ids[:1], ids):
        torch.testing.assert_close(window_logits(theirs.model, rows), window_logits(mine.model, rows), rtol=0, atol=0)
    monkeypatch.setattr(switches, "_active", replace(switches.active(), quant_kernels=False))
    # The plain-torch path on the foreign folder agrees with the native kernels on kiln's (within the
    # kernels' own tolerance: int16 activations, the Q4 offset rounded to fp16).
    a = torch.log_softmax(window_logits(load_model(foreign, dtype="float32").model, ids), -1)
    b = torch.log_softmax(window_logits(mine.model, ids), -1)
    assert (b.exp() * (b - a)).sum(-1).max().item() < 1e-4


def _with_config(tiny: TinyModels, calib_file: Path, tmp_path: Path, fmt: str, layout: IntLayout, edit, **kw) -> Path:
    kiln_dir = kiln_folder(tiny, calib_file, tmp_path / "kiln", layout.bits, layout.group_size, layout.sym)
    folder = foreign_folder(kiln_dir, tmp_path / fmt, fmt, layout, **kw)
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("fmt,edit,match", [
    ("gptq", lambda qc: qc.update(bits=3), r"'bits' = 3"),
    ("gptq", lambda qc: qc.update(checkpoint_format="marlin"), r"'checkpoint_format' = 'marlin'"),
    ("awq", lambda qc: qc.update(version="gemv"), r"'version' = 'gemv'"),
    ("compressed-tensors", lambda qc: qc["config_groups"]["group_0"].update(input_activations={"num_bits": 8}),
     r"'config_groups.group_0.input_activations'"),
    ("compressed-tensors", lambda qc: qc["config_groups"]["group_0"]["weights"].update(type="float"),
     r"'weights.type' = 'float'"),
])
def test_unsupported_config_is_one_error_naming_the_field(tiny: TinyModels, calib_file: Path, tmp_path: Path,
                                                          fmt: str, edit, match: str) -> None:
    folder = _with_config(tiny, calib_file, tmp_path, fmt, IntLayout(4, 32, False), edit)
    with pytest.raises(ModelLoadError, match=match) as info:
        load_model(folder, dtype="float32")
    assert "\n" not in str(info.value)


def _hf_reference_logits(tiny: TinyModels, kiln_model: torch.nn.Module, weights: dict[str, torch.Tensor],
                         ids: list[int]) -> torch.Tensor:
    """transformers' Llama of the tiny architecture holding `kiln_model`'s other parameters (embedding,
    norms, head: as the quantized folder stored them) and, for each of kiln's fused linears, `weights`
    (kiln module → dense [N, K], split back into q/k/v and gate/up) — an independent reference."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny.hf["untied"]), dtype=torch.float32).eval()
    for name, param in kiln_model.named_parameters():
        hf.get_parameter(name if name.startswith("lm_head") else f"model.{name}").data.copy_(param)
    for module, w in weights.items():
        linear = kiln_model.get_submodule(module.removeprefix("model."))
        parent, _, leaf = module.rpartition(".")
        for shard in linear.shard_names:
            name = module if shard is None else f"{parent}.{UNPACKED[(leaf, shard)]}"
            hf.get_submodule(name).weight.data.copy_(w[linear.shard_slice(shard)])
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_act_order_checkpoint_loads_and_computes_its_weights(tiny: TinyModels, calib_file: Path, tmp_path: Path,
                                                             monkeypatch, fmt: str) -> None:
    """Columns written in a random act order per layer input (one order for q/k/v, one for gate/up, as GPTQ
    produces): kiln sorts them back into groups, gathers the activations the same way, and computes what
    transformers computes with the dequantized weights in the checkpoint's own column order."""
    layout = IntLayout(4, 32, False)
    kiln_dir = kiln_folder(tiny, calib_file, tmp_path / "kiln", 4, 32, False)
    mine = load_model(kiln_dir, dtype="float32").model
    gen = torch.Generator().manual_seed(7)
    perms, weights = {}, {}
    for name, module in mine.named_modules():
        if hasattr(module, "qweight"):
            key = f"model.{name}"
            perms[key] = torch.randperm(module.input_size, generator=gen)
            w = module.method.dequantized_weight(module, torch.float32)
            weights[key] = w[:, torch.argsort(perms[key])]  # the checkpoint's column c is kiln's column inv[c]
    kw = {"v1": False, "desc_act": True} if fmt == "gptq" else {}
    foreign = foreign_folder(kiln_dir, tmp_path / fmt, fmt, layout, perms=perms, **kw)
    theirs = load_model(foreign, dtype="float32").model
    qkv = theirs.layers[0].self_attn.qkv_proj
    assert "act-order" in qkv.method.name and qkv.method.blocks is not None  # the native kernel still runs it
    assert theirs.decode_plan() is None  # the fused step has no gather: the op-by-op path serves it
    ids = list(range(3, 40))
    ref = torch.log_softmax(_hf_reference_logits(tiny, mine, weights, ids), -1)
    native = torch.log_softmax(window_logits(theirs, ids), -1)
    assert (ref.exp() * (ref - native)).sum(-1).max().item() < 1e-4  # int16 activations in the block kernel
    monkeypatch.setattr(switches, "_active", replace(switches.active(), quant_kernels=False))
    plain = torch.log_softmax(window_logits(load_model(foreign, dtype="float32").model, ids), -1)
    torch.testing.assert_close(plain, ref, atol=2e-5, rtol=0)


def test_act_order_with_uneven_groups_is_refused(tiny: TinyModels, calib_file: Path, tmp_path: Path) -> None:
    layout = IntLayout(4, 32, False)
    folder = _with_config(tiny, calib_file, tmp_path, "gptq", layout, lambda qc: None, v1=False, desc_act=True)
    tensors = load_file(str(folder / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("g_idx"))
    g_idx = tensors[name].clone()
    g_idx[0] = 1  # group 0 one column short, group 1 one long: no permutation makes them contiguous
    tensors[name] = g_idx
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"'desc_act' = True .*does not give each group 32 columns"):
        load_model(folder, dtype="float32")


def test_partly_quantized_fused_layer_is_refused(tiny: TinyModels, calib_file: Path, tmp_path: Path) -> None:
    folder = _with_config(tiny, calib_file, tmp_path, "awq", IntLayout(4, 32, False), lambda qc: None)
    tensors = load_file(str(folder / "model.safetensors"))
    for leaf in ("qweight", "qzeros", "scales"):
        del tensors[f"model.layers.0.self_attn.k_proj.{leaf}"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64, dtype=torch.float16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="fuses q, k, v into one layer"):
        load_model(folder, dtype="float32")


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_cli_quantize_writes_foreign_format(tiny: TinyModels, calib_file: Path, tmp_path: Path, fmt: str) -> None:
    from kiln.entrypoints.cli import main as kiln_main

    args = ["quantize", str(tiny.hf["untied"]), "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--calib-file", str(calib_file), "--calib-samples", "2", "--calib-seqlen", "64"]
    assert kiln_main([*args, "-o", str(tmp_path / "kiln")]) == 0
    assert kiln_main([*args, "--format", fmt, "-o", str(tmp_path / fmt)]) == 0
    assert json.loads((tmp_path / fmt / "config.json").read_text())["quantization_config"]["quant_method"] == fmt
    ids = list(range(3, 40))
    mine, theirs = load_model(tmp_path / "kiln", dtype="float32"), load_model(tmp_path / fmt, dtype="float32")
    torch.testing.assert_close(window_logits(theirs.model, ids), window_logits(mine.model, ids), rtol=0, atol=0)
