// The decoder stack of a pure decode step in one native call (kiln.kernels.decode_step).
//
// A decode step of a small model is hundreds of small ops; run one by one from Python each costs
// its dispatch and interpreter time (38 % of a SmolLM2-135M step on this CPU, stop-10 profile).
// `DecodePlan` holds every layer's weights (the same tensors the modules own: nothing is copied)
// and runs norm → QKV → RoPE → KV store → paged attention → o_proj → norm → gate_up → SiLU·gate →
// down for all layers from C++, calling the kernels of kiln_ops.h directly.
//
// Invariant: `run` computes exactly what LlamaForCausalLM.forward computes op by op for a batch
// whose sequences all decode one token (same kernels, same order, same rounding points), so its
// output is bit-identical to the Python path; tests/test_decode_step.py checks that for dense,
// block-quantized and quantized-KV models.
#include <ATen/record_function.h>
#include <torch/custom_class.h>
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "decode_linear.h"
#include "kiln_ops.h"

namespace kiln {
namespace {

using plan::kTensorsPerLinear;
using plan::LinearWeights;
using plan::store_rows;

struct LayerWeights {
  at::Tensor input_norm, post_attention_norm;
  LinearWeights qkv, o, gate_up, down;
};

constexpr int64_t kTensorsPerLayer = 2 + 4 * kTensorsPerLinear;

// SiLU·gate as the Python path runs it (kiln/kernels/fused.py: silu_and_mul): the native op for fp32,
// torch's two ops for bf16.
at::Tensor silu_gate(const at::Tensor& gate_up) {
  KILN_PROFILED("kiln::silu_and_mul");
  if (gate_up.scalar_type() == at::kFloat && gate_up.is_contiguous()) return silu_and_mul(gate_up);
  const auto parts = gate_up.chunk(2, -1);
  return at::silu(parts[0]) * parts[1];
}

}  // namespace

// Built once per loaded model; `run` is called every pure decode step.
struct DecodePlan : torch::CustomClassHolder {
  std::vector<LayerWeights> layers;
  at::Tensor final_norm, cos, sin;
  int64_t num_heads, num_kv_heads, head_dim;
  double eps, scale;

  // tensors: kTensorsPerLayer per layer — input_norm, post_attention_norm, then qkv, o, gate_up, down
  // as (weight-or-qs, d, m, dense, bias, qh); kinds/max_rows/panel_rows: one per linear in the same order.
  DecodePlan(std::vector<at::Tensor> tensors, std::vector<int64_t> kinds, std::vector<int64_t> max_rows,
             std::vector<int64_t> panel_rows, at::Tensor final_norm_, at::Tensor cos_, at::Tensor sin_, int64_t num_heads_, int64_t num_kv_heads_,
             int64_t head_dim_, double eps_, double scale_)
      : final_norm(std::move(final_norm_)), cos(std::move(cos_)), sin(std::move(sin_)), num_heads(num_heads_),
        num_kv_heads(num_kv_heads_), head_dim(head_dim_), eps(eps_), scale(scale_) {
    const int64_t n_layers = static_cast<int64_t>(tensors.size()) / kTensorsPerLayer;
    TORCH_CHECK(static_cast<int64_t>(tensors.size()) == n_layers * kTensorsPerLayer && n_layers > 0,
                "DecodePlan: expected ", kTensorsPerLayer, " tensors per layer, got ", tensors.size());
    TORCH_CHECK(static_cast<int64_t>(kinds.size()) == 4 * n_layers && max_rows.size() == kinds.size() &&
                    panel_rows.size() == kinds.size(),
                "DecodePlan: one kind, max_rows and panel_rows per linear");
    for (int64_t i = 0; i < n_layers; ++i) {
      const at::Tensor* t = tensors.data() + i * kTensorsPerLayer;
      LayerWeights L;
      L.input_norm = t[0];
      L.post_attention_norm = t[1];
      LinearWeights* linears[4] = {&L.qkv, &L.o, &L.gate_up, &L.down};
      for (int j = 0; j < 4; ++j) {
        *linears[j] = plan::linear_from(t + 2 + j * kTensorsPerLinear, kinds[i * 4 + j], max_rows[i * 4 + j],
                                        panel_rows[i * 4 + j]);
      }
      layers.push_back(std::move(L));
    }
  }

  // hidden [T, H] (embedded tokens, one per sequence); positions int64 [T]; slot_mapping int64 [T];
  // block_tables int32 [T, max_blocks]; seq_lens int32 [T]; per layer a K and a V cache, with their
  // fp32 scale tensors for a quantized cache (numel 0 for a full-precision one). → final normed
  // hidden states [T, H].
  at::Tensor run(at::Tensor hidden, at::Tensor positions, at::Tensor slot_mapping, at::Tensor block_tables,
                 at::Tensor seq_lens, std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches,
                 std::vector<at::Tensor> k_scales, std::vector<at::Tensor> v_scales) {
    const size_t n_layers = layers.size();
    TORCH_CHECK(k_caches.size() == n_layers && v_caches.size() == n_layers && k_scales.size() == n_layers &&
                    v_scales.size() == n_layers,
                "DecodePlan.run: one K/V cache (and scale) per layer");
    TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be a contiguous [T, H] tensor");
    TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(), "int64 slot_mapping");
    const int64_t T = hidden.size(0);
    const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
    // Layer 0's residual is the embedded input itself; later layers update it in place (as the plain path does).
    at::Tensor h = hidden, residual = hidden;
    for (size_t i = 0; i < n_layers; ++i) {
      const LayerWeights& L = layers[i];
      at::Tensor normed;
      {
        KILN_PROFILED("kiln::add_rms_norm");
        normed = add_rms_norm(h, residual, L.input_norm, eps, i > 0);
      }
      at::Tensor qkv = L.qkv.apply(normed);
      {
        KILN_PROFILED("kiln::rope_qkv_");
        rope_qkv_(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim);
      }
      const at::Tensor q = qkv.narrow(1, 0, q_size).view({T, num_heads, head_dim});
      const at::Tensor k = qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads, head_dim});
      const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads, head_dim});
      at::Tensor attn;
      if (k_scales[i].numel() > 0) {
        {
          KILN_PROFILED("kiln::write_kv_quant");
          write_kv_quant(k, k_caches[i], k_scales[i], slot_mapping);
          write_kv_quant(v, v_caches[i], v_scales[i], slot_mapping);
        }
        KILN_PROFILED("kiln::paged_decode_attention");
        attn = paged_decode_attention_quant(q, k_caches[i], k_scales[i], v_caches[i], v_scales[i], block_tables,
                                            seq_lens, scale);
      } else {
        store_rows(k, k_caches[i], slot_mapping);
        store_rows(v, v_caches[i], slot_mapping);
        KILN_PROFILED("kiln::paged_decode_attention");
        attn = paged_decode_attention(q, k_caches[i], v_caches[i], block_tables, seq_lens, scale);
      }
      at::Tensor o = L.o.apply(attn.reshape({T, q_size}));
      {
        KILN_PROFILED("kiln::add_rms_norm");
        normed = add_rms_norm(o, residual, L.post_attention_norm, eps, true);
      }
      h = L.down.apply(silu_gate(L.gate_up.apply(normed)));
    }
    KILN_PROFILED("kiln::add_rms_norm");
    return add_rms_norm(h, residual, final_norm, eps, true);
  }
};

}  // namespace kiln

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.class_<kiln::DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                       at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, int64_t, double, double>())
      .def("run", &kiln::DecodePlan::run);
}
