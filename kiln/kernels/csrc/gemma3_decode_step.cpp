// Gemma 3's decoder stack for a pure decode step in one native call (kiln.models.gemma3_decode_plan).
//
// The Llama-shaped plan (decode_step.cpp) does not fit Gemma 3: four norms per layer, QK-norm before
// RoPE, GeGLU, interleaved sliding-window and global layers with their own RoPE tables, and — under the
// hybrid KV cache — separate block tables and slots for local and global layers. Run op by op from
// Python a Gemma 3 270M decode step spends about half its time in dispatch and interpreter overhead
// (`kiln bench latency --profile`), which this plan removes.
//
// Invariant: `run` calls the same kernels in the same order with the same layouts as
// Gemma3ForCausalLM.forward does for a batch whose sequences all decode one token (native RMSNorm,
// native RoPE on the normed q and k, torch's tanh-GELU on the gate's view), so its output is
// bit-identical to the plain path; tests/models/test_gemma3_decode_plan.py checks that.
#include <torch/custom_class.h>
#include <torch/extension.h>

#include <vector>

#include "decode_linear.h"
#include "kiln_ops.h"

namespace kiln {
namespace {

using plan::kTensorsPerLinear;
using plan::LinearWeights;

struct Gemma3Layer {
  at::Tensor input_norm, q_norm, k_norm, post_attention_norm, pre_feedforward_norm, post_feedforward_norm;
  LinearWeights qkv, o, gate_up, down;
  int64_t window = 0;  // 0: global attention
  int64_t group = 0;   // which KV group's block tables / slots this layer reads and writes
  bool local_rope = false;
};

constexpr int64_t kNormsPerLayer = 6;
constexpr int64_t kTensorsPerLayer = kNormsPerLayer + 4 * kTensorsPerLinear;

// GemmaRMSNorm (an RMSNorm without residual) as kiln.kernels.fused.add_rms_norm runs it natively.
at::Tensor norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  KILN_PROFILED("kiln::add_rms_norm");
  return add_rms_norm(x, x, w, eps, false);
}

}  // namespace

struct Gemma3DecodePlan : torch::CustomClassHolder {
  std::vector<Gemma3Layer> layers;
  at::Tensor final_norm, global_cos, global_sin, local_cos, local_sin;
  int64_t num_heads, num_kv_heads, head_dim;
  double eps, scale;

  // tensors: per layer the six norms (input, q, k, post-attention, pre-feedforward, post-feedforward), then
  // qkv, o, gate_up, down as (weight-or-qs, d, m, dense, bias, qh); kinds / max_rows / panel_rows: one per
  // linear; windows / groups: one per layer (window 0 = global; group = KV group index).
  Gemma3DecodePlan(std::vector<at::Tensor> tensors, std::vector<int64_t> kinds, std::vector<int64_t> max_rows,
                   std::vector<int64_t> panel_rows, std::vector<int64_t> windows, std::vector<int64_t> groups,
                   at::Tensor final_norm_, at::Tensor global_cos_, at::Tensor global_sin_, at::Tensor local_cos_,
                   at::Tensor local_sin_, int64_t num_heads_, int64_t num_kv_heads_, int64_t head_dim_, double eps_,
                   double scale_)
      : final_norm(std::move(final_norm_)), global_cos(std::move(global_cos_)), global_sin(std::move(global_sin_)),
        local_cos(std::move(local_cos_)), local_sin(std::move(local_sin_)), num_heads(num_heads_),
        num_kv_heads(num_kv_heads_), head_dim(head_dim_), eps(eps_), scale(scale_) {
    const int64_t n_layers = static_cast<int64_t>(windows.size());
    TORCH_CHECK(n_layers > 0 && static_cast<int64_t>(tensors.size()) == n_layers * kTensorsPerLayer,
                "Gemma3DecodePlan: expected ", kTensorsPerLayer, " tensors per layer, got ", tensors.size());
    TORCH_CHECK(static_cast<int64_t>(kinds.size()) == 4 * n_layers && max_rows.size() == kinds.size() &&
                    panel_rows.size() == kinds.size() && groups.size() == windows.size(),
                "Gemma3DecodePlan: one kind / max_rows / panel_rows per linear, one window and group per layer");
    for (int64_t i = 0; i < n_layers; ++i) {
      const at::Tensor* t = tensors.data() + i * kTensorsPerLayer;
      Gemma3Layer L;
      L.input_norm = t[0];
      L.q_norm = t[1];
      L.k_norm = t[2];
      L.post_attention_norm = t[3];
      L.pre_feedforward_norm = t[4];
      L.post_feedforward_norm = t[5];
      LinearWeights* linears[4] = {&L.qkv, &L.o, &L.gate_up, &L.down};
      for (int j = 0; j < 4; ++j) {
        *linears[j] = plan::linear_from(t + kNormsPerLayer + j * kTensorsPerLinear, kinds[i * 4 + j],
                                        max_rows[i * 4 + j], panel_rows[i * 4 + j]);
      }
      L.window = windows[i];
      L.group = groups[i];
      L.local_rope = windows[i] > 0;
      layers.push_back(std::move(L));
    }
  }

  // hidden [T, H]: the scaled embeddings, one row per sequence; positions int64 [T]; per KV group a
  // slot_mapping int64 [T], block_tables int32 [T, max_blocks] and seq_lens int32 [T]; per layer a float K
  // and V cache. → final normed hidden states [T, H].
  at::Tensor run(at::Tensor hidden, at::Tensor positions, std::vector<at::Tensor> slot_mappings,
                 std::vector<at::Tensor> block_tables, std::vector<at::Tensor> seq_lens,
                 std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches) {
    const size_t n_layers = layers.size();
    TORCH_CHECK(k_caches.size() == n_layers && v_caches.size() == n_layers, "Gemma3DecodePlan.run: one K/V cache per layer");
    TORCH_CHECK(slot_mappings.size() == block_tables.size() && seq_lens.size() == block_tables.size(),
                "Gemma3DecodePlan.run: one slot mapping, block table and seq_lens per KV group");
    TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be a contiguous [T, H] tensor");
    const int64_t T = hidden.size(0);
    const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
    // the longest context per group decides, as in paged_attention, whether a window cuts anything off
    std::vector<int64_t> longest(seq_lens.size());
    for (size_t g = 0; g < seq_lens.size(); ++g) {
      TORCH_CHECK(slot_mappings[g].scalar_type() == at::kLong && slot_mappings[g].is_contiguous(), "int64 slot_mapping");
      longest[g] = seq_lens[g].numel() ? seq_lens[g].max().item<int64_t>() : 0;
    }
    at::Tensor h = hidden;
    for (size_t i = 0; i < n_layers; ++i) {
      const Gemma3Layer& L = layers[i];
      TORCH_CHECK(L.group >= 0 && L.group < static_cast<int64_t>(block_tables.size()), "layer ", i, ": no KV group ", L.group);
      const at::Tensor& cos = L.local_rope ? local_cos : global_cos;
      const at::Tensor& sin = L.local_rope ? local_sin : global_sin;
      at::Tensor qkv = L.qkv.apply(norm(h, L.input_norm, eps));
      // QK-norm per head (rows of [T * heads, D]), then RoPE in place on each
      at::Tensor q = norm(qkv.narrow(1, 0, q_size).reshape({-1, head_dim}).contiguous(), L.q_norm, eps);
      at::Tensor k = norm(qkv.narrow(1, q_size, kv_size).reshape({-1, head_dim}).contiguous(), L.k_norm, eps);
      {
        KILN_PROFILED("kiln::rope_qkv_");
        rope_qkv_(q.view({T, q_size}), positions, cos, sin, num_heads, 0, head_dim);
        rope_qkv_(k.view({T, kv_size}), positions, cos, sin, num_kv_heads, 0, head_dim);
      }
      const at::Tensor q3 = q.view({T, num_heads, head_dim});
      const at::Tensor k3 = k.view({T, num_kv_heads, head_dim});
      const at::Tensor v3 = qkv.narrow(1, q_size + kv_size, kv_size).reshape({-1, num_kv_heads, head_dim});
      plan::store_rows(k3, k_caches[i], slot_mappings[L.group]);
      plan::store_rows(v3, v_caches[i], slot_mappings[L.group]);
      at::Tensor attn;
      {
        KILN_PROFILED("kiln::paged_decode_attention");
        if (L.window > 0 && longest[L.group] > L.window) {
          attn = paged_decode_attention_window(q3, k_caches[i], v_caches[i], block_tables[L.group], seq_lens[L.group],
                                               scale, L.window);
        } else {
          attn = paged_decode_attention(q3, k_caches[i], v_caches[i], block_tables[L.group], seq_lens[L.group], scale);
        }
      }
      at::Tensor o = L.o.apply(attn.reshape({-1, q_size}));
      h = h + norm(o, L.post_attention_norm, eps);
      at::Tensor gate_up = L.gate_up.apply(norm(h, L.pre_feedforward_norm, eps));
      const auto parts = gate_up.chunk(2, -1);
      at::Tensor mlp = L.down.apply(at::gelu(parts[0], "tanh") * parts[1]);
      h = h + norm(mlp, L.post_feedforward_norm, eps);
    }
    return norm(h, final_norm, eps);
  }
};

}  // namespace kiln

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.class_<kiln::Gemma3DecodePlan>("Gemma3DecodePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                       std::vector<int64_t>, std::vector<int64_t>, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                       at::Tensor, int64_t, int64_t, int64_t, double, double>())
      .def("run", &kiln::Gemma3DecodePlan::run);
}
