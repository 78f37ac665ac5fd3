"""Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2) over a flat token batch.

The forward takes the tokens of every scheduled sequence laid end to end, with their
absolute positions, and reads/writes K/V through the paged cache described by an
`AttentionMetadata` — there is no [batch, seq] padding and no per-model cache object.
Parameter names follow Hugging Face (`model.layers.N.self_attn.q_proj.weight`); q/k/v
and gate/up are fused at load time via `packed_modules`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.kernels import decode_step, switches
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.kernels.fused import rope_qkv_, silu_and_mul
from kiln.kernels.kv_quant import KVCache
from kiln.kernels.paged_attention import paged_attention, write_kv
from kiln.layers.linear import Linear
from kiln.layers.norm import RMSNorm
from kiln.layers.rotary import RotaryEmbedding
from kiln.models.decode_plan import FusedStepMixin, TripStep, build_decode_plan, llama_trip_stepper
from kiln.models.tied_head import TiedHeadMixin

# checkpoint sub-module name → (fused module name, shard name)
PACKED_MODULES: dict[str, tuple[str, str]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype, device,
                 window: int | None = None) -> None:
        super().__init__()
        self.window = window  # Mistral-style sliding window (None: full causal attention)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size, [q_size, kv_size, kv_size], ["q", "k", "v"], bias=cfg.attention_bias, dtype=dtype, device=device
        )
        self.o_proj = Linear(q_size, [cfg.hidden_size], dtype=dtype, device=device)
        self.rotary = rotary
        self.q_size, self.kv_size = q_size, kv_size
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # RoPE in place on the fused projection output: one pass, no q/k copies.
        rope_qkv_(qkv, positions, self.rotary.cos, self.rotary.sin, self.num_heads, self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        # Every token's K/V is written before any attention is computed, so a sequence may
        # attend to slots another sequence of the same step just filled (shared prefix).
        write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        out = paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale, window=self.window)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, [i, i], ["gate", "up"], dtype=dtype, device=device)
        self.down_proj = Linear(i, [cfg.hidden_size], dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype, device,
                 window: int | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, dtype, device, window)
        self.mlp = LlamaMLP(cfg, dtype, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(FusedStepMixin, TiedHeadMixin, nn.Module):
    packed_modules = PACKED_MODULES

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        rotary = RotaryEmbedding(
            cfg.head_dim,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling,
            device,
            freq_factors=cfg.extra.get("rope_freq_factors"),
        )
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        windows = cfg.layer_windows or (None,) * cfg.num_hidden_layers
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rotary, dtype, device, w) for w in windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        # Set by the GGUF loader when a tied embedding in Q8_0/Q4 blocks should also serve as a
        # natively quantized LM head (the largest matrix of a small model).
        self.quantized_tied_head: Linear | None = None
        self.keep_gguf_blocks = False
        self.keep_dense_copies = False
        # The fused decode step (kiln.kernels.decode_step): built on the first pure decode step, once
        # the weights are final. The kernel switches decide it (the engine installs them before it
        # loads a model); tests and benchmarks set `fused_decode_step` per model to compare the paths.
        self.fused_decode_step = switches.active().fused_decode_step
        self._decode_plan: object | None = None
        self._decode_plan_status: str | None = None  # None: not built yet
        # Set by kiln.lora for each forward: a batch with LoRA rows takes the plain path, which adds the
        # adapters' deltas in each Linear (the fused step runs base weights only).
        self.lora_in_batch = False
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, [cfg.vocab_size], dtype=dtype, device=device)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches: list[KVCache]
    ) -> torch.Tensor:
        """Flat tokens [T] at positions [T] → final hidden states [T, hidden]."""
        hidden = self.embed_tokens(input_ids)
        if self.fused_decode_step and not self.lora_in_batch and decode_step.can_run(meta, hidden, kv_caches):
            plan = self.decode_plan()
            if plan is not None:
                return decode_step.run_decode_plan(plan, hidden, positions, meta, kv_caches)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def build_fused_plan(self) -> tuple[object | None, str]:
        return build_decode_plan(self)

    def trip_stepper(self, kv_caches: list[KVCache], layer_group: tuple[int, ...] | None) -> TripStep | None:
        return llama_trip_stepper(self, kv_caches, layer_group)

