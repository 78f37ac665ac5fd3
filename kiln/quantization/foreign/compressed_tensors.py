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
set: sparsity_config, transform_config, kv_cache_scheme.

The `int-quantized` format (llm-compressor's W8A8 int8: `weight` int8 [N, K] as it is, `weight_scale`
[N, 1] per channel, symmetric, with dynamic per-token int8 activations) loads as kiln's INT8
per-channel layer on the native int8 kernel: the nearest kiln method. Its activations are then
quantized as kiln's kernel does it (int16 per 32-block, closer to the unquantized model than the
checkpoint's int8 per token), so outputs differ from an int8-activation runtime by that rounding.
The `float-quantized` format (FP8: float8_e4m3fn weights with one scale per channel or per tensor,
dynamic per-token fp8 activations or none) loads as kiln's FP8 layer (dequantize + GEMM; activations
unquantized). Activation quantization with 4-bit weights and static activation scales are refused.
"""

from __future__ import annotations

import torch

from kiln.quantization.foreign.layout import IntLayout, UnsupportedField, act_order_permutation
from kiln.quantization.foreign.packing import unpack_int32


def _dynamic_tokens(acts: dict, fmt: str) -> bool:
    """Dynamic per-token 8-bit activations of the folder's kind (int8 for int-quantized, fp8 for float-quantized)."""
    kind = {"int-quantized": "int", "float-quantized": "float"}.get(fmt)
    return (kind is not None and acts.get("num_bits") == 8 and acts.get("type", "int") == kind
            and acts.get("dynamic") is True and acts.get("strategy") == "token" and acts.get("symmetric", True))


def _format(qc: dict) -> str:
    groups = qc.get("config_groups") or {}
    return next((g.get("format") or qc.get("format") for g in groups.values()), qc.get("format")) or ""


def _weights_args(qc: dict) -> dict:
    groups = qc.get("config_groups") or {}
    if not groups:
        raise UnsupportedField("config_groups", groups, "no quantization scheme given")
    seen: dict | None = None
    for name, group in groups.items():
        fmt = group.get("format") or qc.get("format")
        if fmt not in ("pack-quantized", "int-quantized", "float-quantized"):
            raise UnsupportedField(f"config_groups.{name}.format", fmt, "kiln reads the pack-quantized (W4A16/W8A16), "
                                   "int-quantized (W8A8 int8) and float-quantized (FP8) formats")
        acts = group.get("input_activations")
        if acts is not None and not _dynamic_tokens(acts, fmt):
            raise UnsupportedField(f"config_groups.{name}.input_activations", acts,
                                   "kiln loads activation quantization only as W8A8 with dynamic per-token activations "
                                   "(int8 in int-quantized, fp8 in float-quantized folders)")
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
        self.fp8 = _format(qc) == "float-quantized"
        if self.fp8:  # fp8 weights as they are, one scale per channel (or per tensor): kiln's FP8 layer
            if kind != "float" or bits != 8 or strategy not in ("channel", "tensor") or not w.get("symmetric", True):
                raise UnsupportedField("weights", w, "float-quantized loads as FP8: 8-bit float weights, "
                                                     "symmetric, per channel or per tensor")
            self.layout = IntLayout(8, -1, True)  # unused for fp8; keeps the reader's shape
            self.int_quantized = False
            self.marker = "weight_scale"
            self.parts = ("weight", "weight_scale", "input_scale")
            return
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
        self.act_order = w.get("actorder") == "group"  # weight_g_idx may then be a real permutation
        self.int_quantized = _format(qc) == "int-quantized"
        if self.int_quantized:  # int8 weights stored as they are: `weight_scale` marks a quantized module
            if bits != 8 or strategy != "channel" or not self.layout.sym:
                raise UnsupportedField("weights", w, "int-quantized loads as W8A8 int8: 8-bit symmetric per-channel weights")
            self.marker = "weight_scale"
            self.parts = ("weight", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point")

    def input_permutation(self, module: str, parts: dict[str, torch.Tensor], k: int) -> torch.Tensor | None:
        return act_order_permutation(parts.get("weight_g_idx"), self.layout, k, module, "weights.actorder")

    def entry(self) -> dict:
        """The kiln layer entry (kiln.layers.quant_linear.method_for) this folder's layers load as."""
        return {"format": "fp8"} if self.fp8 else self.layout.entry()

    def kiln_buffers(self, module: str, parts: dict[str, torch.Tensor], n: int, k: int) -> dict[str, torch.Tensor] | None:
        """kiln's buffers for formats that are not an INT layout (fp8), else None (then `convert`)."""
        if not self.fp8:
            return None
        weight = parts.get("weight")
        if weight is None or weight.dtype != torch.float8_e4m3fn or tuple(weight.shape) != (n, k):
            raise ValueError(f"{module}: expected a float8_e4m3fn weight of shape [{n}, {k}]")
        scale = parts["weight_scale"].float().reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(n)
        if scale.shape != (n,):
            raise ValueError(f"{module}: weight_scale of shape {tuple(parts['weight_scale'].shape)} is neither per "
                             "channel nor per tensor")
        return {"qweight": weight.contiguous(), "scales": scale.contiguous()}

    def convert(self, module: str, parts: dict[str, torch.Tensor], n: int, k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, g = self.layout.bits, self.layout.groups(k)
        if self.int_quantized:
            weight = parts.get("weight")
            if weight is None or weight.dtype != torch.int8 or tuple(weight.shape) != (n, k):
                raise ValueError(f"{module}: expected an int8 weight of shape [{n}, {k}]")
            scale = parts["weight_scale"].float().reshape(n, -1)
            if scale.shape != (n, 1):
                raise ValueError(f"{module}: weight_scale of shape {tuple(parts['weight_scale'].shape)} is not per channel")
            codes = (weight.to(torch.int16) + 128).to(torch.uint8)  # kiln's unsigned codes, zero point 128
            return codes.contiguous(), scale.contiguous(), torch.full((n, 1), 128, dtype=torch.uint8)
        if "weight_shape" in parts and tuple(int(x) for x in parts["weight_shape"].tolist()) != (n, k):
            raise ValueError(f"{module}: weight_shape {parts['weight_shape'].tolist()} is not [{n}, {k}]")
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
