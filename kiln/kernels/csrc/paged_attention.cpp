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
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <limits>
#include <vector>

#include "fast_math.h"

namespace {

// bf16 -> fp32 is a 16-bit shift; spelled out on raw bits so the loop vectorizes.
inline void to_float(const c10::BFloat16* src, float* dst, int64_t d) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    for (int64_t i = 0; i < d; i += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
    return;
  }
#endif
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

inline void to_float(const float* src, float* dst, int64_t d) {
  std::memcpy(dst, src, d * sizeof(float));
}

inline float dot_f32(const float* a, const float* b, int64_t d) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy_f32(float p, const float* x, float* y, int64_t d) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    const __m512 pv = _mm512_set1_ps(p);
    for (int64_t i = 0; i < d; i += 16)
      _mm512_storeu_ps(y + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    return;
  }
#endif
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += p * x[i];
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

  // One task per sequence when there are enough sequences to keep every thread busy (then
  // each K/V row of Hkv*D values is read once, contiguously); otherwise one task per
  // (sequence, kv head) so a single long decode still uses all threads.
  const bool split_heads = B < 2 * at::get_num_threads();
  const int64_t heads_per_task = split_heads ? 1 : Hkv;
  const int64_t tasks = B * (Hkv / heads_per_task);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t NH = heads_per_task * G;  // query heads served by one task
    std::vector<float> qf(NH * D), acc(NH * D), scores, row(heads_per_task * D), row_max(NH), denom(NH);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = split_heads ? item / Hkv : item;
      const int64_t h0 = split_heads ? item % Hkv : 0;
      const int64_t S = sl[b];
      const int32_t* table = bt + b * max_blocks;
      const int64_t q_head0 = h0 * G;
      for (int64_t j = 0; j < NH; ++j)
        for (int64_t i = 0; i < D; ++i)
          qf[j * D + i] = static_cast<float>(qp[(b * Hq + q_head0 + j) * D + i]) * static_cast<float>(scale);
      scores.resize(NH * S);
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < S; ++t) {
        const T* krow = kp + table[t / BS] * block_stride + (t % BS) * token_stride + h0 * D;
        to_float(krow, row.data(), heads_per_task * D);
        for (int64_t j = 0; j < NH; ++j) {
          const float sc = dot_f32(qf.data() + j * D, row.data() + (j / G) * D, D);
          scores[j * S + t] = sc;
          if (sc > row_max[j]) row_max[j] = sc;
        }
      }
      for (int64_t j = 0; j < NH; ++j) {
        float* sg = scores.data() + j * S;
        float z = 0.f;
        const float m = row_max[j];
#pragma omp simd reduction(+ : z)
        for (int64_t t = 0; t < S; ++t) { sg[t] = kiln_exp(sg[t] - m); z += sg[t]; }
        denom[j] = z;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < S; ++t) {
        const T* vrow = vp + table[t / BS] * block_stride + (t % BS) * token_stride + h0 * D;
        to_float(vrow, row.data(), heads_per_task * D);
        for (int64_t j = 0; j < NH; ++j) axpy_f32(scores[j * S + t], row.data() + (j / G) * D, acc.data() + j * D, D);
      }
      for (int64_t j = 0; j < NH; ++j) {
        const float inv = 1.f / denom[j];
        T* o = op + (b * Hq + q_head0 + j) * D;
        for (int64_t i = 0; i < D; ++i) o[i] = static_cast<T>(acc[j * D + i] * inv);
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
