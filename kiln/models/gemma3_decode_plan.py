"""Gemma 3's fused decode step: build the native plan (csrc/gemma3_decode_step.cpp) and run it.

The plan takes a pure decode step — every sequence decodes one token — over float KV caches, plain or
hybrid (local and global layers in separate KV groups, each with its own slots and block tables). Other
steps (prefill chunks, speculative verification, int8/fp8 caches, LoRA rows) keep the plain path.
Invariant: the plan's output is bit-identical to Gemma3ForCausalLM's plain path for the steps it takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kiln.kernels import decode_step
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.kernels.kv_quant import KVCache, QuantizedKV
from kiln.kernels.paged_attention import native_reads
from kiln.kernels.switches import active as active_switches
from kiln.layers.linear_method import LinearMethod

if TYPE_CHECKING:
    from kiln.models.decode_plan import TripStep
    from kiln.models.gemma3 import Gemma3ForCausalLM


def build_gemma3_plan(model: "Gemma3ForCausalLM") -> tuple[Any | None, str]:
    """(plan, "") when every layer can run in the fused step, else (None, why not)."""
    why = decode_step.unavailable_reason(model.device, model.dtype)
    if why is not None:
        return None, why
    if not active_switches().fused_ops:
        return None, "fused ops off (--no-fused-ops): the plan runs the native norms and RoPE"
    tensors: list[torch.Tensor] = []
    kinds: list[int] = []
    max_rows: list[int] = []
    panel_rows: list[int] = []
    windows: list[int] = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        tensors += [layer.input_layernorm.weight, attn.q_norm.weight, attn.k_norm.weight,
                    layer.post_attention_layernorm.weight, layer.pre_feedforward_layernorm.weight,
                    layer.post_feedforward_layernorm.weight]
        for name, linear in (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj),
                             ("gate_up_proj", mlp.gate_up_proj), ("down_proj", mlp.down_proj)):
            method = linear.method
            if not isinstance(method, LinearMethod):
                return None, f"layer {i} {name} uses {method!r}, which the fused step does not run"
            entry = method.decode_plan_entry(linear, model.dtype)
            if entry is None:
                return None, f"layer {i} {name} uses {method.name}, which the fused step does not run"
            tensors += entry.tensors
            kinds.append(entry.kind)
            max_rows.append(entry.max_rows)
            panel_rows.append(entry.panel_rows)
        windows.append(attn.window or 0)
    return GroupedPlan(tensors, kinds, max_rows, panel_rows, windows, model), ""


class GroupedPlan:
    """The native plan per layer-group layout: a plain cache (every layer in group 0) and a hybrid one (the
    metadata's `layer_group`) index their KV groups differently; each layout's plan is built on first use
    (over the same tensors: nothing is copied)."""

    def __init__(self, tensors: list[torch.Tensor], kinds: list[int], max_rows: list[int], panel_rows: list[int],
                 windows: list[int], model: "Gemma3ForCausalLM") -> None:
        self.args = (tensors, kinds, max_rows, panel_rows, windows)
        self.model = model
        self.by_layout: dict[tuple[int, ...], Any] = {}

    def for_layout(self, layer_group: tuple[int, ...]) -> Any:
        if layer_group not in self.by_layout:
            tensors, kinds, max_rows, panel_rows, windows = self.args
            m = self.model
            local = next((layer.self_attn.rotary for layer in m.layers if layer.self_attn.window), None)
            global_ = next((layer.self_attn.rotary for layer in m.layers if not layer.self_attn.window), None)
            local, global_ = local or global_, global_ or local
            first = m.layers[0].self_attn
            self.by_layout[layer_group] = torch.classes.kiln.Gemma3DecodePlan(
                tensors, kinds, max_rows, panel_rows, windows, list(layer_group), m.norm.weight, global_.cos,
                global_.sin, local.cos, local.sin, first.num_heads, first.num_kv_heads, first.head_dim,
                m.config.rms_norm_eps, first.scale)
        return self.by_layout[layer_group]


def can_run(meta: AttentionMetadata, hidden: torch.Tensor, kv_caches: list[KVCache]) -> bool:
    """Whether the plan takes this step: pure decode (one row per sequence) over float caches it reads."""
    if not kv_caches or meta.verification or type(kv_caches[0][0]) is QuantizedKV:
        return False
    if hidden.shape[0] != meta.num_seqs or meta.num_decodes != meta.num_seqs:
        return False
    return native_reads(hidden.dtype, kv_caches[0][0])


def run_gemma3_plan(plan: GroupedPlan, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                    kv_caches: list[KVCache]) -> torch.Tensor:
    """The final normed hidden states [T, H] of a pure decode step."""
    if meta.groups is None or meta.layer_group is None:
        groups, layout = [meta], tuple([0] * len(kv_caches))
    else:
        groups, layout = meta.groups, tuple(meta.layer_group)
    native = plan.for_layout(layout)
    return native.run(hidden, positions, [g.slot_mapping for g in groups], [g.block_tables for g in groups],
                      [g.seq_lens_tensor for g in groups], [c[0] for c in kv_caches], [c[1] for c in kv_caches])


def gemma3_trip_stepper(model: "Gemma3ForCausalLM", kv_caches: list[KVCache],
                        layer_group: tuple[int, ...] | None) -> "TripStep | None":
    """A Gemma 3 trip step (kiln.worker.multi_step): the scaled embedding and the plan of this cache's layer
    layout, as `forward` runs them for a pure decode step; float caches only, like `can_run`. Every KV group
    sees the same context lengths (a sequence's length does not depend on the group)."""
    if not kv_caches or not model.fused_decode_step or type(kv_caches[0][0]) is QuantizedKV:
        return None
    if not native_reads(model.dtype, kv_caches[0][0]):
        return None
    plan = model.decode_plan()
    if plan is None:
        return None
    layout = tuple(layer_group) if layer_group is not None else tuple([0] * len(kv_caches))
    native = plan.for_layout(layout)
    ks, vs = [c[0] for c in kv_caches], [c[1] for c in kv_caches]
    num_groups = max(layout) + 1
    embed, scale = model.embed_tokens, model.embed_scale

    def step(ids: torch.Tensor, positions: torch.Tensor, slots: list[torch.Tensor], block_tables: list[torch.Tensor],
             seq_lens: torch.Tensor) -> torch.Tensor:
        return native.run(embed(ids) * scale, positions, slots, block_tables, [seq_lens] * num_groups, ks, vs)

    return step
