"""Shape-only ("fake") implementations of kiln's native ops, so `torch.compile` can trace through them.

torch.compile runs a function on fake tensors first to learn the graph; a custom op without a fake
implementation breaks the graph there (or fails under `fullgraph=True`). Each function below states
only the output's shape, dtype and device, exactly as the C++ op returns it (the .cpp files are the
contract); in-place ops declare their mutation in the schema and return nothing.
Registered once, by `kiln.kernels.native.load_native`, right after the library loads.
"""

from __future__ import annotations

import torch

_REGISTERED = False


def register_fake_impls() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    fake = torch.library.register_fake

    @fake("kiln::dense_matmul")
    def _dense_matmul(x, w):
        return x.new_empty((x.shape[0], w.shape[0]))

    @fake("kiln::quant_matmul")
    def _quant_matmul(x, qs, d, m, is_q4):
        return x.new_empty((x.shape[0], d.shape[0]))

    @fake("kiln::quant_matmul_panels")
    def _quant_matmul_panels(x, qs, d, m, is_q4):
        return x.new_empty((x.shape[0], d.shape[0]))

    @fake("kiln::quant_dequantize")
    def _quant_dequantize(qs, d, m, is_q4, dtype):
        return d.new_empty((d.shape[0], d.shape[1] * 32), dtype=dtype)

    @fake("kiln::quant_matmul_q5")
    def _quant_matmul_q5(x, qs, qh, d, m):
        return x.new_empty((x.shape[0], d.shape[0]))

    @fake("kiln::quant_matmul_panels_q5")
    def _quant_matmul_panels_q5(x, qs, qh, d, m):
        return x.new_empty((x.shape[0], d.shape[0]))

    @fake("kiln::quant_dequantize_q5")
    def _quant_dequantize_q5(qs, qh, d, m, dtype):
        return d.new_empty((d.shape[0], d.shape[1] * 32), dtype=dtype)

    @fake("kiln::kquant_matmul")
    def _kquant_matmul(x, w, qtype):
        return x.new_empty((x.shape[0], w.shape[0]))

    @fake("kiln::kquant_matmul_panels")
    def _kquant_matmul_panels(x, w, qtype):
        return x.new_empty((x.shape[0], w.shape[0]))

    @fake("kiln::kquant_dequantize")
    def _kquant_dequantize(w, k, qtype, dtype):
        return w.new_empty((w.shape[0], k), dtype=dtype)

    @fake("kiln::add_rms_norm")
    def _add_rms_norm(x, residual, weight, eps, has_residual):
        return torch.empty_like(x)

    @fake("kiln::silu_and_mul")
    def _silu_and_mul(gate_up):
        return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))

    @fake("kiln::rope_qkv_")
    def _rope_qkv(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim):
        return None

    @fake("kiln::paged_decode_attention")
    def _paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @fake("kiln::paged_decode_attention_window")
    def _paged_decode_attention_window(q, k_cache, v_cache, block_tables, seq_lens, scale, window):
        return torch.empty_like(q)

    @fake("kiln::paged_decode_attention_quant")
    def _paged_decode_attention_quant(q, k_data, k_scale, v_data, v_scale, block_tables, seq_lens, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @fake("kiln::paged_prefill_attention")
    def _paged_prefill_attention(q, k_cache, v_cache, block_table, seq_len, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @fake("kiln::write_kv_quant")
    def _write_kv_quant(x, data, scale, slot_mapping):
        return None
