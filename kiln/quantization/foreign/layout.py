"""What every foreign format is translated into: kiln's INT layout (kiln.quantization.checkpoint's
{"format": "int"} entry), w[n, k] = (code[n, k] - zero[n, g]) · scale[n, g], g = k // group_size.

A format reader turns one checkpoint module's tensors into (codes uint8 [N, K], scale fp32 [N, G],
zero uint8 [N, G]); `kiln_tensors` stores them as kiln's buffers (INT4 codes two per byte, scales
fp16 — the precision kiln's native kernels read, so a foreign fp32/bf16 scale is rounded once here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kiln.quantization.primitives import pack_int4


class UnsupportedField(ValueError):
    """A quantization_config field whose value kiln cannot load: names the field and the value."""

    def __init__(self, field: str, value: object, why: str) -> None:
        super().__init__(f"quantization_config field {field!r} = {value!r} is not supported: {why}")


@dataclass(frozen=True)
class IntLayout:
    """bits ∈ {4, 8}; group_size > 0 or -1 (one group per row); sym: zero fixed at 2**(bits-1)."""

    bits: int
    group_size: int
    sym: bool

    def entry(self) -> dict:
        """The kiln layer entry (kiln.layers.quant_linear.method_for) this layout loads as."""
        return {"format": "int", "bits": self.bits, "group_size": self.group_size, "sym": self.sym, "smooth": False}

    def groups(self, k: int) -> int:
        return 1 if self.group_size == -1 else -(-k // self.group_size)


class FormatReader(Protocol):
    """One foreign format, its configuration already validated."""

    name: str
    layout: IntLayout
    marker: str  # the tensor leaf that says "this module is quantized" (qweight, weight_packed)
    parts: tuple[str, ...]  # every tensor leaf a quantized module may have

    def convert(self, module: str, parts: dict[str, torch.Tensor], n: int, k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A module's tensors → (codes uint8 [n, k], scale fp32 [n, G], zero uint8 [n, G]); ValueError when inconsistent."""


def act_order_permutation(g_idx: torch.Tensor | None, layout: IntLayout, k: int, module: str, field: str
                          ) -> torch.Tensor | None:
    """The input permutation that makes an act-order checkpoint's groups contiguous, or None when the
    group index is absent or already the plain one (column k in group k // group_size).

    GPTQ with act-order (desc_act) quantizes the input columns in order of decreasing Hessian
    diagonal, so column k's group is g_idx[k], not k // group_size. With `perm` = the columns sorted
    by group (stably), W[:, perm] has contiguous groups — kiln's layout — and W @ x = W[:, perm] @
    x[perm]: the layer gathers its activations by `perm` before the matmul. Every group must hold
    exactly as many columns as in the plain layout (GPTQ's act-order does), else the checkpoint is refused."""
    if g_idx is None:
        return None
    glen = k if layout.group_size == -1 else layout.group_size
    plain = torch.arange(k, device=g_idx.device) // glen
    g = g_idx.to(torch.int64).flatten()
    if g.shape != plain.shape:
        raise UnsupportedField(field, True, f"{module} has a g_idx of {g.numel()} entries for {k} input columns")
    if torch.equal(g, plain):
        return None
    groups = layout.groups(k)
    if int(g.min()) < 0 or int(g.max()) >= groups or not torch.equal(torch.bincount(g, minlength=groups),
                                                                     torch.bincount(plain, minlength=groups)):
        raise UnsupportedField(field, True, f"{module}'s g_idx does not give each group {glen} columns, so no "
                                            "permutation makes its groups contiguous")
    return torch.argsort(g, stable=True)


def kiln_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, layout: IntLayout) -> dict[str, torch.Tensor]:
    """kiln's buffers for one module (names as in a kiln quantized folder)."""
    if layout.sym and not bool((zero == 1 << (layout.bits - 1)).all()):
        raise ValueError(f"symmetric {layout.bits}-bit weights must have every zero point at {1 << (layout.bits - 1)}")
    qweight = pack_int4(codes) if layout.bits == 4 else codes.to(torch.uint8)
    return {"qweight": qweight.contiguous(), "scales": scale.to(torch.float16).contiguous(),
            "qzeros": zero.to(torch.uint8).contiguous()}
