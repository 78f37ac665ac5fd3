// Paged decode attention for CPU: one query token per sequence, K/V read in place from
// the block-table-addressed cache (no gather into a contiguous copy).
//
// Layout: q [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D];
// block_tables int32 [B, max_blocks]; seq_lens int32 [B]; out [B, Hq, D].
// Work is split over (sequence, kv head) pairs; the Hq/Hkv query heads of a GQA group
// share each K and V row load. Scores are kept in a per-task buffer (two-pass softmax in
// fp32), which for decode (seq_len <= context) is small and cache-resident.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// bf16 -> fp32 is a 16-bit shift; spelled out on raw bits so the loop vectorizes.
inline void to_float(const c10::BFloat16* src, float* dst, int64_t d) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

inline void to_float(const float* src, float* dst, int64_t d) {
  std::memcpy(dst, src, d * sizeof(float));
}

inline float dot_f32(const float* a, const float* b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                   at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t G = Hq / Hkv;
  const int64_t max_blocks = block_tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  const int64_t token_stride = Hkv * D;  // between consecutive tokens of a block
  const int64_t block_stride = BS * token_stride;

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores, row(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t S = sl[b];
      const int32_t* table = bt + b * max_blocks;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < D; ++i)
          qf[g * D + i] = static_cast<float>(qp[(b * Hq + h * G + g) * D + i]) * static_cast<float>(scale);
      scores.resize(G * S);
      std::vector<float> row_max(G, -std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < S; ++t) {
        const T* krow = kp + table[t / BS] * block_stride + (t % BS) * token_stride + h * D;
        to_float(krow, row.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float s = dot_f32(qf.data() + g * D, row.data(), D);
          scores[g * S + t] = s;
          if (s > row_max[g]) row_max[g] = s;
        }
      }
      std::vector<float> denom(G, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * S;
        float z = 0.f;
        for (int64_t t = 0; t < S; ++t) { sg[t] = std::exp(sg[t] - row_max[g]); z += sg[t]; }
        denom[g] = z;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < S; ++t) {
        const T* vrow = vp + table[t / BS] * block_stride + (t % BS) * token_stride + h * D;
        to_float(vrow, row.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * S + t];
          float* a = acc.data() + g * D;
          const float* v = row.data();
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) a[i] += p * v[i];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / denom[g];
        T* o = op + (b * Hq + h * G + g) * D;
        for (int64_t i = 0; i < D; ++i) o[i] = static_cast<T>(acc[g * D + i] * inv);
      }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head_dim mismatch");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes must match");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "int32 tables");
  auto qc = q.contiguous();
  auto bt = block_tables.contiguous();
  auto sl = seq_lens.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cache must be contiguous");
  auto out = at::empty_like(qc);
  if (q.scalar_type() == at::kFloat) {
    decode_kernel<float>(qc, k_cache, v_cache, bt, sl, scale, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode_kernel<c10::BFloat16>(qc, k_cache, v_cache, bt, sl, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(kiln, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
