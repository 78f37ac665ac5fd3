"""Dense (fp32 / bf16) linears at decode-sized batches on kiln's own kernel (csrc/dense_gemv.cpp).

torch's CPU GEMM streams a decode step's dense weights at 12-18 GB/s here (MKL sgemv, oneDNN bf16 at
M = 1); kiln's kernel walks each weight row once for up to four activation rows at a time, in fp32
(bf16 weights widened exactly). Where it wins depends on the machine, so the largest M it takes is
`kiln tune`'s measurement ("dense_kernel_rows" of the tuning file, kiln.tuning.kernel_tune); untuned, the
built-in limits below apply (measured on an AMD EPYC with AVX-512, 2 threads, 2026-11-30, default model's
shapes: fp32 weights 1.3-1.9x torch up to M = 8; bf16 1.3-1.4x at M = 1, level at 4, slower at 8).
Above the limit (and without the native library or a SIMD build) the layer runs torch's GEMM.

Invariants: the plain path (`dense_linear`) and the fused decode step (kiln.kernels.decode_step's dense
entries) choose by the same limit and compute the same thing, so they stay bit-identical; within the
kernel (M <= the limit) a row's output does not depend on how many rows share the call
(tests/test_dense_matmul.py) — above the limit torch's GEMM runs, whose rounding may depend on M, so a
speculative verification of more rows than the limit is not bit-identical to decoding them one by one.
A layer reads its limit once, at its first call (the weights are final by then); `kiln tune` in the same
process applies to layers built after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels import switches

# (weights dtype → largest M) where `kiln tune` has not measured this machine; see the module docstring.
BUILTIN_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 1}


def dense_kernel_rows(dtype: torch.dtype, device: torch.device | str = "cpu") -> int:
    """The largest M kiln's dense kernel runs for weights and activations of `dtype` on `device` (0: never)."""
    from kiln.kernels.native import load_native, simd_path
    from kiln.kernels.tune import load_tuning

    if torch.device(device).type != "cpu" or dtype not in BUILTIN_MAX_ROWS:
        return 0
    if not switches.active().quant_kernels or not load_native() or simd_path() not in ("AVX-512", "AVX2"):
        return 0
    tuning = load_tuning()
    name = "float32" if dtype == torch.float32 else "bfloat16"
    if tuning is not None and name in tuning.get("dense_kernel_rows", {}):
        return int(tuning["dense_kernel_rows"][name])
    return BUILTIN_MAX_ROWS[dtype]


def dense_matmul_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The kernel's plain-torch twin: fp32 products and sums, rounded once to x's dtype."""
    return (x.float() @ w.float().t()).to(x.dtype)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, on kiln's kernel when x has at most `max_rows` rows of weight's dtype
    (then y = kernel(x, W) + b: the fused step adds the bias the same way)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 0 or rows > max_rows or x.dtype != weight.dtype or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    y = torch.ops.kiln.dense_matmul(x.reshape(rows, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


__all__ = ["BUILTIN_MAX_ROWS", "dense_kernel_rows", "dense_linear", "dense_matmul_reference"]
