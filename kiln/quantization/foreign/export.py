"""A kiln quantized folder (INT layers) rewritten as a GPTQ, AutoAWQ GEMM or compressed-tensors folder.

Each fused kiln module (qkv_proj, gate_up_proj) is split back into the checkpoint modules it packs
(q/k/v, gate/up), each module's codes/scales/zeros converted by kiln.quantization.foreign.writers,
and config.json's quantization_config replaced by the format's own. Every other tensor and file is
copied as it is. Layers with AWQ's run-time `smooth` vector, FP8 or W8A8 have no form in these
formats and are refused, as are mixed bit widths (one quantization_config describes every layer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kiln.kernels.dequant import unpack_int4
from kiln.quantization.foreign import writers
from kiln.quantization.foreign.layout import IntLayout

FORMATS = ("gptq", "awq", "compressed-tensors")


def _layout_of(layers: dict) -> IntLayout:
    kinds = {(e.get("format"), e.get("bits"), e.get("group_size"), e.get("sym"), bool(e.get("smooth"))) for e in layers.values()}
    if len(kinds) != 1:
        raise ValueError(f"layers are quantized {len(kinds)} different ways; these formats describe one scheme")
    fmt, bits, group, sym, smooth = kinds.pop()
    if fmt != "int" or smooth:
        raise ValueError("only INT weight-only layers without AWQ's run-time smoothing (kiln's RTN / GPTQ) can be exported")
    return IntLayout(int(bits), int(group), bool(sym))


def export_folder(kiln_dir: Path | str, out: Path | str, fmt: str, packed_modules: dict[str, tuple[str, str]],
                  shard_rows: dict[str, list[tuple[str | None, int]]], v1: bool = True) -> Path:
    """Write `out` in `fmt` from kiln's folder `kiln_dir`.

    `packed_modules`: the architecture's checkpoint module → (fused module, shard) map;
    `shard_rows`: kiln module name ("model.layers.0.self_attn.qkv_proj") → [(shard, rows)] in row order.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    kiln_dir, out = Path(kiln_dir), Path(out)
    config = json.loads((kiln_dir / "config.json").read_text())
    layers = config["quantization_config"]["layers"]
    layout = _layout_of(layers)
    unpacked = {(fused, shard): leaf for leaf, (fused, shard) in packed_modules.items()}
    tensors = load_file(str(kiln_dir / "model.safetensors"))
    result = {name: t for name, t in tensors.items() if name.rpartition(".")[0] not in layers}
    for module in layers:
        codes = tensors[f"{module}.qweight"]
        codes = unpack_int4(codes) if layout.bits == 4 else codes
        scale, zero = tensors[f"{module}.scales"].float(), tensors[f"{module}.qzeros"]
        parent, _, leaf = module.rpartition(".")
        start = 0
        for shard, rows in shard_rows[module]:
            sl = slice(start, start + rows)
            start += rows
            name = module if shard is None else f"{parent}.{unpacked[(leaf, shard)]}"
            if fmt == "gptq":
                part = writers.gptq_tensors(codes[sl], scale[sl], zero[sl], layout, v1=v1)
            elif fmt == "awq":
                part = writers.awq_tensors(codes[sl], scale[sl], zero[sl], layout)
            else:
                part = writers.compressed_tensors_tensors(codes[sl], scale[sl], zero[sl], layout)
            result.update({f"{name}.{k}": v.contiguous() for k, v in part.items()})
    config["quantization_config"] = (writers.gptq_config(layout, v1=v1) if fmt == "gptq" else
                                     writers.awq_config(layout) if fmt == "awq" else
                                     writers.compressed_tensors_config(layout, ["lm_head"]))
    shutil.copytree(kiln_dir, out)
    save_file(result, str(out / "model.safetensors"), metadata={"format": "pt", "producer": "kiln"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def shard_rows_of(model: torch.nn.Module, layers: dict) -> dict[str, list[tuple[str | None, int]]]:
    """For each quantized module named in a kiln quantization_config: its shards and their row counts."""
    out = {}
    for module in layers:
        linear = model.get_submodule(module.removeprefix("model."))
        out[module] = list(zip(linear.shard_names, linear.output_sizes))
    return out
