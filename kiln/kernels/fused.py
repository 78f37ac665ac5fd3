"""Fused decode-step ops with their plain-torch twins.

`use_fused()` decides once per call site: the native op runs on CPU tensors of fp32/bf16
when the kernel library is loaded and KILN_FUSED is not "0"; otherwise the reference runs.
The references define the semantics (rounding points follow Hugging Face Llama).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from kiln.kernels import switches
from kiln.kernels.native import load_native

_FAST_DTYPES = (torch.float32, torch.bfloat16)


def use_fused(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in _FAST_DTYPES
        and switches.active().fused_ops
        and load_native()
    )


# ---- references ----------------------------------------------------------------------------
def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, x


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_qkv_reference(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    num_heads: int, num_kv_heads: int, head_dim: int,
) -> None:
    """Rotate the q and k heads of qkv [T, (Hq + 2Hkv) * D] in place (rotate-half layout)."""
    t = qkv.shape[0]
    qk = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(t, num_heads + num_kv_heads, head_dim)
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    half = head_dim // 2
    x1, x2 = qk[..., :half].float(), qk[..., half:].float()
    qk.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(qkv.dtype))


# ---- dispatchers -------------------------------------------------------------------------------
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); residual=None means no add."""
    if x.dim() == 2 and use_fused(x) and x.is_contiguous() and (residual is None or residual.is_contiguous()):
        if residual is None:
            return torch.ops.kiln.add_rms_norm(x, x, weight, eps, False), x
        # the native op adds x into `residual` in place (the caller's residual stream)
        return torch.ops.kiln.add_rms_norm(x, residual, weight, eps, True), residual
    return add_rms_norm_reference(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the native op for fp32 (an AVX-512 loop since 2026-11-30: 2.3 vs 5.7 us at 1 row
    of 1536, 18 vs 49 us at 64, 123 vs 267 us at 512 rows on 2 threads, AMD EPYC), torch's two ops for
    bf16, whose native loop does not vectorize (benchmarks/fused_kernels.py: 11.5 vs 5.8 us at 1 row).
    The fused decode step makes the same choice (decode_step.cpp), so both paths stay bit-identical."""
    if gate_up.dtype == torch.float32 and gate_up.dim() == 2 and gate_up.is_contiguous() and use_fused(gate_up):
        return torch.ops.kiln.silu_and_mul(gate_up)
    return silu_and_mul_reference(gate_up)


def rope_qkv_(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    num_heads: int, num_kv_heads: int, head_dim: int,
) -> None:
    if use_fused(qkv) and qkv.is_contiguous():
        torch.ops.kiln.rope_qkv_(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim)
    else:
        rope_qkv_reference(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim)
