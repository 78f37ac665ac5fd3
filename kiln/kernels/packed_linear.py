"""bf16 dense copies pre-packed for oneDNN's GEMM: the large-M path (batched decode, prefill) of quantized layers.

A quantized layer's resident dense copy serves the batches its block kernel does not (M above the tuned
limit). torch's `F.linear` on a plain bf16 tensor makes oneDNN reorder the weight into its blocked layout
on every call; a copy reordered once at load (`torch.ops.mkldnn._reorder_linear_weight`, the op torch's
own inductor uses for frozen CPU linears) skips that. Measured on an AMD EPYC, 2 threads (2026-12-01,
torch 2.13): 1.1-1.2x on the default model's layer shapes at M = 32-64, 1.37x on its 49152 x 576 LM head
at M = 32, ~1.05x at M = 128 and above; results equal `F.linear` on the plain copy bit for bit there
(checked once per process on three shapes by `packing_available`, which turns packing off where
they differ; and by tests/test_packed_linear.py).

A packed copy is an opaque oneDNN tensor: no storage, no `data_ptr`, no deepcopy. Only the layers'
GEMM path reads it (`packed_linear` here, `dense_copy_linear` in csrc/decode_linear.h for the fused
step); memory accounting counts its `numel() * element_size()`.

Invariant: `packed_linear(x, pack_bf16(w), b)` equals the plain path bit for bit: `F.linear(x, w, b)` for
bf16 x and w, `F.linear(x.bfloat16(), w).float() + b` for fp32 x.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kiln.kernels import switches


@functools.cache
def _packing_works() -> bool:
    """oneDNN is built in, has the two ops, and its packed GEMM equals F.linear on a probe (once per process)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        for rows, k, n in ((20, 64, 48), (33, 576, 96), (40, 1536, 64)):  # a short K and the default model's two
            w = torch.randn(n, k, generator=g).bfloat16()
            x = torch.randn(rows, k, generator=g).bfloat16()
            b = torch.randn(n, generator=g).bfloat16()
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            if not (torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), F.linear(x, w))
                    and torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""),
                                    F.linear(x, w, b))):
                return False
        return True
    except (RuntimeError, AttributeError):
        return False


def packing_available(device: torch.device | str) -> bool:
    """Whether dense copies on `device` are packed: CPU, the switch on (`--no-packed-gemm`), oneDNN working."""
    return torch.device(device).type == "cpu" and switches.active().packed_gemm and _packing_works()


def is_packed(weight: torch.Tensor | None) -> bool:
    return weight is not None and weight.is_mkldnn


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] weight → its bf16 values packed for oneDNN (a new tensor; `weight` is left as it is)."""
    if weight.dim() != 2:
        raise ValueError(f"a linear weight is [N, K]; got shape {tuple(weight.shape)}")
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16).contiguous())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) on a `pack_bf16` weight, computed in bf16 and returned in x's dtype.

    The bias is added where the plain path adds it: inside the GEMM for bf16 x (as `F.linear(x, w, bias)`,
    one rounding), after the cast for fp32 x (as `F.linear(x.bfloat16(), w).float() + bias`)."""
    lead = x.shape[:-1]
    inner = bias if bias is not None and x.dtype == torch.bfloat16 else None
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous(), packed,
                                           inner.to(torch.bfloat16) if inner is not None else None, "none", [], "")
    y = y.to(x.dtype)
    if bias is not None and inner is None:
        y = y + bias
    return y.reshape(*lead, y.shape[-1])

