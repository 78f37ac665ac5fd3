"""compressed-tensors' pack-quantized format (what llm-compressor writes and vLLM loads;
`"quant_method": "compressed-tensors"`, `"format": "pack-quantized"`), per Linear:

    weight_packed      int32 [N, K·b/32]   codes packed along K (element j of a word: bits j·b),
                                           stored as signed value + 2**(b-1)
    weight_scale       float [N, G]        (G = 1 for the "channel" strategy)
    weight_zero_point  int32 [N·b/32, G]   asymmetric only: zero points packed along N, same offset
    weight_shape       int64 [2]           (N, K)
    weight_g_idx       int32 [K]           only for act-order "group"

w[n, k] = (code - zero) · scale with both codes offset the same way, so kiln's unsigned layout reads
them as they are (symmetric: zero = 2**(b-1)). Config read: config_groups[*].weights (num_bits 4/8,
type int, strategy group/channel, symmetric, group_size, dynamic false, actorder), and refused when
set: input_activations (W8A8), sparsity_config, transform_config, kv_cache_scheme.
"""

from __future__ import annotations

import torch

from kiln.quantization.foreign.layout import IntLayout, UnsupportedField, check_g_idx
from kiln.quantization.foreign.packing import unpack_int32


def _weights_args(qc: dict) -> dict:
    groups = qc.get("config_groups") or {}
    if not groups:
        raise UnsupportedField("config_groups", groups, "no quantization scheme given")
    seen: dict | None = None
    for name, group in groups.items():
        fmt = group.get("format") or qc.get("format")
        if fmt != "pack-quantized":
            raise UnsupportedField(f"config_groups.{name}.format", fmt, "kiln reads the pack-quantized format")
        if group.get("input_activations") is not None:
            raise UnsupportedField(f"config_groups.{name}.input_activations", group["input_activations"],
                                   "activation quantization (W8A8) is not loaded yet; weight-only schemes are")
        w = group.get("weights")
        if w is None:
            raise UnsupportedField(f"config_groups.{name}.weights", None, "a weight scheme is needed")
        if seen is not None and w != seen:
            raise UnsupportedField("config_groups", list(groups), "groups with different weight schemes")
        seen = w
    assert seen is not None
    return seen


class CompressedTensorsReader:
    name = "compressed-tensors"
    marker = "weight_packed"
    parts = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")

    def __init__(self, qc: dict) -> None:
        for field in ("sparsity_config", "transform_config", "kv_cache_scheme"):
            if qc.get(field):
                raise UnsupportedField(field, qc[field], "kiln loads quantized weights only")
        w = _weights_args(qc)
        bits, kind, strategy = w.get("num_bits"), w.get("type", "int"), w.get("strategy")
        if kind != "int":
            raise UnsupportedField("weights.type", kind, "kiln reads integer weights (W4A16 / W8A16)")
        if bits not in (4, 8):
            raise UnsupportedField("weights.num_bits", bits, "kiln reads 4- and 8-bit weights")
        if strategy not in ("group", "channel"):
            raise UnsupportedField("weights.strategy", strategy, "kiln reads group-wise and per-channel weights")
        if w.get("dynamic"):
            raise UnsupportedField("weights.dynamic", w["dynamic"], "weights must be statically quantized")
        group = int(w["group_size"]) if strategy == "group" else -1
        if strategy == "group" and group <= 0:
            raise UnsupportedField("weights.group_size", w.get("group_size"), "expected a positive group size")
        self.layout = IntLayout(bits, group, bool(w.get("symmetric", True)))

    def convert(self, module: str, parts: dict[str, torch.Tensor], n: int, k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, g = self.layout.bits, self.layout.groups(k)
        if "weight_shape" in parts and tuple(int(x) for x in parts["weight_shape"].tolist()) != (n, k):
            raise ValueError(f"{module}: weight_shape {parts['weight_shape'].tolist()} is not [{n}, {k}]")
        check_g_idx(parts.get("weight_g_idx"), self.layout, k, module, "weights.actorder")
        codes = unpack_int32(parts["weight_packed"], b, dim=1)[:, :k]
        scale = parts["weight_scale"].float().reshape(n, -1)
        if scale.shape != (n, g):
            raise ValueError(f"{module}: weight_scale of shape {tuple(parts['weight_scale'].shape)} does not fit [{n}, {g}]")
        if self.layout.sym:
            zero = torch.full((n, g), 1 << (b - 1), dtype=torch.uint8)
        elif "weight_zero_point" not in parts:
            raise ValueError(f"{module}: asymmetric weights without weight_zero_point")
        else:
            zero = unpack_int32(parts["weight_zero_point"], b, dim=0)[:n]
        return codes.contiguous(), scale.contiguous(), zero.contiguous()
