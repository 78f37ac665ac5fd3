"""kiln's INT layout → the GPTQ, AutoAWQ GEMM and compressed-tensors tensors of one Linear (the inverse
of each reader's `convert`), plus the config.json `quantization_config` block each format declares.

Used to write checkpoints other tools load, and by the tests to build foreign folders from kiln's own
quantized weights. Inputs: codes uint8 [N, K], scale [N, G], zero uint8 [N, G] (kiln.quantization.primitives).
"""

from __future__ import annotations

import torch

from kiln.quantization.foreign.layout import IntLayout
from kiln.quantization.foreign.packing import awq_order, pack_int32


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[0] % multiple
    return torch.nn.functional.pad(t, (0, 0, 0, extra)) if extra else t


def _unsort(codes: torch.Tensor, layout: IntLayout, perm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in the checkpoint's column order, g_idx): kiln's group-sorted column j is the checkpoint's
    column perm[j] (identity without `perm`), in group j // group_size — an act-order checkpoint."""
    k = codes.shape[1]
    glen = k if layout.group_size == -1 else layout.group_size
    groups = (torch.arange(k) // glen).to(torch.int32)
    if perm is None:
        return codes, groups
    out, g_idx = torch.empty_like(codes), torch.empty_like(groups)
    out[:, perm] = codes
    g_idx[perm] = groups
    return out, g_idx


def gptq_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, layout: IntLayout,
                 v1: bool = True, desc_act: bool = False, perm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """qweight/qzeros/scales(/g_idx) as AutoGPTQ ("gptq", v1: zeros stored minus one) or GPTQModel v2 writes them;
    with `perm` (desc_act) the columns are written in act order (see `_unsort`)."""
    per = 32 // layout.bits
    codes, g_idx = _unsort(codes, layout, perm)
    if v1 and bool((zero == 0).any()):
        # v1 stores zero - 1 in b bits: 0 would wrap to 2**b - 1 and read back as 2**b, another weight
        raise ValueError("a zero point of 0 has no GPTQ v1 form; write checkpoint_format gptq_v2")
    stored_zero = (zero.to(torch.int16) - (1 if v1 else 0)).to(torch.uint8)
    out = {"qweight": pack_int32(_pad_rows(codes.t(), per), layout.bits, dim=0),
           "qzeros": pack_int32(_pad_rows(stored_zero, per).t().contiguous(), layout.bits, dim=1),
           "scales": scale.t().to(torch.float16).contiguous()}
    if desc_act or perm is not None:
        out["g_idx"] = g_idx
    return out


def awq_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, layout: IntLayout) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM qweight [K, N/8] / qzeros [G, N/8] (interleaved nibbles) / scales [G, N]."""
    if layout.bits != 4 or layout.sym:
        raise ValueError("AutoAWQ's GEMM format holds 4-bit asymmetric weights")
    return {"qweight": pack_int32(awq_order(codes.t().contiguous()), 4, dim=1),
            "qzeros": pack_int32(awq_order(zero.t().contiguous()), 4, dim=1),
            "scales": scale.t().to(torch.float16).contiguous()}


def compressed_tensors_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                               layout: IntLayout, scale_dtype: torch.dtype = torch.float16,
                               perm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """pack-quantized weight_packed / weight_scale / weight_shape (/ weight_zero_point when asymmetric;
    / weight_g_idx with `perm`: actorder "group", columns in act order, see `_unsort`)."""
    n, k = codes.shape
    codes, g_idx = _unsort(codes, layout, perm)
    out = {"weight_packed": pack_int32(codes, layout.bits, dim=1), "weight_scale": scale.to(scale_dtype).contiguous(),
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not layout.sym:
        out["weight_zero_point"] = pack_int32(_pad_rows(zero, 32 // layout.bits), layout.bits, dim=0)
    if perm is not None:
        out["weight_g_idx"] = g_idx
    return out


def gptq_config(layout: IntLayout, v1: bool = True, desc_act: bool = False) -> dict:
    return {"quant_method": "gptq", "bits": layout.bits, "group_size": layout.group_size, "desc_act": desc_act,
            "sym": layout.sym, "checkpoint_format": "gptq" if v1 else "gptq_v2"}


def awq_config(layout: IntLayout) -> dict:
    return {"quant_method": "awq", "bits": layout.bits, "group_size": layout.group_size, "zero_point": True,
            "version": "gemm"}


def compressed_tensors_config(layout: IntLayout, ignore: list[str], actorder: str | None = None) -> dict:
    weights = {"num_bits": layout.bits, "type": "int", "symmetric": layout.sym,
               "strategy": "channel" if layout.group_size == -1 else "group",
               "group_size": None if layout.group_size == -1 else layout.group_size,
               "dynamic": False, "actorder": actorder, "observer": "minmax", "observer_kwargs": {}, "block_structure": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {}}
