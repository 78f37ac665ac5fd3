"""AutoAWQ's GEMM checkpoint format (`"quant_method": "awq"`, `"version": "gemm"`), per Linear:

    qweight int32 [K, N / 8]   4-bit codes packed along the output dim N, eight per word in
                               AutoAWQ's interleaved order (kiln.quantization.foreign.packing.AWQ_ORDER)
    qzeros  int32 [G, N / 8]   zero points, packed the same way
    scales  fp16  [G, N]

w[n, k] = (q[k, n] - zero[k // group_size, n]) · scales[k // group_size, n]. AWQ's activation scales are
already folded into the previous layers, so nothing divides the activations at run time.
Config fields read: bits (4), group_size, zero_point (true), version (gemm).
"""

from __future__ import annotations

import torch

from kiln.quantization.foreign.layout import IntLayout, UnsupportedField
from kiln.quantization.foreign.packing import awq_unorder, unpack_int32


class AWQReader:
    name = "awq"
    marker = "qweight"
    parts = ("qweight", "qzeros", "scales")

    def __init__(self, qc: dict) -> None:
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise UnsupportedField("bits", bits, "AutoAWQ's GEMM format is 4-bit")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedField("version", qc.get("version"), "kiln reads AutoAWQ's GEMM layout only")
        if not qc.get("zero_point", True):
            raise UnsupportedField("zero_point", qc.get("zero_point"), "kiln reads AutoAWQ's zero-point (asymmetric) weights")
        group = qc.get("group_size", qc.get("q_group_size", 128))
        if not isinstance(group, int) or (group != -1 and group <= 0):
            raise UnsupportedField("group_size", group, "expected -1 or a positive integer")
        self.layout = IntLayout(4, group, False)

    def convert(self, module: str, parts: dict[str, torch.Tensor], n: int, k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = awq_unorder(unpack_int32(parts["qweight"], 4, dim=1))[:, :n].t()
        zero = awq_unorder(unpack_int32(parts["qzeros"], 4, dim=1))[:, :n].t()
        scale = parts["scales"].float().t()
        if codes.shape != (n, k) or scale.shape != (n, self.layout.groups(k)):
            raise ValueError(f"{module}: AWQ tensors of shapes {tuple(parts['qweight'].shape)} / "
                             f"{tuple(parts['scales'].shape)} do not fit a [{n}, {k}] weight")
        return codes.contiguous(), scale.contiguous(), zero.contiguous()
