"""The fused decode step: a Llama-family decoder stack run for a pure decode batch in one native call.

`build_decode_plan(model)` gathers every layer's weights (the module tensors themselves, nothing is
copied) into a `torch.classes.kiln.DecodePlan` (kiln/kernels/csrc/decode_step.cpp); the model's
forward then hands a decode step's embedded tokens, positions, slots, block tables and KV caches to
`DecodePlan.run` instead of walking ~15 ops per layer from Python.

When it applies: CPU, the native library loaded, fp32/bf16 activations, every linear dense or in
the packed block layout without an activation `smooth` (GGUF Q4_0/Q4_1/Q8_0, kiln INT4/INT8
repacked to blocks), a KV cache in the model dtype or int8/fp8, and a batch whose sequences each
decode exactly one token. Everything else (prefill chunks, speculative verification, AWQ /
SmoothQuant / FP8 layers, CUDA) runs the plain path, which is always available and always tested.
`KILN_FUSED_STEP=0` (or `fused_decode_step=False` on the engine) turns the fused step off.

Invariant (tested bit for bit): the plan computes exactly what the plain path computes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kiln.kernels import switches
from kiln.kernels.kv_quant import QuantizedKV
from kiln.kernels.native import load_native
from kiln.kernels.paged_attention import native_reads
from kiln.layers.attention_metadata import AttentionMetadata
from kiln.layers.linear import DenseLinearMethod, Linear

if TYPE_CHECKING:
    from kiln.models.llama import KVCache, LlamaForCausalLM

DENSE, Q4, Q8 = 0, 1, 2
_EMPTY = torch.empty(0)


def fused_step_enabled() -> bool:
    return switches.active().fused_decode_step


def _linear_entry(layer: Linear, dtype: torch.dtype) -> tuple[list[torch.Tensor], int, int, int] | None:
    """(weight-or-qs, d, m, dense, bias), kind, max_rows, panel_rows for one Linear; None when the plan
    cannot run it."""
    from kiln.layers.gguf_quant import GGUFQuantLinearMethod
    from kiln.layers.quant_linear import IntWeightLinearMethod

    bias = layer.bias if layer.bias is not None else _EMPTY
    method = layer.method
    if isinstance(method, DenseLinearMethod):
        return [layer.weight, _EMPTY, _EMPTY, _EMPTY, bias], DENSE, 0, 0
    blocks = method
    if isinstance(method, IntWeightLinearMethod):
        if method.smooth or method.blocks is None:
            return None
        blocks = method.blocks
    if not isinstance(blocks, GGUFQuantLinearMethod):
        return None
    dense = getattr(layer, "dense_weight", None)
    tensors = [layer.qs, layer.d, layer.m, dense if dense is not None else _EMPTY, bias]
    return tensors, Q4 if blocks.is_q4 else Q8, blocks.block_max_rows(dtype), blocks.panel_max_rows(dtype)


def build_decode_plan(model: "LlamaForCausalLM") -> tuple[Any | None, str]:
    """(plan, "") when the model's layers can all run in the fused step, else (None, why not)."""
    if not fused_step_enabled():
        return None, "disabled (--no-fused-decode-step / KILN_FUSED_STEP=0)"
    if model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16):
        return None, f"needs a CPU model in float32/bfloat16 (this one: {model.device.type}, {model.dtype})"
    if not load_native():
        return None, "native kernel library not loaded"
    tensors: list[torch.Tensor] = []
    kinds: list[int] = []
    max_rows: list[int] = []
    panel_rows: list[int] = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        tensors += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        for name, linear in (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj),
                             ("gate_up_proj", mlp.gate_up_proj), ("down_proj", mlp.down_proj)):
            entry = _linear_entry(linear, model.dtype)
            if entry is None:
                return None, f"layer {i} {name} uses {linear.method.name}, which the fused step does not run"
            tensors += entry[0]
            kinds.append(entry[1])
            max_rows.append(entry[2])
            panel_rows.append(entry[3])
    first = model.layers[0].self_attn
    plan = torch.classes.kiln.DecodePlan(
        tensors, kinds, max_rows, panel_rows, model.norm.weight, first.rotary.cos, first.rotary.sin,
        first.num_heads, first.num_kv_heads, first.head_dim, model.config.rms_norm_eps, first.scale,
    )
    return plan, ""


def can_run(meta: AttentionMetadata, hidden: torch.Tensor, kv_caches: "list[KVCache]") -> bool:
    """Whether this step is one the plan runs: every sequence decodes one token, caches it can read."""
    if meta.num_decodes != meta.num_seqs or hidden.shape[0] != meta.num_seqs or not kv_caches:
        return False
    return native_reads(hidden.dtype, kv_caches[0][0])


def run_decode_plan(plan: Any, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                    kv_caches: "list[KVCache]") -> torch.Tensor:
    """The final normed hidden states [T, H] of a pure decode step (see the module docstring)."""
    if type(kv_caches[0][0]) is QuantizedKV:
        ks = [c[0].data for c in kv_caches]
        vs = [c[1].data for c in kv_caches]
        k_scales = [c[0].scale for c in kv_caches]
        v_scales = [c[1].scale for c in kv_caches]
    else:
        ks = [c[0] for c in kv_caches]
        vs = [c[1] for c in kv_caches]
        k_scales = v_scales = [_EMPTY] * len(kv_caches)
    return plan.run(hidden, positions, meta.slot_mapping, meta.block_tables, meta.seq_lens_tensor,
                    ks, vs, k_scales, v_scales)
