"""Gemma 3 (text) decoder over a flat token batch, on kiln's paged KV cache.

What differs from the Llama family (kiln.models.llama), as in Hugging Face's Gemma3ForCausalLM:
- layers interleave *local* attention (a sliding window of `cfg.sliding_window` keys, the query
  included, RoPE base `rope_local_base`) and *global* attention (every earlier key, RoPE base
  `cfg.rope_theta`); `cfg.layer_windows[i]` says which (None = global);
- queries and keys are RMS-normalized per head (QK-norm) before RoPE, and scores are scaled by
  `query_pre_attn_scalar ** -0.5` instead of `head_dim ** -0.5`;
- four norms per layer: input, post-attention (before the residual add), pre-feedforward and
  post-feedforward (before the residual add);
- GeGLU MLP: gelu_tanh(gate) * up;
- embeddings are scaled by sqrt(hidden_size) (rounded to the model dtype, as HF does); the LM head
  is the tied embedding.

Norm weights are used as stored in GGUF files, which hold HF's `1 + weight` (llama.cpp's converter
adds the one); the Hugging Face loader (gemma3_checkpoint) adds it for safetensors folders.
Pure decode steps run in one native call (kiln.models.gemma3_decode_plan), bit-identical to this path.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from kiln.config import ModelConfig
from kiln.kernels import switches
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.kernels.fused import rope_qkv_
from kiln.kernels.kv_quant import KVCache
from kiln.kernels.paged_attention import paged_attention, write_kv
from kiln.layers.linear import Linear
from kiln.layers.norm import RMSNorm
from kiln.layers.rotary import RotaryEmbedding
from kiln.models import gemma3_decode_plan
from kiln.models.decode_plan import FusedStepMixin, TripStep
from kiln.models.llama import PACKED_MODULES
from kiln.models.tied_head import TiedHeadMixin


class GemmaRMSNorm(RMSNorm):
    """RMSNorm whose stored weight is the checkpoint's plus `offset` (1 for HF Gemma's `1 + w`, 0 for GGUF)."""

    def __init__(self, size: int, cfg: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__(size, cfg.rms_norm_eps, dtype, device)
        self.offset = float(cfg.extra.get("norm_offset", 0.0))

    def weight_loader(self, param_name: str, loaded: torch.Tensor, shard: str | None = None) -> None:
        super().weight_loader(param_name, loaded.float() + self.offset if self.offset else loaded, shard)


def gemma_layer_windows(num_layers: int, window: int, pattern: int = 6) -> tuple[int | None, ...]:
    """Gemma 3's layout: `pattern - 1` local (sliding-window) layers, then one global layer, repeated."""
    return tuple(None if (i + 1) % pattern == 0 else window for i in range(num_layers))


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, window: int | None, dtype: torch.dtype,
                 device) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], ["q", "k", "v"],
                               bias=cfg.attention_bias, dtype=dtype, device=device)
        self.o_proj = Linear(self.q_size, [cfg.hidden_size], dtype=dtype, device=device)
        self.q_norm = GemmaRMSNorm(self.head_dim, cfg, dtype, device)
        self.k_norm = GemmaRMSNorm(self.head_dim, cfg, dtype, device)
        self.rotary = rotary
        self.window = window
        self.scale = float(cfg.extra.get("query_pre_attn_scalar", self.head_dim)) ** -0.5

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # QK-norm over each head's vector (rows of [T * heads, D]), before RoPE; RoPE in place on the normed
        # rows by the native op (its plain-torch twin when fused ops are off), as the fused decode step does.
        # (.contiguous(): a narrow of the fused qkv is a strided view for T > 1; the native norm wants rows)
        q = self.q_norm(q.reshape(-1, self.head_dim).contiguous())
        k = self.k_norm(k.reshape(-1, self.head_dim).contiguous())
        rope_qkv_(q.view(-1, self.q_size), positions, self.rotary.cos, self.rotary.sin, self.num_heads, 0, self.head_dim)
        rope_qkv_(k.view(-1, self.kv_size), positions, self.rotary.cos, self.rotary.sin, self.num_kv_heads, 0,
                  self.head_dim)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        out = paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale, window=self.window)
        return self.o_proj(out.reshape(-1, self.q_size))


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, [i, i], ["gate", "up"], dtype=dtype, device=device)
        self.down_proj = Linear(i, [cfg.hidden_size], dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, window: int | None, dtype: torch.dtype,
                 device) -> None:
        super().__init__()
        self.self_attn = Gemma3Attention(cfg, rotary, window, dtype, device)
        self.mlp = Gemma3MLP(cfg, dtype, device)
        norm = lambda: GemmaRMSNorm(cfg.hidden_size, cfg, dtype, device)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden), kv_cache, meta)
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


class Gemma3ForCausalLM(FusedStepMixin, TiedHeadMixin, nn.Module):
    packed_modules = PACKED_MODULES
    # Reads each layer's metadata with `meta.for_layer`, so local and global layers may keep separate
    # block tables (the hybrid KV cache, kiln.core.hybrid_kv_cache_manager).
    supports_kv_groups = True
    fused_step_label = "fused native decode step (Gemma 3)"

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if len(cfg.layer_windows) != cfg.num_hidden_layers:
            raise ValueError(f"Gemma 3 needs one window entry per layer ({cfg.num_hidden_layers}), "
                             f"got {len(cfg.layer_windows)}")
        self.config, self.dtype, self.device = cfg, dtype, torch.device(device)
        max_pos = cfg.max_position_embeddings
        global_rope = RotaryEmbedding(cfg.head_dim, max_pos, cfg.rope_theta, cfg.rope_scaling, device)
        local_rope = RotaryEmbedding(cfg.head_dim, max_pos, float(cfg.extra.get("rope_local_base", 10000.0)),
                                     None, device)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        # HF rounds the scale to the embedding dtype before multiplying.
        self.embed_scale = float(torch.tensor(math.sqrt(cfg.hidden_size), dtype=dtype))
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(cfg, local_rope if w is not None else global_rope, w, dtype, device)
            for w in cfg.layer_windows)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg, dtype, device)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, [cfg.vocab_size], dtype=dtype,
                                                                    device=device)
        # Set by the GGUF loader when the tied embedding's Q8_0/Q4 blocks also serve as a natively
        # quantized LM head (262k x 640: by far the largest matrix of the 270M model).
        self.quantized_tied_head: Linear | None = None
        self.keep_gguf_blocks = False
        self.keep_dense_copies = False
        # The fused decode step (kiln.models.gemma3_decode_plan): built on the first pure decode step.
        self.fused_decode_step = switches.active().fused_decode_step
        self._decode_plan: object | None = None
        self._decode_plan_status: str | None = None  # None: not built yet
        self.lora_in_batch = False  # set by kiln.lora: a batch with LoRA rows takes the plain path

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """Flat tokens [T] at positions [T] → final hidden states [T, hidden]."""
        hidden = self.embed_tokens(input_ids) * self.embed_scale
        if self.fused_decode_step and not self.lora_in_batch and gemma3_decode_plan.can_run(meta, hidden, kv_caches):
            plan = self.decode_plan()
            if plan is not None:
                return gemma3_decode_plan.run_gemma3_plan(plan, hidden, positions, meta, kv_caches)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            hidden = layer(positions, hidden, kv_cache, meta.for_layer(i))
        return self.norm(hidden)

    def build_fused_plan(self) -> tuple[object | None, str]:
        return gemma3_decode_plan.build_gemma3_plan(self)

    def trip_stepper(self, kv_caches: list[KVCache], layer_group: tuple[int, ...] | None) -> TripStep | None:
        return gemma3_decode_plan.gemma3_trip_stepper(self, kv_caches, layer_group)

