// Shared by the quantized matmul kernels (quant_gemm.cpp: GGUF 32-weight blocks; kquant_gemm.cpp:
// GGUF K-quant super-blocks): the SIMD path chosen at compile time and the int16 per-32-block
// quantization of activation rows both kernels' integer dot products run on.
#pragma once
#include <torch/extension.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// SIMD path, fixed when the library is compiled (-march=native on the machine that runs it, or
// KILN_KERNEL_MARCH): AVX-512BW, else AVX2+FMA, else the portable scalar loop.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
#include <immintrin.h>
#define KILN_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KILN_AVX2 1
#endif

namespace kiln {

constexpr int64_t QK = 32;
// The activation quantization's range: 32767 (int16, what kiln runs) or 127 (int8, llama.cpp's choice:
// the chunked Q4 kernel then multiplies 4 bytes per int32 lane with vpdpbusd, twice the products per
// instruction of int16's vpdpwssd, at a measured quality cost; see `set_activation_bits` in
// kiln/kernels/quant_matmul.py). One value per process; every kernel reads it when it quantizes a row.
inline float activation_qmax_value = 32767.f;
inline float activation_qmax() { return activation_qmax_value; }
inline bool int8_activations() { return activation_qmax_value == 127.f; }

inline float half_to_float(const c10::Half* p) {
#if defined(KILN_AVX512) || defined(KILN_AVX2)
  return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(p));
#else
  return static_cast<float>(*p);
#endif
}

struct QuantizedRows {
  std::vector<int16_t> q;  // [M, K]
  std::vector<float> dx;   // [M, K/32]
  std::vector<float> sx;   // [M, K/32]: dx * sum(q) of the block
  // [M, K] or empty: q with each full 16-block chunk's element pairs transposed to the chunked Q4
  // weight layout (vector t of a chunk: int32 lane j = elements 2t, 2t + 1 of block j); see
  // `transpose_chunks` in quant_gemm.cpp. Built only for the Q4 block kernel.
  std::vector<int16_t> qt;
  // [M, K] or empty: under int8 activations (AVX-512 builds), each full chunk as 8 vectors of 64 bytes,
  // vector t's int32 lane j = elements 4t .. 4t + 3 of the chunk's block j as int8 (`transpose_chunks`);
  // the chunked Q4 kernel then multiplies 4 bytes per lane with vpdpbusd. Replaces qt there.
  std::vector<int8_t> q8t;
};

#ifdef KILN_AVX512
// Two vectors of 16 activations of one 32-block, as fp32.
inline void load_block(const float* x, __m512& a, __m512& b) {
  a = _mm512_loadu_ps(x);
  b = _mm512_loadu_ps(x + 16);
}
inline void load_block(const c10::BFloat16* x, __m512& a, __m512& b) {
  // bf16 → fp32 is the upper half of the fp32 bit pattern
  a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
  b = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))), 16));
}
// std::round (ties away from zero), exactly: trunc(v) is exact, so is v - trunc(v); add the sign
// where that fraction is at least one half.
inline __m512i round_away(__m512 v) {
  const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m512 frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
  const __mmask16 up = _mm512_cmp_ps_mask(frac, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
  const __m512 sign_one = _mm512_or_ps(_mm512_set1_ps(1.f), _mm512_and_ps(v, _mm512_set1_ps(-0.f)));
  return _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, sign_one));
}
#endif

#ifdef KILN_AVX2
// Eight activations as fp32 (bf16 → fp32 is the upper half of the fp32 bit pattern).
inline __m256 load8_activations(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8_activations(const c10::BFloat16* x) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))), 16));
}
// std::round (ties away from zero), exactly, on 8 lanes: round_away's steps with AVX2 instructions.
inline __m256i round_away8(__m256 v) {
  const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256 frac = _mm256_andnot_ps(_mm256_set1_ps(-0.f), _mm256_sub_ps(v, t));
  const __m256 up = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
  const __m256 sign_one = _mm256_or_ps(_mm256_set1_ps(1.f), _mm256_and_ps(v, _mm256_set1_ps(-0.f)));
  return _mm256_cvttps_epi32(_mm256_blendv_ps(t, _mm256_add_ps(t, sign_one), up));
}
#endif

// x [M, K] → int16 per-32-block quantization (round to nearest, ties away from zero). The AVX-512
// path computes the same values as the scalar loop (same max, same scale, same products, same
// rounding; the AVX2 path likewise): it runs once per linear of every decode step, before the threads split the work.
template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t M, int64_t K) {
  const int64_t nb = K / QK;
  QuantizedRows r{std::vector<int16_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb)};
  const float qmax = activation_qmax();
#ifdef KILN_AVX512
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      __m512 lo, hi;
      load_block(x + i * K + b * QK, lo, hi);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const float d = amax / qmax;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      const __m512 vinv = _mm512_set1_ps(inv);
      const __m512i qlo = round_away(_mm512_mul_ps(lo, vinv)), qhi = round_away(_mm512_mul_ps(hi, vinv));
      int16_t* qb = r.q.data() + i * K + b * QK;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), _mm512_cvtepi32_epi16(qlo));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + 16), _mm512_cvtepi32_epi16(qhi));
      r.dx[i * nb + b] = d;
      r.sx[i * nb + b] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
    }
  }
  return r;
#endif
#ifdef KILN_AVX2
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      const T* xs = x + i * K + b * QK;
      __m256 v[4];
      for (int k = 0; k < 4; ++k) v[k] = load8_activations(xs + 8 * k);
      const __m256 abs_mask = _mm256_set1_ps(-0.f);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(abs_mask, v[0]), _mm256_andnot_ps(abs_mask, v[1])),
                                _mm256_max_ps(_mm256_andnot_ps(abs_mask, v[2]), _mm256_andnot_ps(abs_mask, v[3])));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float amax = _mm_cvtss_f32(m4);
      const float d = amax / qmax;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      const __m256 vinv = _mm256_set1_ps(inv);
      __m256i q[4];
      for (int k = 0; k < 4; ++k) q[k] = round_away8(_mm256_mul_ps(v[k], vinv));
      int16_t* qb = r.q.data() + i * K + b * QK;
      // packs works per 128-bit lane: [a0-3 b0-3 a4-7 b4-7] → element order by a 64-bit permute
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + 16),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
      const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      r.dx[i * nb + b] = d;
      r.sx[i * nb + b] = d * static_cast<float>(_mm_cvtsi128_si32(s4));
    }
  }
  return r;
#endif
  float xb[QK];
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      float amax = 0.f;
      for (int j = 0; j < QK; ++j) {
        xb[j] = static_cast<float>(x[i * K + b * QK + j]);
        amax = std::max(amax, std::fabs(xb[j]));
      }
      const float d = amax / qmax;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      int16_t* qb = r.q.data() + i * K + b * QK;
      for (int j = 0; j < QK; ++j) {
        const int v = static_cast<int>(std::round(xb[j] * inv));
        qb[j] = static_cast<int16_t>(v);
        sum += v;
      }
      r.dx[i * nb + b] = d;
      r.sx[i * nb + b] = d * static_cast<float>(sum);
    }
  }
  return r;
}

#ifdef KILN_AVX2
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#endif

}  // namespace kiln
