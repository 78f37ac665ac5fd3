"""The fused decode step: a Llama-family decoder stack run for a pure decode batch in one native call.

`new_decode_plan` gathers every layer's weights (the tensors themselves, nothing is copied) into a
`torch.classes.kiln.DecodePlan` (kiln/kernels/csrc/decode_step.cpp); the model's forward then hands a
decode step's embedded tokens, positions, slots, block tables and KV caches to `run_decode_plan`
instead of walking ~15 ops per layer from Python. A speculative verification (each sequence's token
plus its drafts) runs through the plan too, each row as a decode row at its own position, so that
verifying k drafts costs little more than one decode step. This file only deals in tensors: walking a model to
collect them is kiln.models.decode_plan's job, and each layer's `LinearMethod.decode_plan_entry` says
how its weights enter the plan (a `LinearEntry`).

When it applies: CPU, the native library loaded, fp32/bf16 activations, every linear dense or in
the packed block layout without an activation `smooth` (GGUF Q4_0/Q4_1/Q8_0, kiln INT4/INT8
repacked to blocks) or in GGUF K-quant super-blocks (Q4_K/Q5_K/Q6_K), a KV cache in the model dtype or
int8/fp8, and a batch whose sequences each
decode exactly one token (or, verifying drafts, its token and drafts). Everything else (prefill chunks, AWQ /
SmoothQuant / FP8 layers, CUDA) runs the plain path, which is always available and always tested.
`KILN_FUSED_STEP=0` (or `fused_decode_step=False` on the engine) turns the fused step off.

Invariants: for a pure decode batch the plan computes exactly what the plain path computes (tested bit
for bit); for a verification each row computes what a decode step at that row's position computes, up
to the rounding of the matmul kernel its row count selects, as the plain path's prefill kernels do
(tested to 2e-4 in fp32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln.kernels import switches
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.kernels.kv_quant import KVCache, QuantizedKV
from kiln.kernels.native import load_native
from kiln.kernels.paged_attention import native_reads

DENSE, Q4, Q8 = 0, 1, 2
Q5 = 6  # the Q4 layout plus the high-bit plane (GGUF Q5_0; kiln.layers.gguf_quant)
KQUANT_KIND_BASE = 3  # K-quant super-blocks: kind 3 + kiln.kernels.kquant_matmul.KQUANT_CODES[qtype]
_EMPTY = torch.empty(0)


@dataclass(frozen=True, slots=True)
class LinearEntry:
    """One linear layer as the plan reads it.

    `tensors` = (weight or packed qs, d, m, dense copy, bias, Q5 high bits), empty tensors where a piece is absent;
    `kind` DENSE / Q4 / Q8 / a K-quant kind (`kquant_entry`); `max_rows` / `panel_rows`: the largest batch the block / panel kernel takes
    (DENSE: `max_rows` bounds kiln's dense decode kernel, kiln.kernels.dense_matmul)
    (above them the plan uses the dense copy or dequantizes, exactly as the layer's own `apply` does).
    """

    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    kind: int
    max_rows: int
    panel_rows: int


def dense_entry(weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int = 0) -> LinearEntry:
    """A dense weight: kiln's dense kernel for M <= `max_rows` (then + bias), torch's GEMM above — as
    kiln.kernels.dense_matmul.dense_linear runs it on the plain path."""
    return LinearEntry((weight, _EMPTY, _EMPTY, _EMPTY, _or_empty(bias), _EMPTY), DENSE, max_rows, 0)


def block_entry(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor, dense: torch.Tensor | None,
                bias: torch.Tensor | None, is_q4: bool, max_rows: int, panel_rows: int) -> LinearEntry:
    """Weights in the packed block layout of kiln.kernels.quant_matmul (Q4: with mins `m`; Q8: `m` empty)."""
    return LinearEntry((qs, d, m, _or_empty(dense), _or_empty(bias), _EMPTY), Q4 if is_q4 else Q8, max_rows, panel_rows)


def q5_entry(qs: torch.Tensor, qh: torch.Tensor, d: torch.Tensor, m: torch.Tensor, dense: torch.Tensor | None,
             bias: torch.Tensor | None, max_rows: int, panel_rows: int) -> LinearEntry:
    """GGUF Q5_0 weights in the Q5 layout: the Q4 layout's qs / d / m (m = -16 d) plus the high bits `qh`."""
    return LinearEntry((qs, d, m, _or_empty(dense), _or_empty(bias), qh), Q5, max_rows, panel_rows)


def kquant_entry(w: torch.Tensor, qtype: str, dense: torch.Tensor | None, bias: torch.Tensor | None,
                 max_rows: int, panel_rows: int) -> LinearEntry:
    """Weights in GGUF K-quant super-blocks as stored (kiln.kernels.kquant_matmul): `w` uint8 [N, row bytes]."""
    from kiln.kernels.kquant_matmul import KQUANT_CODES

    return LinearEntry((w, _EMPTY, _EMPTY, _or_empty(dense), _or_empty(bias), _EMPTY), KQUANT_KIND_BASE + KQUANT_CODES[qtype],
                       max_rows, panel_rows)


def _or_empty(t: torch.Tensor | None) -> torch.Tensor:
    return t if t is not None else _EMPTY


@dataclass(frozen=True, slots=True)
class DecoderLayerWeights:
    """One decoder layer: its two RMSNorm weights and its four linears, in the plan's order."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: LinearEntry
    o: LinearEntry
    gate_up: LinearEntry
    down: LinearEntry


def fused_step_enabled() -> bool:
    return switches.active().fused_decode_step


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why no plan can run for a model on `device` in `dtype` (None: one can, if its layers allow)."""
    if not fused_step_enabled():
        return "disabled (--no-fused-decode-step / KILN_FUSED_STEP=0)"
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return f"needs a CPU model in float32/bfloat16 (this one: {device.type}, {dtype})"
    if not load_native():
        return "native kernel library not loaded"
    return None


def new_decode_plan(layers: Sequence[DecoderLayerWeights], final_norm: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, rms_norm_eps: float,
                    scale: float) -> Any:
    """The native plan over these tensors (call only when `unavailable_reason` is None)."""
    tensors: list[torch.Tensor] = []
    kinds: list[int] = []
    max_rows: list[int] = []
    panel_rows: list[int] = []
    for layer in layers:
        tensors += [layer.input_norm, layer.post_attention_norm]
        for entry in (layer.qkv, layer.o, layer.gate_up, layer.down):
            tensors += entry.tensors
            kinds.append(entry.kind)
            max_rows.append(entry.max_rows)
            panel_rows.append(entry.panel_rows)
    return torch.classes.kiln.DecodePlan(tensors, kinds, max_rows, panel_rows, final_norm, cos, sin,
                                         num_heads, num_kv_heads, head_dim, rms_norm_eps, scale)


# Rows of a speculative verification the plan takes (each sequence's token + drafts, all sequences):
# beyond this the batch is better served by the prefill kernels of the plain path.
MAX_VERIFY_ROWS = 32


def can_run(meta: AttentionMetadata, hidden: torch.Tensor, kv_caches: list[KVCache]) -> bool:
    """Whether this step is one the plan runs: every sequence decodes one token, or (a speculative
    verification) its token and drafts, in caches it can read."""
    if not kv_caches or meta.groups is not None:
        return False
    pure_decode = meta.num_decodes == meta.num_seqs and hidden.shape[0] == meta.num_seqs
    if not pure_decode and not (meta.verification and hidden.shape[0] <= MAX_VERIFY_ROWS):
        return False
    return native_reads(hidden.dtype, kv_caches[0][0])


def cache_lists(kv_caches: list[KVCache]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
                                                     list[torch.Tensor]]:
    """The plan's per-layer K, V, K-scale and V-scale lists (empty scales for a full-precision cache)."""
    if type(kv_caches[0][0]) is QuantizedKV:
        return ([c[0].data for c in kv_caches], [c[1].data for c in kv_caches],
                [c[0].scale for c in kv_caches], [c[1].scale for c in kv_caches])
    empties = [_EMPTY] * len(kv_caches)
    return [c[0] for c in kv_caches], [c[1] for c in kv_caches], empties, empties


def run_decode_plan(plan: Any, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                    kv_caches: list[KVCache]) -> torch.Tensor:
    """The final normed hidden states [T, H] of a pure decode step (see the module docstring)."""
    ks, vs, k_scales, v_scales = cache_lists(kv_caches)
    block_tables, seq_lens = meta.block_tables, meta.seq_lens_tensor
    if hidden.shape[0] != meta.num_seqs:
        # A verification: row j of a sequence is a decode row at its own position, seeing its own
        # sequence's blocks up to itself (each layer stores every row's K/V before attending), so
        # causality within the drafts comes from per-row context lengths.
        counts = torch.tensor([b - a for a, b in zip(meta.query_start_loc, meta.query_start_loc[1:])])
        block_tables = block_tables.repeat_interleave(counts, dim=0)
        seq_lens = (positions + 1).to(torch.int32)
    return plan.run(hidden, positions, meta.slot_mapping, block_tables, seq_lens, ks, vs, k_scales, v_scales)
