"""Build a Llama-family model's fused decode plan (kiln.kernels.decode_step) from its layers.

The kernel side takes lists of tensors; this walks the model to collect them: per decoder layer the
two RMSNorm weights and the `LinearEntry` each linear's method contributes
(`LinearMethod.decode_plan_entry`), then the final norm and the RoPE tables. One layer the fused
step cannot run keeps the whole model on the plain path, and the reason names it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from kiln.kernels import decode_step
from kiln.kernels.decode_step import DecoderLayerWeights, LinearEntry, cache_lists
from kiln.kernels.kv_quant import KVCache
from kiln.kernels.paged_attention import native_reads
from kiln.layers.linear import Linear
from kiln.layers.linear_method import LinearMethod

if TYPE_CHECKING:
    from kiln.models.llama import LlamaForCausalLM

# One decode step of a multi-step trip (kiln.worker.multi_step): (token ids [T], positions [T], per KV group
# the slots [T] and block tables [T, W], context lengths [T] int32) → final normed hidden states [T, H].
TripStep = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor], torch.Tensor]


class FusedStepMixin:
    """`decode_plan()` and `decode_plan_status` for a model that may run pure decode steps in one native call.

    The model sets `fused_decode_step`, `_decode_plan = None` and `_decode_plan_status = None` (not built
    yet) in its constructor and implements `build_fused_plan() -> (plan or None, why not)`; the plan is
    built once, on first use, when the weights are final."""

    fused_step_label = "fused native decode step"

    def build_fused_plan(self) -> tuple[Any | None, str]:
        raise NotImplementedError

    def decode_plan(self) -> object | None:
        """The fused decode step's plan (built once), or None when this model cannot use it."""
        if self._decode_plan_status is None:
            self._decode_plan, why = self.build_fused_plan()
            fused = self._decode_plan is not None
            self._decode_plan_status = self.fused_step_label if fused else f"plain path: {why}"
        return self._decode_plan

    @property
    def decode_plan_status(self) -> str:
        """How pure decode steps run: the label, 'plain path: <why>' or 'not built yet'."""
        if self._decode_plan_status is not None:
            return self._decode_plan_status
        return "not built yet" if self.fused_decode_step else "plain path: fused decode step off for this model"

    def trip_stepper(self, kv_caches: list[KVCache], layer_group: tuple[int, ...] | None) -> TripStep | None:
        """The decode step multi-step trips run on these caches (`layer_group`: a hybrid cache's group per
        layer, None for the plain cache), or None when this model's trips cannot run on them.

        Invariant: for the steps a trip takes, the step computes exactly what `forward` computes for the
        same pure decode step (the same embedding, the same native plan, the same arguments)."""
        return None


def llama_trip_stepper(model: "LlamaForCausalLM", kv_caches: list[KVCache],
                       layer_group: tuple[int, ...] | None) -> TripStep | None:
    """A Llama-family trip step: the fused plan over the plain cache (quantized KV included, as in `forward`).
    The cache lists are taken once per trip, not per step."""
    if layer_group is not None or not kv_caches or not model.fused_decode_step:
        return None
    plan = model.decode_plan()
    if plan is None or not native_reads(model.dtype, kv_caches[0][0]):
        return None
    ks, vs, k_scales, v_scales = cache_lists(kv_caches)
    embed = model.embed_tokens

    def step(ids: torch.Tensor, positions: torch.Tensor, slots: list[torch.Tensor], block_tables: list[torch.Tensor],
             seq_lens: torch.Tensor) -> torch.Tensor:
        return plan.run(embed(ids), positions, slots[0], block_tables[0], seq_lens, ks, vs, k_scales, v_scales)

    return step


def build_decode_plan(model: "LlamaForCausalLM") -> tuple[Any | None, str]:
    """(plan, "") when the model's layers can all run in the fused step, else (None, why not)."""
    why = decode_step.unavailable_reason(model.device, model.dtype)
    if why is not None:
        return None, why
    if any(w is not None for w in model.config.layer_windows):
        return None, "sliding-window layers (the fused step attends over the whole context)"
    layers: list[DecoderLayerWeights] = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        entries: list[LinearEntry] = []
        for name, linear in (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj),
                             ("gate_up_proj", mlp.gate_up_proj), ("down_proj", mlp.down_proj)):
            entry = _entry(linear, model.dtype)
            if entry is None:
                return None, f"layer {i} {name} uses {linear.method.name}, which the fused step does not run"
            entries.append(entry)
        layers.append(DecoderLayerWeights(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                          *entries))
    first = model.layers[0].self_attn
    plan = decode_step.new_decode_plan(layers, model.norm.weight, first.rotary.cos, first.rotary.sin, first.num_heads,
                                       first.num_kv_heads, first.head_dim, model.config.rms_norm_eps, first.scale)
    return plan, ""


def _entry(linear: Linear, dtype: torch.dtype) -> LinearEntry | None:
    # A method set by hand that is no LinearMethod (tests install such stand-ins) has no entry to give.
    method = linear.method
    return method.decode_plan_entry(linear, dtype) if isinstance(method, LinearMethod) else None
