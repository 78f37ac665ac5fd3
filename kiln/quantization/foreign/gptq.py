"""The GPTQ checkpoint format (AutoGPTQ / GPTQModel; `"quant_method": "gptq"`), per Linear:

    qweight int32 [K / (32/b), N]   codes packed along the input dim K (element j of a word: bits j·b)
    qzeros  int32 [G, N / (32/b)]   zero points packed along N; checkpoint_format "gptq" (v1) stores
                                    zero - 1 (AutoGPTQ's historical offset), "gptq_v2" the zero itself
    scales  fp16  [G, N]
    g_idx   int32 [K]               the group of each input column (optional)

w[n, k] = (q[k, n] - zero[g_idx[k], n]) · scales[g_idx[k], n]. Config fields read: bits (4, 8),
group_size (-1 or > 0), desc_act, sym, checkpoint_format. `convert` returns the codes in the checkpoint's
column order; with act-order (a permuted g_idx) `input_permutation` says how to sort them into groups.
"""

from __future__ import annotations

import torch

from kiln.quantization.foreign.layout import IntLayout, UnsupportedField, act_order_permutation
from kiln.quantization.foreign.packing import unpack_int32

FORMATS = ("gptq", "gptq_v2")


class GPTQReader:
    name = "gptq"
    marker = "qweight"
    parts = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, qc: dict) -> None:
        bits = qc.get("bits")
        if bits not in (4, 8):
            raise UnsupportedField("bits", bits, "kiln loads 4- and 8-bit GPTQ weights")
        group = qc.get("group_size", -1)
        if not isinstance(group, int) or (group != -1 and group <= 0):
            raise UnsupportedField("group_size", group, "expected -1 or a positive integer")
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in FORMATS:
            raise UnsupportedField("checkpoint_format", fmt, f"kiln reads {' and '.join(FORMATS)}")
        self.zero_offset = 1 if fmt == "gptq" else 0
        self.layout = IntLayout(bits, group, bool(qc.get("sym", True)))
        self.act_order = bool(qc.get("desc_act", False))  # g_idx may then be a real permutation

    def input_permutation(self, module: str, parts: dict[str, torch.Tensor], k: int) -> torch.Tensor | None:
        return act_order_permutation(parts.get("g_idx"), self.layout, k, module, "desc_act")

    def convert(self, module: str, parts: dict[str, torch.Tensor], n: int, k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.layout.bits
        codes = unpack_int32(parts["qweight"], b, dim=0)[:k].t()
        zero = unpack_int32(parts["qzeros"], b, dim=1)[:, :n].t().to(torch.int16) + self.zero_offset
        # v1 stores zero - 1, so a stored 2**b - 1 reads as 2**b, as AutoGPTQ's own kernels compute it;
        # kiln's uint8 zeros hold that for 4 bits, not for 8.
        if int(zero.max()) > 255:
            raise ValueError(f"{module}: zero point {int(zero.max())} (a v1 zero of 2**8) has no kiln form")
        scale = parts["scales"].float().t()
        if scale.shape != (n, self.layout.groups(k)):
            raise ValueError(f"{module}: scales of shape {tuple(parts['scales'].shape)} do not fit [{self.layout.groups(k)}, {n}]")
        return codes.contiguous(), scale.contiguous(), zero.to(torch.uint8).contiguous()
