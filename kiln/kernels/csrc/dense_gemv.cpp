// Dense matmul for decode-sized batches: y [M, N] = x [M, K] @ W^T for W [N, K] in fp32 or bf16, M small.
//
// Why: torch's CPU GEMM (MKL sgemv for fp32, oneDNN for bf16) streams a decode step's weights from DRAM at
// 12-18 GB/s on this machine (2 threads), well below what one pass over them can reach; a dense model's
// single-stream decode is bound by exactly that pass. Here each thread walks its share of W's rows once,
// NR rows at a time, and multiplies every loaded weight vector with all M activation rows (up to 4 per
// pass) while it sits in registers, so M rows cost little more than one.
//
// Arithmetic (the contract the plain-torch twin checks, kiln.kernels.dense_matmul.dense_matmul_reference):
// each product is float(w) * float(x) in fp32 (bf16 -> fp32 is exact), accumulated in fp32 with a fixed
// order per output element (SIMD lanes over K, then a lane reduction), rounded once to x's dtype. With bf16
// weights and activations on an AVX512-BF16 CPU the products go through vdpbf16ps (exact products, a lane
// summing two at a time; denormal inputs count as zero), still in a fixed order. That order
// depends on K and the SIMD width only — never on M, on which rows share a tile or on the thread split — so
// a row's output is bit-identical alone or in a batch (speculative verification relies on it).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "quant_common.h"

namespace kiln {
namespace {

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

#if defined(KILN_AVX512)
constexpr int64_t kLanes = 16;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload_x(const float* p, int64_t n) {
  return n == kLanes ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
}
inline Vec vload_w(const float* p, int64_t n) { return vload_x(p, n); }
inline Vec vload_w(const c10::BFloat16* p, int64_t n) {
  const __m256i h = n == kLanes ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                : _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) {
  // a shuffle tree of fixed shape for a given build (the same for every tile, so rows stay batch-invariant)
  return _mm512_reduce_add_ps(v);
}
#elif defined(KILN_AVX2)
constexpr int64_t kLanes = 8;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline __m256i tail_mask(int64_t n) {
  alignas(32) int32_t m[8];
  for (int i = 0; i < 8; ++i) m[i] = i < n ? -1 : 0;
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
}
inline Vec vload_x(const float* p, int64_t n) {
  return n == kLanes ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(n));
}
inline Vec vload_w(const float* p, int64_t n) { return vload_x(p, n); }
inline Vec vload_w(const c10::BFloat16* p, int64_t n) {
  __m128i h;
  if (n == kLanes) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(t, p, n * sizeof(uint16_t));
    h = _mm_load_si128(reinterpret_cast<const __m128i*>(t));
  }
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int w = 4; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}
#endif

#if defined(KILN_AVX512) || defined(KILN_AVX2)
// NR weight rows x MC activation rows: out[r * MC + i] = dot(w row r, x row i).
template <int NR, int MC, typename W>
inline void tile(const W* w, const float* x, int64_t K, float* out) {
  Vec acc[NR][MC];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) acc[r][i] = vzero();
  for (int64_t k = 0; k < K; k += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, K - k);
    Vec wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = vload_w(w + r * K + k, n);
    for (int i = 0; i < MC; ++i) {
      const Vec xv = vload_x(x + i * K + k, n);
      for (int r = 0; r < NR; ++r) acc[r][i] = vfma(wv[r], xv, acc[r][i]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) out[r * MC + i] = vsum(acc[r][i]);
}

#if defined(KILN_AVX512) && defined(__AVX512BF16__)
#define KILN_DPBF16 1
// bf16 weights and bf16 activations on AVX512-BF16: vdpbf16ps multiplies 32 pairs per instruction (each
// product exact, a lane adding its two products to its fp32 sum), a fixed order as above.
template <int NR, int MC>
inline void tile(const c10::BFloat16* w, const c10::BFloat16* x, int64_t K, float* out) {
  __m512 acc[NR][MC];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const int64_t n = std::min<int64_t>(32, K - k);
    const __mmask32 mask = n == 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1);
    __m512bh wv[NR];
    for (int r = 0; r < NR; ++r) {
      // the tile two ahead (rows are contiguous): short rows give the hardware prefetcher too little to ramp
      // (an address past the array for the last tiles: computed as an integer, a prefetch never faults)
      _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(w + r * K + k) +
                                                 2 * NR * K * sizeof(c10::BFloat16)), _MM_HINT_T0);
      wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K + k);
    }
    for (int i = 0; i < MC; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * K + k);
      for (int r = 0; r < NR; ++r) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], wv[r], xv);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) out[r * MC + i] = vsum(acc[r][i]);
}
#endif

// mc (1-4) activation rows: `tile`'s overload for the weight and activation types (bf16 x bf16 on
// AVX512-BF16, else fp32 activations with fp32 or bf16 weights).
template <int NR, typename W, typename X>
inline void tile_rows(int64_t mc, const W* w, const X* x, int64_t K, float* out) {
  switch (mc) {
    case 1: tile<NR, 1>(w, x, K, out); break;
    case 2: tile<NR, 2>(w, x, K, out); break;
    case 3: tile<NR, 3>(w, x, K, out); break;
    default: tile<NR, 4>(w, x, K, out); break;
  }
}
#else
// The portable loop, in the SIMD paths' order for a width of one lane: a plain running sum.
template <typename W>
inline float row_dot(const W* w, const float* x, int64_t K) {
  float s = 0.f;
  for (int64_t k = 0; k < K; ++k) s += to_float(w[k]) * x[k];
  return s;
}
#endif

template <typename X, typename W, typename T>
void dense_matmul_impl(const X* x, const W* w, T* y, int64_t M, int64_t N, int64_t K) {
#if defined(KILN_AVX512)
  constexpr int NR = 4;
#elif defined(KILN_AVX2)
  constexpr int NR = 2;  // 16 ymm registers: 2 x 4 accumulators, 2 weight vectors, 1 activation vector
#endif
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
#if defined(KILN_AVX512) || defined(KILN_AVX2)
    float tmp[NR * 4];
    int64_t n = begin;
    for (; n < end; n += NR) {
      const int64_t nr = std::min<int64_t>(NR, end - n);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mc = std::min<int64_t>(4, M - m0);
        if (nr == NR) {
          tile_rows<NR>(mc, w + n * K, x + m0 * K, K, tmp);
        } else {  // the last rows of a share: one-row tiles of the same arithmetic
          for (int64_t r = 0; r < nr; ++r) tile_rows<1>(mc, w + (n + r) * K, x + m0 * K, K, tmp + r * mc);
        }
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t i = 0; i < mc; ++i) y[(m0 + i) * N + n + r] = static_cast<T>(tmp[r * mc + i]);
      }
    }
#else
    for (int64_t n = begin; n < end; ++n)
      for (int64_t i = 0; i < M; ++i) y[i * N + n] = static_cast<T>(row_dot(w + n * K, x + i * K, K));
#endif
  });
}

}  // namespace

at::Tensor dense_matmul(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "dense_matmul: x [M, K] and w [N, K] with the same K, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "dense_matmul: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "dense_matmul: w must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), "dense_matmul: w must be contiguous");
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
#ifdef KILN_DPBF16
  if (x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16) {  // vdpbf16ps on both as they are
    const at::Tensor xc = x.contiguous();
    dense_matmul_impl(xc.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), M, N, K);
    return y;
  }
#endif
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // bf16 -> fp32 is exact
  const float* xp = xf.data_ptr<float>();
  if (w.scalar_type() == at::kFloat) {
    if (x.scalar_type() == at::kFloat)
      dense_matmul_impl(xp, w.data_ptr<float>(), y.data_ptr<float>(), M, N, K);
    else
      dense_matmul_impl(xp, w.data_ptr<float>(), y.data_ptr<c10::BFloat16>(), M, N, K);
  } else {
    if (x.scalar_type() == at::kFloat)
      dense_matmul_impl(xp, w.data_ptr<c10::BFloat16>(), y.data_ptr<float>(), M, N, K);
    else
      dense_matmul_impl(xp, w.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), M, N, K);
  }
  return y;
}

}  // namespace kiln

TORCH_LIBRARY_FRAGMENT(kiln, m) { m.def("dense_matmul(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("dense_matmul", &kiln::dense_matmul); }
