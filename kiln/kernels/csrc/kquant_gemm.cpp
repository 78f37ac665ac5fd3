// Weight-only matmul on GGUF K-quant super-blocks (Q4_K, Q5_K, Q6_K) read as stored in the file.
//
// W is uint8 [N, K / 256 * block bytes]: each row is the file's own super-blocks of 256 weights
// (kiln.kernels.kquant_matmul documents the byte layouts). Per 32-weight sub-block j of a super-block:
//   Q4_K, Q5_K: w = D_j * q - M_j,  D_j = d * sc_j, M_j = dmin * m_j  (6-bit sc/m, 4- or 5-bit q)
//   Q6_K:       w = d * (sc_l * (q - 32)), sc_l the signed 8-bit scale of each 16 weights (l = 2j, 2j+1)
// All products named here are exact in fp32 (at most 23 significant bits), so the value of a weight
// is the same however they are grouped; the dequantization below equals the `gguf` library's bit
// for bit (tests/test_kquant_kernels.py).
//
// Decode (small M) runs the same arithmetic as quant_gemm.cpp's block kernel: activation rows
// quantized per 32 to int16 (quant_common.h), an exact integer dot per sub-block (Q6_K's scale
// folded into the int16 weights: |sc * (q - 32)| <= 4096), scaled by D_j * dx and minus M_j * dx *
// sum(xq) for the mins. Medium M (fp32) dequantizes 6-row panels into L1 and runs panel_gemm.h.
// The plain-torch twin (kquant_matmul.py) does exactly this arithmetic.
#include <torch/extension.h>

#include "kiln_ops.h"
#include "panel_gemm.h"
#include "quant_common.h"
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <cstring>

namespace kiln {
namespace {

constexpr int64_t QKK = 256;  // weights per super-block
constexpr int64_t SUB = QKK / QK;  // 32-weight sub-blocks per super-block
enum KType : int64_t { kQ4K = 0, kQ5K = 1, kQ6K = 2 };

constexpr int64_t block_bytes(int64_t t) { return t == kQ4K ? 144 : t == kQ5K ? 176 : 210; }

// The eight 6-bit (scale, min) pairs of a Q4_K / Q5_K super-block's 12 scale bytes, as two words of
// eight bytes each (byte j: sub-block j), unpacked a 32-bit word (four sub-blocks) at a time.
inline void k4_scales(const uint8_t* s, uint64_t& sc, uint64_t& mn) {
  uint32_t w[3];
  std::memcpy(w, s, 12);
  const uint32_t low6 = 0x3F3F3F3Fu, low4 = 0x0F0F0F0Fu, top2 = 0x03030303u;
  sc = (w[0] & low6) | static_cast<uint64_t>((w[2] & low4) | (((w[0] >> 6) & top2) << 4)) << 32;
  mn = (w[1] & low6) | static_cast<uint64_t>(((w[2] >> 4) & low4) | (((w[1] >> 6) & top2) << 4)) << 32;
}

// Per-sub-block float scale D[j] and min M[j] of one super-block (Q6_K: D = d, M = 0; its 16-weight
// scales are folded into the integer weights instead).
template <int T>
inline void super_scales(const uint8_t* sb, float* D, float* M) {
  if constexpr (T == kQ6K) {
    const float d = half_to_float(reinterpret_cast<const c10::Half*>(sb + 208));
    for (int j = 0; j < SUB; ++j) D[j] = d, M[j] = 0.f;
  } else {
    const float d = half_to_float(reinterpret_cast<const c10::Half*>(sb));
    const float dmin = half_to_float(reinterpret_cast<const c10::Half*>(sb + 2));
    uint64_t sc, mn;
    k4_scales(sb + 4, sc, mn);
    for (int j = 0; j < SUB; ++j)
      D[j] = d * static_cast<float>((sc >> (8 * j)) & 0xFF), M[j] = dmin * static_cast<float>((mn >> (8 * j)) & 0xFF);
  }
}

// The 32 integer weights of sub-block j (Q6_K: times their 8-bit scale), in element order.
template <int T>
inline void unpack_scalar(const uint8_t* sb, int j, int16_t* q) {
  if constexpr (T == kQ6K) {
    const uint8_t* ql = sb + 64 * (j / 4) + 32 * (j % 4 & 1);
    const uint8_t* qh = sb + 128 + 32 * (j / 4);
    const int lshift = 4 * (j % 4 >> 1), hshift = 2 * (j % 4);
    const auto* sc = reinterpret_cast<const int8_t*>(sb + 192);
    for (int l = 0; l < QK; ++l) {
      const int v = (((ql[l] >> lshift) & 0x0F) | (((qh[l] >> hshift) & 3) << 4)) - 32;
      q[l] = static_cast<int16_t>(v * sc[2 * j + l / 16]);
    }
  } else {
    const uint8_t* qs = sb + (T == kQ4K ? 16 : 48) + 32 * (j / 2);
    const int shift = 4 * (j & 1);
    for (int l = 0; l < QK; ++l) {
      int v = (qs[l] >> shift) & 0x0F;
      if constexpr (T == kQ5K) v |= ((sb[16 + l] >> j) & 1) << 4;
      q[l] = static_cast<int16_t>(v);
    }
  }
}

// Row n of W against activation row i, portable.
template <int T>
float row_dot_scalar(const uint8_t* row, const QuantizedRows& xr, int64_t i, int64_t K) {
  const int64_t nb = K / QK;
  float acc = 0.f;
  int16_t q[QK];
  float D[SUB], M[SUB];
  for (int64_t s = 0; s < K / QKK; ++s) {
    const uint8_t* sb = row + s * block_bytes(T);
    super_scales<T>(sb, D, M);
    for (int j = 0; j < SUB; ++j) {
      const int64_t b = s * SUB + j;
      unpack_scalar<T>(sb, j, q);
      const int16_t* xq = xr.q.data() + i * K + b * QK;
      int32_t isum = 0;
      for (int l = 0; l < QK; ++l) isum += static_cast<int32_t>(q[l]) * xq[l];
      acc += D[j] * xr.dx[i * nb + b] * static_cast<float>(isum);
      acc -= M[j] * xr.sx[i * nb + b];
    }
  }
  return acc;
}

// One row of W as fp32 (the gguf library's values: D * q - M with D * q exact, one rounding).
template <int T>
void dequant_row_scalar(const uint8_t* row, int64_t K, float* out) {
  int16_t q[QK];
  float D[SUB], M[SUB];
  for (int64_t s = 0; s < K / QKK; ++s) {
    const uint8_t* sb = row + s * block_bytes(T);
    super_scales<T>(sb, D, M);
    for (int j = 0; j < SUB; ++j) {
      unpack_scalar<T>(sb, j, q);
      for (int l = 0; l < QK; ++l) out[s * QKK + j * QK + l] = D[j] * static_cast<float>(q[l]) - M[j];
    }
  }
}

#ifdef KILN_AVX512
// D (and M) of a super-block's eight sub-blocks as fp32 lanes (see super_scales), from vector ops.
template <int T>
inline void super_scales8(const uint8_t* sb, __m256& D, __m256& M) {
  if constexpr (T == kQ6K) {
    D = _mm256_set1_ps(half_to_float(reinterpret_cast<const c10::Half*>(sb + 208)));
    M = _mm256_setzero_ps();
  } else {
    uint64_t sc, mn;
    k4_scales(sb + 4, sc, mn);
    const __m256 d = _mm256_set1_ps(half_to_float(reinterpret_cast<const c10::Half*>(sb)));
    const __m256 dmin = _mm256_set1_ps(half_to_float(reinterpret_cast<const c10::Half*>(sb + 2)));
    D = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(sc)))));
    M = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(mn)))));
  }
}

// Two sub-blocks that share their quant bytes, as 32 int16 weights each (Q6_K: times their scales):
// pair p is sub-blocks (2p, 2p+1) for Q4_K / Q5_K (low and high nibbles of one 32-byte chunk) and
// (h*4 + t, h*4 + t + 2) for Q6_K (h = p / 2, t = p % 2: low and high nibbles of one 32-byte run of
// a half's 64 ql bytes, with bits 2t and 2t + 4 of its 32 qh bytes). Unpacking a pair loads its
// bytes once; the high bits and scales are read from the super-block, in L1 by then.
template <int T>
inline void unpack_pair512(const uint8_t* sb, int p, __m512i& w0, __m512i& w1, int& j0, int& j1) {
  const __m512i nib = _mm512_set1_epi16(0x0F);
  if constexpr (T == kQ6K) {
    const int h = p / 2, t = p % 2;
    j0 = 4 * h + t, j1 = j0 + 2;
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 64 * h + 32 * t)));
    const __m512i hv = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 128 + 32 * h)));
    const __m512i three = _mm512_set1_epi16(3), off = _mm512_set1_epi16(32);
    const __m512i h0 = _mm512_and_si512(_mm512_srl_epi16(hv, _mm_cvtsi32_si128(2 * t)), three);
    const __m512i h1 = _mm512_and_si512(_mm512_srl_epi16(hv, _mm_cvtsi32_si128(2 * t + 4)), three);
    const __m512i q0 = _mm512_sub_epi16(_mm512_or_si512(_mm512_and_si512(v, nib), _mm512_slli_epi16(h0, 4)), off);
    const __m512i q1 = _mm512_sub_epi16(_mm512_or_si512(_mm512_srli_epi16(v, 4), _mm512_slli_epi16(h1, 4)), off);
    const auto* sc = reinterpret_cast<const int8_t*>(sb + 192);
    // lanes 0-15 take the scale of weights 0-15 of the sub-block, lanes 16-31 that of weights 16-31
    w0 = _mm512_mullo_epi16(q0, _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16(sc[2 * j0]),
                                                        _mm512_set1_epi16(sc[2 * j0 + 1])));
    w1 = _mm512_mullo_epi16(q1, _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16(sc[2 * j1]),
                                                        _mm512_set1_epi16(sc[2 * j1 + 1])));
  } else {
    j0 = 2 * p, j1 = 2 * p + 1;
    const __m512i v = _mm512_cvtepu8_epi16(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + (T == kQ4K ? 16 : 48) + 32 * p)));
    w0 = _mm512_and_si512(v, nib);
    w1 = _mm512_srli_epi16(v, 4);  // zero-extended bytes: the shift leaves the high nibble
    if constexpr (T == kQ5K) {
      const __m512i hv = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 16)));
      const __m512i one = _mm512_set1_epi16(1);
      w0 = _mm512_or_si512(w0, _mm512_slli_epi16(_mm512_and_si512(_mm512_srl_epi16(hv, _mm_cvtsi32_si128(j0)), one), 4));
      w1 = _mm512_or_si512(w1, _mm512_slli_epi16(_mm512_and_si512(_mm512_srl_epi16(hv, _mm_cvtsi32_si128(j1)), one), 4));
    }
  }
}

constexpr int64_t PREFETCH_ROWS = 8;  // as in quant_gemm.cpp: the tile NR rows ahead, then a farther L2 one
constexpr int64_t PREFETCH_ROWS_L2 = 32;

// NR output rows x MC activation rows, accumulated lane-wise across all sub-blocks (one horizontal
// add per output at the end). Per super-block: the NR x MC combined scales D_j * dx into `sc`, and
// the mins term M_j * dx * sum(xq) as one 8-lane FMA into the same accumulators.
template <int T, int NR, int MC>
void tile_dot_avx512(const uint8_t* w, int64_t row_bytes, const QuantizedRows& xr, int64_t m0, int64_t K,
                     float* out /* [NR][MC] */) {
  const int64_t nb = K / QK;
  __m512 acc[NR][MC];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) acc[r][i] = _mm512_setzero_ps();
  alignas(64) float sc[NR][MC][SUB];
  for (int64_t s = 0; s < K / QKK; ++s) {
    for (int r = 0; r < NR; ++r) {
      const uint8_t* sb = w + r * row_bytes + s * block_bytes(T);
      for (int64_t line = 0; line < block_bytes(T); line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(sb + PREFETCH_ROWS * row_bytes + line), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(sb + PREFETCH_ROWS_L2 * row_bytes + line), _MM_HINT_T1);
      }
      __m256 D, M;
      super_scales8<T>(sb, D, M);
      for (int i = 0; i < MC; ++i) {
        const __m256 dx = _mm256_loadu_ps(xr.dx.data() + (m0 + i) * nb + s * SUB);
        _mm256_store_ps(sc[r][i], _mm256_mul_ps(D, dx));
        if constexpr (T != kQ6K) {
          const __m256 sx = _mm256_loadu_ps(xr.sx.data() + (m0 + i) * nb + s * SUB);
          // lanes 8-15 of both operands zeroed: the 8 mins land in lanes 0-7 of the accumulator
          acc[r][i] = _mm512_fnmadd_ps(_mm512_maskz_mov_ps(0x00FF, _mm512_castps256_ps512(M)),
                                       _mm512_maskz_mov_ps(0x00FF, _mm512_castps256_ps512(sx)), acc[r][i]);
        }
      }
    }
    for (int p = 0; p < SUB / 2; ++p) {
      __m512i w0[NR], w1[NR];
      int j0 = 0, j1 = 0;
      for (int r = 0; r < NR; ++r) unpack_pair512<T>(w + r * row_bytes + s * block_bytes(T), p, w0[r], w1[r], j0, j1);
      for (int i = 0; i < MC; ++i) {
        const int16_t* xq = xr.q.data() + (m0 + i) * K + s * QKK;
        const __m512i x0 = _mm512_loadu_si512(xq + j0 * QK), x1 = _mm512_loadu_si512(xq + j1 * QK);
        for (int r = 0; r < NR; ++r) {
          acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(w0[r], x0)), _mm512_set1_ps(sc[r][i][j0]),
                                      acc[r][i]);
          acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(w1[r], x1)), _mm512_set1_ps(sc[r][i][j1]),
                                      acc[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) out[r * MC + i] = _mm512_reduce_add_ps(acc[r][i]);
}

// 32 weights D * q - M as fp32: fma rounds once and D * q is exact, so this is the library's (D * q) - M.
inline void store_sub_block(__m512i q, float D, float M, float* o) {
  const __m512 dj = _mm512_set1_ps(D), mj = _mm512_set1_ps(-M);
  _mm512_storeu_ps(o, _mm512_fmadd_ps(dj, _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(q))), mj));
  _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(dj, _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(q, 1))), mj));
}

// Rows [n0, n0 + nr) of W as fp32 (the panel kernel's L1 buffer, and the dequantize op).
template <int T>
void dequant_rows_avx512(const uint8_t* w, int64_t row_bytes, int64_t K, int64_t n0, int nr, float* out) {
  for (int r = 0; r < nr; ++r) {
    const uint8_t* row = w + (n0 + r) * row_bytes;
    for (int64_t s = 0; s < K / QKK; ++s) {
      const uint8_t* sb = row + s * block_bytes(T);
      alignas(32) float D[SUB], M[SUB];
      super_scales<T>(sb, D, M);
      float* o = out + r * K + s * QKK;
      for (int p = 0; p < SUB / 2; ++p) {
        __m512i w0, w1;
        int j0 = 0, j1 = 0;
        unpack_pair512<T>(sb, p, w0, w1, j0, j1);
        store_sub_block(w0, D[j0], M[j0], o + j0 * QK);
        store_sub_block(w1, D[j1], M[j1], o + j1 * QK);
      }
    }
  }
}
#endif

#ifdef KILN_AVX2
// The AVX2 tile: a sub-block is two 16 x int16 halves whose vpmaddwd results are added in int32
// (exact) before one conversion, as in quant_gemm.cpp's AVX2 path; the mins are added per output at the end.
template <int T>
inline void unpack256(const uint8_t* sb, int j, __m256i (&q)[2]) {
  const __m256i nib = _mm256_set1_epi16(0x0F);
  if constexpr (T == kQ6K) {
    const int k = j % 4;
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 64 * (j / 4) + 32 * (k & 1)));
    const __m256i hraw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 128 + 32 * (j / 4)));
    const auto* sc = reinterpret_cast<const int8_t*>(sb + 192);
    for (int half = 0; half < 2; ++half) {
      const __m256i v = _mm256_cvtepu8_epi16(half ? _mm256_extracti128_si256(raw, 1) : _mm256_castsi256_si128(raw));
      const __m256i hv = _mm256_cvtepu8_epi16(half ? _mm256_extracti128_si256(hraw, 1) : _mm256_castsi256_si128(hraw));
      const __m256i lo = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(4 * (k >> 1))), nib);
      const __m256i hi = _mm256_slli_epi16(
          _mm256_and_si256(_mm256_srl_epi16(hv, _mm_cvtsi32_si128(2 * k)), _mm256_set1_epi16(3)), 4);
      const __m256i v6 = _mm256_sub_epi16(_mm256_or_si256(lo, hi), _mm256_set1_epi16(32));
      q[half] = _mm256_mullo_epi16(v6, _mm256_set1_epi16(sc[2 * j + half]));
    }
  } else {
    const __m256i raw =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + (T == kQ4K ? 16 : 48) + 32 * (j / 2)));
    for (int half = 0; half < 2; ++half) {
      const __m256i v = _mm256_cvtepu8_epi16(half ? _mm256_extracti128_si256(raw, 1) : _mm256_castsi256_si128(raw));
      q[half] = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(4 * (j & 1))), nib);
      if constexpr (T == kQ5K) {
        const __m128i hb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 16 + 16 * half));
        const __m256i hv = _mm256_cvtepu8_epi16(hb);
        q[half] = _mm256_or_si256(q[half], _mm256_slli_epi16(
            _mm256_and_si256(_mm256_srl_epi16(hv, _mm_cvtsi32_si128(j)), _mm256_set1_epi16(1)), 4));
      }
    }
  }
}

template <int T, int NR, int MC>
void tile_dot_avx2(const uint8_t* w, int64_t row_bytes, const QuantizedRows& xr, int64_t m0, int64_t K,
                   float* out /* [NR][MC] */) {
  const int64_t nb = K / QK;
  __m256 acc[NR][MC];
  float mins[NR][MC] = {};
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t s = 0; s < K / QKK; ++s) {
    float D[NR][SUB], M[NR][SUB];
    for (int r = 0; r < NR; ++r) {
      super_scales<T>(w + r * row_bytes + s * block_bytes(T), D[r], M[r]);
      if constexpr (T != kQ6K)
        for (int i = 0; i < MC; ++i)
          for (int j = 0; j < SUB; ++j) mins[r][i] += M[r][j] * xr.sx[(m0 + i) * nb + s * SUB + j];
    }
    for (int j = 0; j < SUB; ++j) {
      const int64_t b = s * SUB + j;
      __m256i wq[NR][2];
      for (int r = 0; r < NR; ++r) unpack256<T>(w + r * row_bytes + s * block_bytes(T), j, wq[r]);
      for (int i = 0; i < MC; ++i) {
        const int16_t* xp = xr.q.data() + (m0 + i) * K + b * QK;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 16));
        const float dx = xr.dx[(m0 + i) * nb + b];
        for (int r = 0; r < NR; ++r) {
          const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(wq[r][0], x0), _mm256_madd_epi16(wq[r][1], x1));
          acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(D[r][j] * dx), acc[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) out[r * MC + i] = hsum256(acc[r][i]) - mins[r][i];
}
#endif

#if defined(KILN_AVX512) || defined(KILN_AVX2)
#ifdef KILN_AVX512
constexpr int NR = 4;
#else
constexpr int NR = 2;  // 16 ymm registers, as in quant_gemm.cpp
#endif

template <int T, int MC>
inline void tile_dot_simd(const uint8_t* w, int64_t row_bytes, const QuantizedRows& xr, int64_t m0, int64_t K,
                          float* out) {
#ifdef KILN_AVX512
  tile_dot_avx512<T, NR, MC>(w, row_bytes, xr, m0, K, out);
#else
  tile_dot_avx2<T, NR, MC>(w, row_bytes, xr, m0, K, out);
#endif
}

template <int T>
void tile_dot(int64_t mc, const uint8_t* w, int64_t row_bytes, const QuantizedRows& xr, int64_t m0, int64_t K,
              float* out) {
  switch (mc) {
    case 1: tile_dot_simd<T, 1>(w, row_bytes, xr, m0, K, out); break;
    case 2: tile_dot_simd<T, 2>(w, row_bytes, xr, m0, K, out); break;
    case 3: tile_dot_simd<T, 3>(w, row_bytes, xr, m0, K, out); break;
    default: tile_dot_simd<T, 4>(w, row_bytes, xr, m0, K, out); break;
  }
}
#endif

template <int T, typename Y>
void kquant_matmul_impl(const QuantizedRows& xr, const uint8_t* w, int64_t M, int64_t N, int64_t K, Y* y) {
  const int64_t row_bytes = K / QKK * block_bytes(T);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
#if defined(KILN_AVX512) || defined(KILN_AVX2)
    float tmp[NR * 4];
    for (; n + NR <= end; n += NR) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mc = std::min<int64_t>(4, M - m0);
        tile_dot<T>(mc, w + n * row_bytes, row_bytes, xr, m0, K, tmp);
        for (int r = 0; r < NR; ++r)
          for (int64_t i = 0; i < mc; ++i) y[(m0 + i) * N + n + r] = static_cast<Y>(tmp[r * mc + i]);
      }
    }
#endif
    for (; n < end; ++n)
      for (int64_t i = 0; i < M; ++i) y[i * N + n] = static_cast<Y>(row_dot_scalar<T>(w + n * row_bytes, xr, i, K));
  });
}

void check_weights(const at::Tensor& w, int64_t qtype, int64_t K) {
  TORCH_CHECK(qtype >= kQ4K && qtype <= kQ6K, "qtype must be 0 (Q4_K), 1 (Q5_K) or 2 (Q6_K), got ", qtype);
  TORCH_CHECK(K % QKK == 0, "K must be a multiple of 256 for K-quant super-blocks, got ", K);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() &&
                  w.size(1) == K / QKK * block_bytes(qtype),
              "w must be contiguous uint8 [N, K / 256 * ", block_bytes(qtype), "]");
}

template <typename X, typename Y>
void dispatch_matmul(int64_t qtype, const X* x, const uint8_t* w, int64_t M, int64_t N, int64_t K, Y* y) {
  const QuantizedRows xr = quantize_rows(x, M, K);
  if (qtype == kQ4K) kquant_matmul_impl<kQ4K>(xr, w, M, N, K, y);
  else if (qtype == kQ5K) kquant_matmul_impl<kQ5K>(xr, w, M, N, K, y);
  else kquant_matmul_impl<kQ6K>(xr, w, M, N, K, y);
}

template <int T>
void dequant_rows(const uint8_t* w, int64_t K, int64_t n0, int nr, float* out) {
  const int64_t row_bytes = K / QKK * block_bytes(T);
#ifdef KILN_AVX512
  dequant_rows_avx512<T>(w, row_bytes, K, n0, nr, out);
#else
  for (int r = 0; r < nr; ++r) dequant_row_scalar<T>(w + (n0 + r) * row_bytes, K, out + r * K);
#endif
}

void dequant_rows_any(int64_t qtype, const uint8_t* w, int64_t K, int64_t n0, int nr, float* out) {
  if (qtype == kQ4K) dequant_rows<kQ4K>(w, K, n0, nr, out);
  else if (qtype == kQ5K) dequant_rows<kQ5K>(w, K, n0, nr, out);
  else dequant_rows<kQ6K>(w, K, n0, nr, out);
}

}  // namespace

// y [M, N] = x [M, K] @ W^T for W in K-quant super-blocks (`qtype` 0/1/2 = Q4_K/Q5_K/Q6_K), in x's dtype.
at::Tensor kquant_matmul(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype) {
  TORCH_CHECK(x_in.dim() == 2, "x must be [M, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_weights(w, qtype, K);
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* wp = w.data_ptr<uint8_t>();
  if (x.scalar_type() == at::kFloat) dispatch_matmul(qtype, x.data_ptr<float>(), wp, M, N, K, y.data_ptr<float>());
  else dispatch_matmul(qtype, x.data_ptr<c10::BFloat16>(), wp, M, N, K, y.data_ptr<c10::BFloat16>());
  return y;
}

// W as a dense [N, K] tensor of `dtype` (exactly the gguf library's values before the cast).
at::Tensor kquant_dequantize(const at::Tensor& w, int64_t K, int64_t qtype, at::ScalarType dtype) {
  check_weights(w, qtype, K);
  const int64_t N = w.size(0);
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kFloat));
  const auto* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n += 8) {
      const int nr = static_cast<int>(std::min<int64_t>(8, end - n));
      dequant_rows_any(qtype, wp, K, n, nr, op + n * K);
    }
  });
  return dtype == at::kFloat ? out : out.to(dtype);
}

// y [M, N] = x [M, K] @ dequantize(W)^T in fp32, W dequantized panel by panel (medium M).
at::Tensor kquant_matmul_panels(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x must be a float32 [M, K] tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_weights(w, qtype, K);
#ifdef KILN_AVX512
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* wp = w.data_ptr<uint8_t>();
  panel_matmul(x.data_ptr<float>(), M, N, K, y.data_ptr<float>(),
               [&](int64_t n0, int nr, float* out) { dequant_rows_any(qtype, wp, K, n0, nr, out); });
  return y;
#else
  // Without AVX-512 the dense GEMM on a dequantized copy is the same arithmetic (as quant_matmul_panels).
  return at::linear(x, kquant_dequantize(w, K, qtype, at::kFloat));
#endif
}

}  // namespace kiln

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def("kquant_matmul(Tensor x, Tensor w, int qtype) -> Tensor");
  m.def("kquant_matmul_panels(Tensor x, Tensor w, int qtype) -> Tensor");
  m.def("kquant_dequantize(Tensor w, int K, int qtype, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  m.impl("kquant_matmul", &kiln::kquant_matmul);
  m.impl("kquant_matmul_panels", &kiln::kquant_matmul_panels);
  m.impl("kquant_dequantize", &kiln::kquant_dequantize);
}
