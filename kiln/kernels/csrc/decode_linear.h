// One Linear of a fused decode plan (decode_step.cpp, gemma3_decode_step.cpp): its weights and the rule
// that picks its kernel by batch size — the same rule as GGUFQuantLinearMethod.apply, so a plan computes
// exactly what the layer computes op by op.
#pragma once
#include <ATen/record_function.h>
#include <torch/extension.h>

#include <cstring>

#include "kiln_ops.h"

namespace kiln {
namespace plan {

// Each op runs under the name its torch op has, so `kiln bench latency --profile` attributes the
// fused step's time to the same op families as the plain path (a no-op unless a profiler runs).
#define KILN_PROFILED(name) RECORD_FUNCTION(name, c10::ArrayRef<const c10::IValue>{})

// kKQuant + 0/1/2: Q4_K/Q5_K/Q6_K; kQ5: the Q4 layout plus the high-bit plane `qh` (GGUF Q5_0)
enum LinearKind : int64_t { kDense = 0, kQ4 = 1, kQ8 = 2, kKQuant = 3, kQ5 = 6 };

// y = x @ W^T (+ bias) on a layer's resident dense copy, for M above its decode kernels, as
// GGUFQuantLinearMethod.apply runs it: a copy pre-packed for oneDNN (kiln.kernels.packed_linear: an opaque
// mkldnn tensor, bf16 or fp32) through mkldnn::_linear_pointwise in the copy's dtype; a plain bf16 copy under
// fp32 activations through torch's GEMM in bf16; a copy in x's dtype through torch's GEMM. Returns an
// undefined tensor when the copy cannot serve x (absent, or another dtype): the caller then dequantizes.
inline at::Tensor dense_copy_linear(const at::Tensor& x, const at::Tensor& dense, const c10::optional<at::Tensor>& bias) {
  if (!dense.defined()) return at::Tensor();
  if (dense.is_mkldnn()) {
    static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    // the bias inside the GEMM when x has the copy's dtype (one rounding, as F.linear), added after the cast
    // for fp32 x on a bf16 copy (as packed_linear)
    const at::ScalarType copy = dense.scalar_type();
    const bool inner = bias.has_value() && x.scalar_type() == copy;
    std::vector<c10::IValue> stack;
    stack.emplace_back(x.to(copy).contiguous());
    stack.emplace_back(dense);
    stack.emplace_back(inner ? c10::IValue(bias->to(copy)) : c10::IValue());
    stack.emplace_back(std::string("none"));
    stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
    stack.emplace_back(c10::IValue());  // algorithm: none
    op.callBoxed(&stack);
    at::Tensor y = stack.back().toTensor().to(x.scalar_type());
    return bias && !inner ? y + *bias : y;
  }
  if (dense.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kFloat) {
    at::Tensor y = at::linear(x.to(at::kBFloat16), dense).to(at::kFloat);
    return bias ? y + *bias : y;
  }
  if (dense.scalar_type() == x.scalar_type()) return at::linear(x, dense, bias);
  return at::Tensor();
}

// One Linear: a dense weight (kiln's dense decode kernel, dense_gemv.cpp, for M <= max_rows, torch's GEMM
// above: kiln.kernels.dense_matmul.dense_linear's rule), or packed blocks (qs, d, m) run by the block kernel for M <= max_rows,
// by the panel kernel (fp32) for M <= panel_rows, and by a dense GEMM above (on `dense` when the
// layer keeps a resident copy, else dequantized per call) — the same rule as
// GGUFQuantLinearMethod.apply.
struct LinearWeights {
  int64_t kind = kDense;
  int64_t max_rows = 0;
  int64_t panel_rows = 0;
  at::Tensor weight;  // dense weight, or qs
  at::Tensor d, m;
  at::Tensor dense;  // resident dense copy (undefined when none)
  at::Tensor qh;     // Q5 high bits (kQ5 only)
  c10::optional<at::Tensor> bias;

  at::Tensor apply(const at::Tensor& x) const {
    if (kind == kDense) {
      if (x.size(0) > max_rows || x.scalar_type() != weight.scalar_type() || !weight.is_contiguous())
        return at::linear(x, weight, bias);
      KILN_PROFILED("kiln::dense_matmul");  // as kiln.kernels.dense_matmul.dense_linear runs it
      at::Tensor y = dense_matmul(x, weight);
      return bias ? y + *bias : y;
    }
    if (kind == kQ5) return apply_q5(x);
    if (kind >= kKQuant) return apply_kquant(x);
    if (x.size(0) <= max_rows) {
      KILN_PROFILED("kiln::quant_matmul");
      at::Tensor y = quant_matmul(x, weight, d, m, kind == kQ4);
      return bias ? y + *bias : y;
    }
    if (x.size(0) <= panel_rows && x.scalar_type() == at::kFloat) {
      KILN_PROFILED("kiln::quant_matmul_panels");
      at::Tensor y = quant_matmul_panels(x, weight, d, m, kind == kQ4);
      return bias ? y + *bias : y;
    }
    at::Tensor y = dense_copy_linear(x, dense, bias);
    if (y.defined()) return y;
    KILN_PROFILED("kiln::quant_dequantize");
    return at::linear(x, quant_dequantize(weight, d, m, kind == kQ4, x.scalar_type()), bias);
  }

  // GGUF Q5_0 in the Q5 layout (quant_gemm.cpp), by the same rule as the Q4 layout.
  at::Tensor apply_q5(const at::Tensor& x) const {
    at::Tensor y;
    if (x.size(0) <= max_rows) {
      KILN_PROFILED("kiln::quant_matmul");
      y = quant_matmul_q5(x, weight, qh, d, m);
    } else if (x.size(0) <= panel_rows && x.scalar_type() == at::kFloat) {
      KILN_PROFILED("kiln::quant_matmul_panels");
      y = quant_matmul_panels_q5(x, weight, qh, d, m);
    } else if (at::Tensor yd = dense_copy_linear(x, dense, bias); yd.defined()) {
      return yd;
    } else {
      KILN_PROFILED("kiln::quant_dequantize");
      return at::linear(x, quant_dequantize_q5(weight, qh, d, m, x.scalar_type()), bias);
    }
    return bias ? y + *bias : y;
  }

  // GGUF K-quant super-blocks in `weight` (kquant_gemm.cpp), by the same rule as the block layouts.
  at::Tensor apply_kquant(const at::Tensor& x) const {
    const int64_t qtype = kind - kKQuant;
    at::Tensor y;
    if (x.size(0) <= max_rows) {
      KILN_PROFILED("kiln::kquant_matmul");
      y = kquant_matmul(x, weight, qtype);
    } else if (x.size(0) <= panel_rows && x.scalar_type() == at::kFloat) {
      KILN_PROFILED("kiln::kquant_matmul_panels");
      y = kquant_matmul_panels(x, weight, qtype);
    } else if (at::Tensor yd = dense_copy_linear(x, dense, bias); yd.defined()) {
      return yd;
    } else {
      KILN_PROFILED("kiln::kquant_dequantize");
      return at::linear(x, kquant_dequantize(weight, x.size(1), qtype, x.scalar_type()), bias);
    }
    return bias ? y + *bias : y;
  }
};

constexpr int64_t kTensorsPerLinear = 6;  // weight-or-qs, d, m, dense, bias, qh (numel 0 = absent)

// A LinearWeights from its five plan tensors and its kind / row limits (numel 0 = absent).
inline LinearWeights linear_from(const at::Tensor* w, int64_t kind, int64_t max_rows, int64_t panel_rows) {
  TORCH_CHECK((kind >= kDense && kind <= kKQuant + 2) || kind == kQ5, "decode plan: unknown linear kind ", kind);
  LinearWeights lw;
  lw.kind = kind;
  lw.max_rows = max_rows;
  lw.panel_rows = panel_rows;
  lw.weight = w[0];
  lw.d = w[1];
  lw.m = w[2];
  if (w[3].numel() > 0) lw.dense = w[3];
  if (w[4].numel() > 0) lw.bias = w[4];
  if (w[5].numel() > 0) lw.qh = w[5];
  TORCH_CHECK(kind != kQ5 || lw.qh.defined(), "decode plan: a Q5 linear needs its high bits");
  return lw;
}

// K or V rows x_in [T, Hkv, D] (rows contiguous) into slot slot_mapping[t] of cache [blocks, bs, Hkv, D].
// A cache of another float dtype (float16 under fp32 activations) gets x rounded to it first, by
// the same cast the plain path's `k.to(cache.dtype)` does, so both store identical bits.
inline void store_rows(const at::Tensor& x_in, at::Tensor& cache, const at::Tensor& slot_mapping) {
  KILN_PROFILED("aten::index_copy_");  // what the plain path's KV store is called
  const at::Tensor x = x_in.scalar_type() == cache.scalar_type() ? x_in : x_in.to(cache.scalar_type());
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2), "each token's K/V row must be contiguous");
  const int64_t T = x.size(0), row = x.size(1) * x.size(2), bytes = row * x.element_size();
  TORCH_CHECK(slot_mapping.numel() >= T, "store_rows: ", T, " rows but ", slot_mapping.numel(), " slots");
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 4 && cache.size(2) * cache.size(3) == row,
              "store_rows: the cache must be a contiguous [blocks, block_size, Hkv, D] tensor of this row size");
  const auto* slots = slot_mapping.data_ptr<int64_t>();
  auto* dst = static_cast<char*>(cache.data_ptr());
  const auto* src = static_cast<const char*>(x.data_ptr());
  const int64_t cache_slots = cache.size(0) * cache.size(1);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < cache_slots, "KV slot ", slots[t], " out of range");
    std::memcpy(dst + slots[t] * bytes, src + t * x.stride(0) * x.element_size(), bytes);
  }
}

}  // namespace plan
}  // namespace kiln
