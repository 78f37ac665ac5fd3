// The kernels of kiln's native library that other kernels call directly (the fused decode step
// in decode_step.cpp), without a round trip through the dispatcher or Python. Each is also a
// torch op (torch.ops.kiln.<name>) with the same semantics; see the .cpp files for contracts.
#pragma once
#include <torch/extension.h>
#include <vector>

namespace kiln {

// y [M, N] = x [M, K] @ W^T for W in the packed Q4/Q8 block layout (quant_gemm.cpp).
at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                        bool is_q4);
// y [M, N] = x [M, K] @ dequantize(W)^T in fp32, W dequantized panel by panel (medium M).
at::Tensor quant_matmul_panels(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                               bool is_q4);
// W as a dense [N, K] tensor of `dtype` from the packed block layout.
at::Tensor quant_dequantize(const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, bool is_q4,
                            at::ScalarType dtype);
// The same three for W in the Q5 layout (Q4 low bits + qh int32 [N, K/32] high bits, m = -16 d).
at::Tensor quant_matmul_q5(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& qh, const at::Tensor& d,
                           const at::Tensor& m);
at::Tensor quant_matmul_panels_q5(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& qh, const at::Tensor& d,
                                  const at::Tensor& m);
at::Tensor quant_dequantize_q5(const at::Tensor& qs, const at::Tensor& qh, const at::Tensor& d, const at::Tensor& m,
                               at::ScalarType dtype);
// The same three for W in GGUF K-quant super-blocks as stored (kquant_gemm.cpp; qtype 0/1/2 = Q4_K/Q5_K/Q6_K).
at::Tensor kquant_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype);
at::Tensor kquant_matmul_panels(const at::Tensor& x, const at::Tensor& w, int64_t qtype);
at::Tensor kquant_dequantize(const at::Tensor& w, int64_t K, int64_t qtype, at::ScalarType dtype);
// y [M, N] = x [M, K] @ W^T for a dense fp32 / bf16 W, decode-sized M (dense_gemv.cpp); y in x's dtype.
at::Tensor dense_matmul(const at::Tensor& x, const at::Tensor& w);
// rms_norm(x + residual) * weight, with residual <- x + residual in place (has_residual); without a
// residual, rms_norm(x) * weight (residual untouched).
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor residual, const at::Tensor& weight, double eps,
                        bool has_residual);
// silu(gate) * up for gate_up = [gate | up] [T, 2I] (fused_ops.cpp).
at::Tensor silu_and_mul(const at::Tensor& gate_up);
// Rotate-half RoPE in place on the q and k heads of a fused qkv [T, (Hq + 2 Hkv) * D].
void rope_qkv_(at::Tensor qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim);
// One query row per sequence against the paged cache (full precision / int8 / fp8 with scales).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);
// The same over only the last `window` keys of each sequence (sliding-window layers).
at::Tensor paged_decode_attention_window(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                         int64_t window);
at::Tensor paged_decode_attention_quant(const at::Tensor& q, const at::Tensor& k_data, const at::Tensor& k_scale,
                                        const at::Tensor& v_data, const at::Tensor& v_scale,
                                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);
// Quantize K or V rows x [T, Hkv, D] into their slots of a quantized cache.
void write_kv_quant(const at::Tensor& x, at::Tensor& data, at::Tensor& scale, const at::Tensor& slot_mapping);

}  // namespace kiln
