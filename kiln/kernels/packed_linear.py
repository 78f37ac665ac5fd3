"""Dense copies pre-packed for oneDNN's GEMM: the large-M path (batched decode, prefill) of quantized layers.

A quantized layer's resident dense copy serves the batches its block kernel does not (M above the tuned
limit). torch's `F.linear` on a plain bf16 tensor makes oneDNN reorder the weight into its blocked layout
on every call, and on a plain fp32 tensor it runs MKL's sgemm; a copy reordered once at load
(`torch.ops.mkldnn._reorder_linear_weight`, the op torch's own inductor uses for frozen CPU linears) skips
the reorder and runs oneDNN's blocked GEMM.
- bf16, measured on an AMD EPYC with AVX-512, 2 threads (2026-12-01, torch 2.13): 1.1-1.2x on the default
  model's layer shapes at M = 32-64, 1.37x on its 49152 x 576 LM head at M = 32, ~1.05x at M = 128 and above.
- fp32, measured on an AVX2-only AMD EPYC (Zen 3), 2 threads (2026-12-01, torch 2.13), against MKL's sgemm
  on the plain copy: 1.2-2x at M = 8-64 on the layer shapes (the 49152 x 576 head: 30 -> 60 GMAC/s at
  M = 32), within ±10 % at M = 512 (benchmarks/results/concurrent_peers_avx2.json is the engine-level run).

A packed copy is an opaque oneDNN tensor: no storage, no `data_ptr`, no deepcopy. Only the layers'
GEMM path reads it (`packed_linear` here, `dense_copy_linear` in csrc/decode_linear.h for the fused
step); memory accounting counts its `numel() * element_size()`.

Invariants (checked once per process by `packing_available`, which turns packing off where they fail; and by
tests/test_packed_linear.py):
- bf16: `packed_linear(x, pack(w, bf16), b)` equals the plain path bit for bit: `F.linear(x, w, b)` for
  bf16 x and w, `F.linear(x.bfloat16(), w).float() + b` for fp32 x (oneDNN runs both).
- fp32: `packed_linear(x, pack(w, fp32), b)` equals `F.linear(x, w, b)` to fp32 rounding, not bit for bit
  (oneDNN and MKL sum in different orders). Every path of a model that holds a packed copy (the op-by-op
  layers and the fused decode step) runs the same packed GEMM, so they agree with each other bit for bit.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kiln.kernels import switches


PACKABLE = (torch.bfloat16, torch.float32)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """fp32 agreement: a different summation order moves a sum of K products by a few ulps of its terms."""
    return bool((got - want).abs().max() <= 1e-5 * want.abs().max().clamp_min(1.0) * 4)


@functools.cache
def _packing_works(dtype: torch.dtype = torch.bfloat16) -> bool:
    """oneDNN is built in, has the two ops, and its packed GEMM in `dtype` matches F.linear on a probe (bit for
    bit in bf16, to fp32 rounding in fp32; once per process and dtype)."""
    if not torch.backends.mkldnn.is_available() or dtype not in PACKABLE:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        for rows, k, n in ((20, 64, 48), (33, 576, 96), (40, 1536, 64)):  # a short K and the default model's two
            w = torch.randn(n, k, generator=g).to(dtype)
            x = torch.randn(rows, k, generator=g).to(dtype)
            b = torch.randn(n, generator=g).to(dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            got_b = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
            same = torch.equal if dtype == torch.bfloat16 else _close
            if not (same(got, F.linear(x, w)) and same(got_b, F.linear(x, w, b))):
                return False
        return True
    except (RuntimeError, AttributeError):
        return False


def packing_available(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether dense copies of `dtype` on `device` are packed: CPU, the switch on (`--no-packed-gemm`), oneDNN
    working for that dtype."""
    return torch.device(device).type == "cpu" and switches.active().packed_gemm and _packing_works(dtype)


def is_packed(weight: torch.Tensor | None) -> bool:
    return weight is not None and weight.is_mkldnn


def pack(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] weight → its values in `dtype` (bf16 or fp32) packed for oneDNN (a new tensor; `weight` is left
    as it is)."""
    if weight.dim() != 2:
        raise ValueError(f"a linear weight is [N, K]; got shape {tuple(weight.shape)}")
    if dtype not in PACKABLE:
        raise ValueError(f"packed copies are bf16 or fp32; got {dtype}")
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous())


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] weight → its bf16 values packed for oneDNN."""
    return pack(weight, torch.bfloat16)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) on a `pack` weight, computed in the copy's dtype and returned in x's dtype.

    The bias is added where the plain path adds it: inside the GEMM when x has the copy's dtype (as
    `F.linear(x, w, bias)`, one rounding), after the cast for fp32 x on a bf16 copy (as
    `F.linear(x.bfloat16(), w).float() + bias`)."""
    lead = x.shape[:-1]
    inner = bias if bias is not None and x.dtype == packed.dtype else None
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).to(packed.dtype).contiguous(), packed,
                                           inner.to(packed.dtype) if inner is not None else None, "none", [], "")
    y = y.to(x.dtype)
    if bias is not None and inner is None:
        y = y + bias
    return y.reshape(*lead, y.shape[-1])



def resident_copy(weight: torch.Tensor) -> torch.Tensor:
    """A dense copy as the engine keeps it (kiln.layers.gguf_quant): packed for oneDNN where that works for its
    dtype on its device, else the plain tensor itself. `kiln tune` times the resident path on these."""
    return pack(weight, weight.dtype) if packing_available(weight.device, weight.dtype) else weight


def resident_linear(x: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
    """x @ W^T on a `resident_copy`, as a quantized layer's dense-copy path runs it (no bias), in x's dtype."""
    if is_packed(copy):
        return packed_linear(x, copy)
    return F.linear(x.to(copy.dtype), copy).to(x.dtype)
