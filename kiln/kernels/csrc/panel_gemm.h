// The fp32 panel micro-kernel both quantized matmuls use for medium M (batched decode): weights
// dequantized PANEL_ROWS output rows at a time into an L1-resident fp32 buffer by the caller's
// `dequant_rows`, then register-blocked FMAs over every activation row (see quant_gemm.cpp).
#pragma once
#include "quant_common.h"

#ifdef KILN_AVX512
#include <ATen/Parallel.h>

namespace kiln {

constexpr int PANEL_ROWS = 6;
constexpr int TILE_M = 4;

// The lane sums of four vectors at once: [sum a, sum b, sum c, sum d] in 13 operations instead of
// 4 x 8 for separate horizontal adds (the tile's reductions were ~20 % of its work at K = 576).
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // per 128-bit lane: [a, b, c, d] partial sums
  const __m512 abcd = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// y[i, r] = sum_k x[i, k] * w[r, k] for MR x rows and NR panel rows.
template <int MR, int NR>
inline void panel_tile(const float* x, int64_t K, const float* w, float* y, int64_t ldy) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x + i * K + k);
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = _mm512_loadu_ps(w + r * K + k);
      for (int i = 0; i < MR; ++i) acc[i][r] = _mm512_fmadd_ps(xv[i], wv, acc[i][r]);
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int i = 0; i < MR; ++i) {
    for (int r = 0; r < NR; r += 4) {
      alignas(16) float sums[4];
      _mm_store_ps(sums, hsum4(acc[i][r], r + 1 < NR ? acc[i][r + 1] : zero, r + 2 < NR ? acc[i][r + 2] : zero,
                               r + 3 < NR ? acc[i][r + 3] : zero));
      for (int j = 0; j < 4 && r + j < NR; ++j) y[i * ldy + r + j] = sums[j];
    }
  }
}

template <int NR>
void panel_rows(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N) {
  int64_t i = 0;
  for (; i + TILE_M <= M; i += TILE_M) panel_tile<TILE_M, NR>(x + i * K, K, w, y + i * N, N);
  switch (M - i) {
    case 3: panel_tile<3, NR>(x + i * K, K, w, y + i * N, N); break;
    case 2: panel_tile<2, NR>(x + i * K, K, w, y + i * N, N); break;
    case 1: panel_tile<1, NR>(x + i * K, K, w, y + i * N, N); break;
    default: break;
  }
}

// y [M, N] = x [M, K] @ W^T, W's rows [n0, n0 + nr) written as fp32 [nr][K] by dequant_rows(n0, nr, out).
template <class DequantRows>
void panel_matmul(const float* x, int64_t M, int64_t N, int64_t K, float* y, const DequantRows& dequant_rows) {
  const int64_t panels = (N + PANEL_ROWS - 1) / PANEL_ROWS;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(PANEL_ROWS * K);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * PANEL_ROWS;
      const int nr = static_cast<int>(std::min<int64_t>(PANEL_ROWS, N - n0));
      dequant_rows(n0, nr, w.data());
      switch (nr) {
        case 6: panel_rows<6>(x, M, K, w.data(), y + n0, N); break;
        case 5: panel_rows<5>(x, M, K, w.data(), y + n0, N); break;
        case 4: panel_rows<4>(x, M, K, w.data(), y + n0, N); break;
        case 3: panel_rows<3>(x, M, K, w.data(), y + n0, N); break;
        case 2: panel_rows<2>(x, M, K, w.data(), y + n0, N); break;
        default: panel_rows<1>(x, M, K, w.data(), y + n0, N); break;
      }
    }
  });
}

}  // namespace kiln
#endif
