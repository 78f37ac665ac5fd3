// Paged decode attention for CPU: one query token per sequence, K/V read in place from
// the block-table-addressed cache (no gather into a contiguous copy).
//
// Layout: q [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D];
// block_tables int32 [B, max_blocks]; seq_lens int32 [B]; out [B, Hq, D].
// Work is split over (sequence, kv head) pairs; the Hq/Hkv query heads of a GQA group
// share each K and V row load. Scores are kept in a per-task buffer (two-pass softmax in
// fp32), which for decode (seq_len <= context) is small and cache-resident.
//
// A float16 or bfloat16 cache under fp32 queries is widened row by row the same way (half the
// bytes of an fp32 cache; float16 is llama.cpp's default KV type).
//
// Quantized caches (int8 / fp8 E4M3 with an fp32 scale per token and kv head, see
// kiln/kernels/kv_quant.py) run the same loop: each K/V row is widened to fp32 from its 1-byte
// values and the scale is applied to the dot product (K) or the softmax weight (V), so a decode
// step reads half the bytes of a bf16 cache. `write_kv_quant` quantizes on store.
#include <torch/extension.h>

#include "kiln_ops.h"
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif
#include <limits>
#include <vector>

#include "avx512_load.h"
#include "fast_math.h"

namespace kiln {

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

// fp16 -> fp32 (a 16-bit cache under fp32 activations, llama.cpp's default KV type): vcvtph2ps.
inline void to_float(const c10::Half* src, float* dst, int64_t d) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    for (int64_t i = 0; i < d; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
    return;
  }
#endif
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void to_float(const float* src, float* dst, int64_t d) {
  std::memcpy(dst, src, d * sizeof(float));
}

inline void to_float(const int8_t* src, float* dst, int64_t d) {
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    for (int64_t i = 0; i < d; i += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm512_storeu_ps(dst + i, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
    }
    return;
  }
#endif
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
}

// E4M3 -> fp32: move the 4 exponent + 3 mantissa bits into fp32 position (bits 26..20) and
// multiply by 2^(127-7) to rebias; exact for every finite value, subnormals included. The NaN
// pattern (0x7f) is never stored: writes clamp to +-448.
inline void to_float(const c10::Float8_e4m3fn* src, float* dst, int64_t d) {
  constexpr float kRebias = 1.329227995784916e36f;  // 2^120
  const uint8_t* bits = reinterpret_cast<const uint8_t*>(src);
#if defined(__AVX512F__)
  if (d % 16 == 0) {
    const __m512i m7f = _mm512_set1_epi32(0x7f), m80 = _mm512_set1_epi32(0x80);
    const __m512 rebias = _mm512_set1_ps(kRebias);
    for (int64_t i = 0; i < d; i += 16) {
      const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + i)));
      const __m512 mag = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_and_si512(u, m7f), 20)), rebias);
      const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(u, m80), 24);
      _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(mag), sign)));
    }
    return;
  }
#endif
  for (int64_t i = 0; i < d; ++i) {
    const uint32_t mag = static_cast<uint32_t>(bits[i] & 0x7f) << 20;
    float f;
    std::memcpy(&f, &mag, sizeof(f));
    f *= kRebias;
    dst[i] = (bits[i] & 0x80) ? -f : f;
  }
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

// The cache rows (at element offset `off`) and slots of keys tb .. tb + KT - 1 for one group of the SIMD
// decode tasks; lanes past nt repeat the last key (their scores are masked off).
template <int64_t KT, typename C>
inline void key_group(const C* kp, const int32_t* table, int64_t tb, int64_t nt, int64_t BS, int64_t block_stride,
                      int64_t token_stride, int64_t off, const C* (&krows)[KT], int64_t (&slots)[KT]) {
  for (int64_t i = 0; i < KT; ++i) {
    const int64_t t = tb + std::min<int64_t>(i, nt - 1);
    slots[i] = static_cast<int64_t>(table[t / BS]) * BS + t % BS;
    krows[i] = kp + table[t / BS] * block_stride + (t % BS) * token_stride + off;
  }
}

#if defined(__AVX512F__)
// 16 cache values → fp32 lanes (exactly what to_float produces for them); the float types' overloads
// are in avx512_load.h, shared with the prefill kernel.
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const c10::Float8_e4m3fn* p) {
  alignas(64) float tmp[16];
  to_float(p, tmp, 16);
  return _mm512_load_ps(tmp);
}

// Lane i of the result = the sum of a[i]'s 16 lanes: three rounds of unpack / shuffle + add, 45
// instructions for 16 sums where 16 horizontal adds take ~10 each. Each lane's sum is a fixed tree
// over its own vector only, so a score never depends on which other keys share its group of 16.
inline __m512 reduce_add_16(__m512 (&a)[16]) {
  __m512 b[8];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: [A0+A2, B0+B2, A1+A3, B1+B3] of A = a[2k], B = a[2k+1]
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  __m512 c[4];
  for (int k = 0; k < 4; ++k) {  // element m of 128-bit lane L: a[4k + m]'s four lanes of L, summed
    const __m512d p = _mm512_castps_pd(b[2 * k]), q = _mm512_castps_pd(b[2 * k + 1]);
    c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
  }
  // 128-bit lane k of the result: c[k]'s four 128-bit lanes summed (L0 + L2) + (L1 + L3)
  const __m512 f01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  const __m512 f23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(f01, f23, 0x88), _mm512_shuffle_f32x4(f01, f23, 0xDD));
}

// out[g] (GN query heads of one kv head, D = 16 * DV each) = sum over t in [t0, S) of p[g * S + t] * V[t],
// one FMA per token in token order per lane. The cache is walked block by block (no division per token).
// vbase: the kv head's first value in block 0; vsc: its scales (quantized caches), else nullptr.
template <typename C, int DV, int GN, bool kQuant>
inline void accumulate_v(const float* p, const C* vbase, const float* vsc, const int32_t* table, int64_t t0,
                         int64_t S, int64_t BS, int64_t block_stride, int64_t token_stride, int64_t Hkv, float* out) {
  __m512 o[GN][DV];
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < DV; ++c) o[g][c] = _mm512_setzero_ps();
  for (int64_t t = t0; t < S;) {
    const int64_t block = table[t / BS], end = std::min<int64_t>(S, (t / BS + 1) * BS);
    for (int64_t i = t % BS; t < end; ++t, ++i) {
      const C* vrow = vbase + block * block_stride + i * token_stride;
      __m512 v[DV];
      for (int c = 0; c < DV; ++c) v[c] = load16(vrow + 16 * c);
      const float vs = kQuant ? vsc[(block * BS + i) * Hkv] : 1.f;
      for (int g = 0; g < GN; ++g) {
        float pg = p[g * S + t];
        if constexpr (kQuant) pg *= vs;
        const __m512 pv = _mm512_set1_ps(pg);
        for (int c = 0; c < DV; ++c) o[g][c] = _mm512_fmadd_ps(pv, v[c], o[g][c]);
      }
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < DV; ++c) _mm512_storeu_ps(out + g * 16 * DV + 16 * c, o[g][c]);
}

// One task of decode_kernel on AVX-512 (head_dim = 16 * DV). Scores are made 16 keys at a time: per
// key a zeroed accumulator and DV FMAs in c order (the K row in registers, reread from L1 by each
// query head of its group), then reduce_add_16 turns the 16 accumulators into 16 scores at once.
// A score is a function of its query and key only (not of t0, S or the batch), which keeps a row
// verified with drafts bit-identical to the same row decoded alone. V: one FMA per token in token
// order per output lane. The generic loop in decode_kernel (other head sizes, no AVX-512) sums in
// another order: same values to fp32 rounding, not bit for bit.
// qf: NH * D scaled queries; scores: NH * S; returns per-head max and denominators in row_max/denom
// and writes the unnormalized outputs to acc (NH * D).
template <typename C, int DV, bool kQuant>
void decode_task_avx512(const float* qf, const C* kp, const C* vp, const int32_t* table, int64_t t0, int64_t S,
                        int64_t BS, int64_t block_stride, int64_t token_stride, int64_t h0, int64_t heads, int64_t G,
                        int64_t Hkv, const float* k_scales, const float* v_scales, float* scores, float* row_max,
                        float* denom, float* acc) {
  constexpr int64_t D = 16 * DV;
  const int64_t NH = heads * G;
  constexpr int64_t KT = 16;  // keys per score group
  std::vector<__m512> max_lanes(NH, _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
  for (int64_t tb = t0; tb < S; tb += KT) {
    const int64_t nt = std::min<int64_t>(KT, S - tb);
    const __mmask16 valid = static_cast<__mmask16>((1u << nt) - 1u);
    const C* krows[KT];
    int64_t slots[KT];
    key_group<KT>(kp, table, tb, nt, BS, block_stride, token_stride, h0 * D, krows, slots);
    for (int64_t hh = 0; hh < heads; ++hh) {
      __m512 ks = _mm512_set1_ps(1.f);
      if constexpr (kQuant) {
        alignas(64) float kss[KT];
        for (int64_t i = 0; i < KT; ++i) kss[i] = k_scales[slots[i] * Hkv + h0 + hh];
        ks = _mm512_load_ps(kss);
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t j = hh * G + g;
        __m512 qv[DV];
        for (int c = 0; c < DV; ++c) qv[c] = _mm512_loadu_ps(qf + j * D + 16 * c);
        __m512 a[KT];
        for (int64_t i = 0; i < KT; ++i) {
          a[i] = _mm512_setzero_ps();
          for (int c = 0; c < DV; ++c) a[i] = _mm512_fmadd_ps(qv[c], load16(krows[i] + hh * D + 16 * c), a[i]);
        }
        __m512 sc = reduce_add_16(a);
        if constexpr (kQuant) sc = _mm512_mul_ps(sc, ks);
        _mm512_mask_storeu_ps(scores + j * S + tb, valid, sc);
        max_lanes[j] = _mm512_mask_max_ps(max_lanes[j], valid, max_lanes[j], sc);
      }
    }
  }
  for (int64_t j = 0; j < NH; ++j) row_max[j] = _mm512_reduce_max_ps(max_lanes[j]);
  // softmax numerators in place, 16 lanes at a time from t0; lane l of the sum takes keys t0 + l + 16 i
  for (int64_t j = 0; j < NH; ++j) {
    float* sg = scores + j * S;
    const __m512 m = _mm512_set1_ps(row_max[j]);
    __m512 z = _mm512_setzero_ps();
    for (int64_t t = t0; t < S; t += 16) {
      const __mmask16 valid = static_cast<__mmask16>((1u << std::min<int64_t>(16, S - t)) - 1u);
      const __m512 e = kiln_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, sg + t), m));
      _mm512_mask_storeu_ps(sg + t, valid, e);
      z = _mm512_mask_add_ps(z, valid, z, e);
    }
    denom[j] = _mm512_reduce_add_ps(z);
  }
  // V: per kv head, up to GB query heads' accumulators stay in registers over all tokens.
  constexpr int64_t GB = DV <= 4 ? 4 : 2;
  for (int64_t hh = 0; hh < heads; ++hh) {
    for (int64_t g0 = 0; g0 < G; g0 += GB) {
      const int64_t gn = std::min<int64_t>(GB, G - g0);
      const float* p = scores + (hh * G + g0) * S;
      float* out = acc + (hh * G + g0) * D;
      const C* vbase = vp + (h0 + hh) * D;
      const float* vsc = kQuant ? v_scales + h0 + hh : nullptr;
      switch (gn) {  // a compile-time head count keeps the accumulators in registers
        case 1: accumulate_v<C, DV, 1, kQuant>(p, vbase, vsc, table, t0, S, BS, block_stride, token_stride, Hkv, out); break;
        case 2: accumulate_v<C, DV, 2, kQuant>(p, vbase, vsc, table, t0, S, BS, block_stride, token_stride, Hkv, out); break;
        case 3: accumulate_v<C, DV, 3, kQuant>(p, vbase, vsc, table, t0, S, BS, block_stride, token_stride, Hkv, out); break;
        default: accumulate_v<C, DV, GB, kQuant>(p, vbase, vsc, table, t0, S, BS, block_stride, token_stride, Hkv, out);
      }
    }
  }
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KILN_ATTN_AVX2 1
// 8 cache values → fp32 lanes (exactly what to_float produces for them).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const c10::Float8_e4m3fn* p) {
  alignas(32) float tmp[8];
  to_float(p, tmp, 8);
  return _mm256_load_ps(tmp);
}

// Lane i of the result = the sum of a[i]'s 8 lanes (the AVX2 twin of reduce_add_16): a fixed tree over
// each vector's own lanes, so a score never depends on which other keys share its group of 8.
inline __m256 reduce_add_8(__m256 (&a)[8]) {
  __m256 b[4];
  for (int k = 0; k < 4; ++k)  // per 128-bit lane: [A0+A2, B0+B2, A1+A3, B1+B3] of A = a[2k], B = a[2k+1]
    b[k] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm256_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  __m256 c[2];
  for (int k = 0; k < 2; ++k) {  // element m of 128-bit lane L: a[4k + m]'s four lanes of L, summed
    const __m256d p = _mm256_castps_pd(b[2 * k]), q = _mm256_castps_pd(b[2 * k + 1]);
    c[k] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(p, q)), _mm256_castpd_ps(_mm256_unpackhi_pd(p, q)));
  }
  // 128-bit lane k of the result: c[k]'s two 128-bit lanes summed
  return _mm256_add_ps(_mm256_permute2f128_ps(c[0], c[1], 0x20), _mm256_permute2f128_ps(c[0], c[1], 0x31));
}

// Lanes [0, n) all ones (n in 0..8): the mask of a partial group of keys.
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// out (one query head, columns [c0, c0 + 8 * CB)) = sum over t in [t0, S) of p[t] * V[t], one FMA per token in
// token order per lane, the cache walked block by block.
template <typename C, int CB, bool kQuant>
inline void accumulate_v_avx2(const float* p, const C* vbase, const float* vsc, const int32_t* table, int64_t t0,
                              int64_t S, int64_t BS, int64_t block_stride, int64_t token_stride, int64_t Hkv,
                              float* out) {
  __m256 o[CB];
  for (int c = 0; c < CB; ++c) o[c] = _mm256_setzero_ps();
  for (int64_t t = t0; t < S;) {
    const int64_t block = table[t / BS], end = std::min<int64_t>(S, (t / BS + 1) * BS);
    for (int64_t i = t % BS; t < end; ++t, ++i) {
      const C* vrow = vbase + block * block_stride + i * token_stride;
      float pg = p[t];
      if constexpr (kQuant) pg *= vsc[(block * BS + i) * Hkv];
      const __m256 pv = _mm256_set1_ps(pg);
      for (int c = 0; c < CB; ++c) o[c] = _mm256_fmadd_ps(pv, load8(vrow + 8 * c), o[c]);
    }
  }
  for (int c = 0; c < CB; ++c) _mm256_storeu_ps(out + 8 * c, o[c]);
}

// The G query heads of one KV head over one group of 8 keys, each key row loaded (converted, for a 16-bit or
// 8-bit cache) once for all G heads instead of once per head: a[g][i] is head g's accumulator for key i,
// zeroed, then one FMA per column block in column order: the per-head loop's arithmetic, so its sums are
// bit-identical to that loop's. Keys in passes of KP so that G x KP accumulators stay in registers.
template <typename C, int G, int KP>
inline void group_scores_avx2(const float* q /* [G][D] */, const C* const (&krows)[8], int64_t off, int64_t D,
                              __m256 (&a)[G][8]) {
  const int64_t DV = D / 8;
  for (int i0 = 0; i0 < 8; i0 += KP) {
    __m256 s[G][KP];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < KP; ++i) s[g][i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < DV; ++c) {
      for (int i = 0; i < KP; ++i) {
        const __m256 k = load8(krows[i0 + i] + off + 8 * c);
        for (int g = 0; g < G; ++g) s[g][i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + 8 * c), k, s[g][i]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < KP; ++i) a[g][i0 + i] = s[g][i];
  }
}

// out (G query heads of one KV head, columns [c0, c0 + 8 * CB) of each, rows D apart) = sum over t of
// p_g[t] * V[t] (p_g rows ps apart): accumulate_v_avx2 for G heads at once, each V row loaded (converted) once
// for all of them; per output lane the same FMAs in the same token order, so the same values.
template <typename C, int G, int CB, bool kQuant>
inline void accumulate_v_group_avx2(const float* p, int64_t ps, const C* vbase, const float* vsc, const int32_t* table,
                                    int64_t t0, int64_t S, int64_t BS, int64_t block_stride, int64_t token_stride,
                                    int64_t Hkv, float* out, int64_t D) {
  __m256 o[G][CB];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CB; ++c) o[g][c] = _mm256_setzero_ps();
  for (int64_t t = t0; t < S;) {
    const int64_t block = table[t / BS], end = std::min<int64_t>(S, (t / BS + 1) * BS);
    for (int64_t i = t % BS; t < end; ++t, ++i) {
      const C* vrow = vbase + block * block_stride + i * token_stride;
      __m256 pv[G];
      for (int g = 0; g < G; ++g) {
        float pg = p[g * ps + t];
        if constexpr (kQuant) pg *= vsc[(block * BS + i) * Hkv];
        pv[g] = _mm256_set1_ps(pg);
      }
      for (int c = 0; c < CB; ++c) {
        const __m256 v = load8(vrow + 8 * c);
        for (int g = 0; g < G; ++g) o[g][c] = _mm256_fmadd_ps(pv[g], v, o[g][c]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CB; ++c) _mm256_storeu_ps(out + g * D + 8 * c, o[g][c]);
}

// One task of decode_kernel on AVX2 + FMA (head_dim a multiple of 8, at most 256): decode_task_avx512
// with 8 lanes. Scores 8 keys at a time (per key a zeroed accumulator and D / 8 FMAs in column order,
// then reduce_add_8), so a score depends only on its query and key, and a verification row is
// bit-identical to the same row decoded alone. Softmax numerators on 8 lanes; V per query head in
// column blocks of 64 (8 accumulators in registers), one FMA per token in token order per lane.
template <typename C, bool kQuant>
void decode_task_avx2(const float* qf, const C* kp, const C* vp, const int32_t* table, int64_t t0, int64_t S,
                      int64_t D, int64_t BS, int64_t block_stride, int64_t token_stride, int64_t h0, int64_t heads,
                      int64_t G, int64_t Hkv, const float* k_scales, const float* v_scales, float* scores,
                      float* row_max, float* denom, float* acc) {
  const int64_t NH = heads * G, DV = D / 8;
  constexpr int64_t KT = 8;  // keys per score group
  __m256 max_lanes[64];      // NH <= 64 (checked by the caller)
  for (int64_t j = 0; j < NH; ++j) max_lanes[j] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t tb = t0; tb < S; tb += KT) {
    const int64_t nt = std::min<int64_t>(KT, S - tb);
    const __m256i valid = first_lanes(nt);
    const C* krows[KT];
    int64_t slots[KT];
    key_group<KT>(kp, table, tb, nt, BS, block_stride, token_stride, h0 * D, krows, slots);
    for (int64_t hh = 0; hh < heads; ++hh) {
      __m256 ks = _mm256_set1_ps(1.f);
      if constexpr (kQuant) {
        alignas(32) float kss[KT];
        for (int64_t i = 0; i < KT; ++i) kss[i] = k_scales[slots[i] * Hkv + h0 + hh];
        ks = _mm256_load_ps(kss);
      }
      const auto finish = [&](int64_t j, __m256 (&a)[KT]) {
        __m256 sc = reduce_add_8(a);
        if constexpr (kQuant) sc = _mm256_mul_ps(sc, ks);
        _mm256_maskstore_ps(scores + j * S + tb, valid, sc);
        max_lanes[j] = _mm256_blendv_ps(max_lanes[j], _mm256_max_ps(max_lanes[j], sc), _mm256_castsi256_ps(valid));
      };
      // GQA groups of 2-4 query heads share each key row's load (group_scores_avx2: the same sums)
      const auto shared = [&](auto heads_tag, auto keys_tag) {
        constexpr int GG = decltype(heads_tag)::value, KP = decltype(keys_tag)::value;
        __m256 a[GG][KT];
        group_scores_avx2<C, GG, KP>(qf + hh * G * D, krows, hh * D, D, a);
        for (int g = 0; g < GG; ++g) finish(hh * G + g, a[g]);
      };
      if (G == 2) {
        shared(std::integral_constant<int, 2>(), std::integral_constant<int, 4>());
      } else if (G == 3) {
        shared(std::integral_constant<int, 3>(), std::integral_constant<int, 4>());
      } else if (G == 4) {
        shared(std::integral_constant<int, 4>(), std::integral_constant<int, 2>());
      } else {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t j = hh * G + g;
          const float* qj = qf + j * D;
          __m256 a[KT];
          for (int64_t i = 0; i < KT; ++i) {
            a[i] = _mm256_setzero_ps();
            const C* kr = krows[i] + hh * D;
            for (int64_t c = 0; c < DV; ++c) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(qj + 8 * c), load8(kr + 8 * c), a[i]);
          }
          finish(j, a);
        }
      }
    }
  }
  for (int64_t j = 0; j < NH; ++j) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, max_lanes[j]);
    float m = lanes[0];
    for (int l = 1; l < 8; ++l) m = std::max(m, lanes[l]);
    row_max[j] = m;
  }
  // softmax numerators in place, 8 lanes at a time from t0; lane l of the sum takes keys t0 + l + 8 i
  for (int64_t j = 0; j < NH; ++j) {
    float* sg = scores + j * S;
    const __m256 m = _mm256_set1_ps(row_max[j]);
    __m256 z = _mm256_setzero_ps();
    for (int64_t t = t0; t < S; t += 8) {
      const __m256i valid = first_lanes(std::min<int64_t>(8, S - t));
      const __m256 e = kiln_exp8(_mm256_sub_ps(_mm256_maskload_ps(sg + t, valid), m));
      _mm256_maskstore_ps(sg + t, valid, e);
      z = _mm256_add_ps(z, _mm256_and_ps(e, _mm256_castsi256_ps(valid)));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, z);
    denom[j] = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  }
  for (int64_t hh = 0; hh < heads; ++hh) {
    const C* vbase = vp + (h0 + hh) * D;
    const float* vsc = kQuant ? v_scales + h0 + hh : nullptr;
    const float* ph = scores + hh * G * S;
    float* oh = acc + hh * G * D;
    // GQA groups of 2-4 query heads: each V row loaded once for the group (accumulate_v_group_avx2)
    if (G == 2 && D % 32 == 0) {
      for (int64_t c0 = 0; c0 < D; c0 += 32)
        accumulate_v_group_avx2<C, 2, 4, kQuant>(ph, S, vbase + c0, vsc, table, t0, S, BS, block_stride, token_stride,
                                                 Hkv, oh + c0, D);
      continue;
    }
    if (G == 3 && D % 32 == 0) {
      for (int64_t c0 = 0; c0 < D; c0 += 32)
        accumulate_v_group_avx2<C, 3, 4, kQuant>(ph, S, vbase + c0, vsc, table, t0, S, BS, block_stride, token_stride,
                                                 Hkv, oh + c0, D);
      continue;
    }
    if (G == 4 && D % 16 == 0) {
      for (int64_t c0 = 0; c0 < D; c0 += 16)
        accumulate_v_group_avx2<C, 4, 2, kQuant>(ph, S, vbase + c0, vsc, table, t0, S, BS, block_stride, token_stride,
                                                 Hkv, oh + c0, D);
      continue;
    }
    for (int64_t g = 0; g < G; ++g) {
      const float* p = ph + g * S;
      float* out = oh + g * D;
      int64_t c0 = 0;
      for (; c0 + 64 <= D; c0 += 64)
        accumulate_v_avx2<C, 8, kQuant>(p, vbase + c0, vsc, table, t0, S, BS, block_stride, token_stride, Hkv, out + c0);
      for (; c0 < D; c0 += 8)
        accumulate_v_avx2<C, 1, kQuant>(p, vbase + c0, vsc, table, t0, S, BS, block_stride, token_stride, Hkv, out + c0);
    }
  }
}
#endif

// `window` > 0: each query sees only the last `window` keys of its sequence (sliding-window
// attention): tokens before t0 = S - window are never read, so their blocks may already be reused.
// T: q/out dtype; C: cache element type: a float type (T itself, or a 16-bit cache under fp32
// queries), or int8 / fp8 with per-token-head scales k_scales/v_scales [num_blocks, block_size,
// Hkv] (nullptr for a float cache).
template <typename T, typename C = T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                   at::Tensor& out, const float* k_scales = nullptr, const float* v_scales = nullptr,
                   int64_t window = 0) {
  constexpr bool kQuant = std::is_same_v<C, int8_t> || std::is_same_v<C, c10::Float8_e4m3fn>;
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t G = Hq / Hkv;
  const int64_t max_blocks = block_tables.size(1);
  const T* qp = q.data_ptr<T>();
  const C* kp = static_cast<const C*>(k_cache.data_ptr());
  const C* vp = static_cast<const C*>(v_cache.data_ptr());
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
    // the task's NH normalized outputs: acc / denom per query head, in the output dtype
    const auto write_out = [&](int64_t b, int64_t q_head0) {
      for (int64_t j = 0; j < NH; ++j) {
        const float inv = 1.f / denom[j];
        T* o = op + (b * Hq + q_head0 + j) * D;
        for (int64_t i = 0; i < D; ++i) o[i] = static_cast<T>(acc[j * D + i] * inv);
      }
    };
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = split_heads ? item / Hkv : item;
      const int64_t h0 = split_heads ? item % Hkv : 0;
      const int64_t S = sl[b];
      const int64_t t0 = window > 0 && S > window ? S - window : 0;
      const int32_t* table = bt + b * max_blocks;
      const int64_t q_head0 = h0 * G;
      for (int64_t j = 0; j < NH; ++j)
        for (int64_t i = 0; i < D; ++i)
          qf[j * D + i] = static_cast<float>(qp[(b * Hq + q_head0 + j) * D + i]) * static_cast<float>(scale);
      scores.resize(NH * S);
#if defined(__AVX512F__)
      if (D == 64 || D == 128) {
        const auto task = D == 64 ? decode_task_avx512<C, 4, kQuant> : decode_task_avx512<C, 8, kQuant>;
        task(qf.data(), kp, vp, table, t0, S, BS, block_stride, token_stride, h0, heads_per_task, G, Hkv, k_scales,
             v_scales, scores.data(), row_max.data(), denom.data(), acc.data());
        write_out(b, q_head0);
        continue;
      }
#elif defined(KILN_ATTN_AVX2)
      if (D % 8 == 0 && D <= 256 && NH <= 64) {
        decode_task_avx2<C, kQuant>(qf.data(), kp, vp, table, t0, S, D, BS, block_stride, token_stride, h0,
                                    heads_per_task, G, Hkv, k_scales, v_scales, scores.data(), row_max.data(),
                                    denom.data(), acc.data());
        write_out(b, q_head0);
        continue;
      }
#endif
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      for (int64_t t = t0; t < S; ++t) {
        const C* krow = kp + table[t / BS] * block_stride + (t % BS) * token_stride + h0 * D;
        to_float(krow, row.data(), heads_per_task * D);
        for (int64_t j = 0; j < NH; ++j) {
          float sc = dot_f32(qf.data() + j * D, row.data() + (j / G) * D, D);
          if constexpr (kQuant) sc *= k_scales[(table[t / BS] * BS + t % BS) * Hkv + h0 + j / G];
          scores[j * S + t] = sc;
          if (sc > row_max[j]) row_max[j] = sc;
        }
      }
      for (int64_t j = 0; j < NH; ++j) {
        float* sg = scores.data() + j * S;
        float z = 0.f;
        const float m = row_max[j];
#pragma omp simd reduction(+ : z)
        for (int64_t t = t0; t < S; ++t) { sg[t] = kiln_exp(sg[t] - m); z += sg[t]; }
        denom[j] = z;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = t0; t < S; ++t) {
        const C* vrow = vp + table[t / BS] * block_stride + (t % BS) * token_stride + h0 * D;
        to_float(vrow, row.data(), heads_per_task * D);
        if constexpr (kQuant) {
          const float* vs = v_scales + (table[t / BS] * BS + t % BS) * Hkv + h0;
          for (int64_t j = 0; j < NH; ++j)
            axpy_f32(scores[j * S + t] * vs[j / G], row.data() + (j / G) * D, acc.data() + j * D, D);
        } else {
          for (int64_t j = 0; j < NH; ++j) axpy_f32(scores[j * S + t], row.data() + (j / G) * D, acc.data() + j * D, D);
        }
      }
      write_out(b, q_head0);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head_dim mismatch");
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == ct, "K and V caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "int32 tables");
  auto qc = q.contiguous();
  auto bt = block_tables.contiguous();
  auto sl = seq_lens.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cache must be contiguous");
  auto out = at::empty_like(qc);
  // (query, cache): the cache in the query dtype, or a 16-bit cache under fp32 queries.
  if (qt == at::kFloat && ct == at::kFloat) {
    decode_kernel<float>(qc, k_cache, v_cache, bt, sl, scale, out);
  } else if (qt == at::kFloat && ct == at::kHalf) {
    decode_kernel<float, c10::Half>(qc, k_cache, v_cache, bt, sl, scale, out);
  } else if (qt == at::kFloat && ct == at::kBFloat16) {
    decode_kernel<float, c10::BFloat16>(qc, k_cache, v_cache, bt, sl, scale, out);
  } else if (qt == at::kBFloat16 && ct == at::kBFloat16) {
    decode_kernel<c10::BFloat16>(qc, k_cache, v_cache, bt, sl, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 queries over a float32/float16/bfloat16 cache "
                "and bfloat16 queries over a bfloat16 cache; got ", qt, " over ", ct);
  }
  return out;
}

at::Tensor paged_decode_attention_window(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                         int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head_dim mismatch");
  TORCH_CHECK(window > 0, "window must be positive");
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == ct, "K and V caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "int32 tables");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cache must be contiguous");
  auto qc = q.contiguous();
  auto bt = block_tables.contiguous();
  auto sl = seq_lens.contiguous();
  auto out = at::empty_like(qc);
  if (qt == at::kFloat && ct == at::kFloat) {
    decode_kernel<float>(qc, k_cache, v_cache, bt, sl, scale, out, nullptr, nullptr, window);
  } else if (qt == at::kFloat && ct == at::kHalf) {
    decode_kernel<float, c10::Half>(qc, k_cache, v_cache, bt, sl, scale, out, nullptr, nullptr, window);
  } else if (qt == at::kFloat && ct == at::kBFloat16) {
    decode_kernel<float, c10::BFloat16>(qc, k_cache, v_cache, bt, sl, scale, out, nullptr, nullptr, window);
  } else if (qt == at::kBFloat16 && ct == at::kBFloat16) {
    decode_kernel<c10::BFloat16>(qc, k_cache, v_cache, bt, sl, scale, out, nullptr, nullptr, window);
  } else {
    TORCH_CHECK(false, "paged_decode_attention_window supports the float caches paged_decode_attention does; got ",
                qt, " over ", ct);
  }
  return out;
}

template <typename T>
void decode_quant_dispatch(const at::Tensor& q, const at::Tensor& k_data, const at::Tensor& k_scale,
                           const at::Tensor& v_data, const at::Tensor& v_scale, const at::Tensor& bt,
                           const at::Tensor& sl, double scale, at::Tensor& out) {
  const float* ks = k_scale.data_ptr<float>();
  const float* vs = v_scale.data_ptr<float>();
  if (k_data.scalar_type() == at::kChar) {
    decode_kernel<T, int8_t>(q, k_data, v_data, bt, sl, scale, out, ks, vs);
  } else {
    decode_kernel<T, c10::Float8_e4m3fn>(q, k_data, v_data, bt, sl, scale, out, ks, vs);
  }
}

// The same decode over a quantized cache: *_data [num_blocks, block_size, Hkv, D] int8 or
// float8_e4m3fn, *_scale [num_blocks, block_size, Hkv] fp32 (x = data * scale).
at::Tensor paged_decode_attention_quant(const at::Tensor& q, const at::Tensor& k_data, const at::Tensor& k_scale,
                                        const at::Tensor& v_data, const at::Tensor& v_scale,
                                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_data.dim() == 4 && v_data.sizes() == k_data.sizes(), "bad shapes");
  TORCH_CHECK(q.size(1) % k_data.size(2) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) == k_data.size(3), "head_dim mismatch");
  const auto st = k_data.scalar_type();
  TORCH_CHECK((st == at::kChar || st == at::kFloat8_e4m3fn) && v_data.scalar_type() == st,
              "quantized cache must be int8 or float8_e4m3fn");
  TORCH_CHECK(k_scale.scalar_type() == at::kFloat && v_scale.scalar_type() == at::kFloat, "fp32 scales");
  TORCH_CHECK(k_scale.sizes() == k_data.sizes().slice(0, 3) && v_scale.sizes() == k_scale.sizes(),
              "scales must be [num_blocks, block_size, Hkv]");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "int32 tables");
  TORCH_CHECK(k_data.is_contiguous() && v_data.is_contiguous() && k_scale.is_contiguous() && v_scale.is_contiguous(),
              "cache must be contiguous");
  auto qc = q.contiguous();
  auto bt = block_tables.contiguous();
  auto sl = seq_lens.contiguous();
  auto out = at::empty_like(qc);
  if (q.scalar_type() == at::kFloat) {
    decode_quant_dispatch<float>(qc, k_data, k_scale, v_data, v_scale, bt, sl, scale, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode_quant_dispatch<c10::BFloat16>(qc, k_data, k_scale, v_data, v_scale, bt, sl, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention_quant supports float32 and bfloat16 queries");
  }
  return out;
}

// Quantize x [T, Hkv, D] into slots of data [num_blocks, block_size, Hkv, D] and
// scale [num_blocks, block_size, Hkv]: scale = absmax / qmax, data = round(x / scale) clamped.
// Operation for operation the same as kv_quant.quantize_reference (bit-identical results).
template <typename T, typename C>
void write_quant_kernel(const at::Tensor& x, at::Tensor& data, at::Tensor& scales, const at::Tensor& slots) {
  constexpr bool kInt8 = std::is_same_v<C, int8_t>;
  constexpr float qmax = kInt8 ? 127.f : 448.f;
  const int64_t T_ = x.size(0), H = x.size(1), D = x.size(2), row_stride = x.stride(0);
  const T* xp = x.data_ptr<T>();
  C* dp = static_cast<C*>(data.data_ptr());
  float* sp = scales.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  at::parallel_for(0, T_ * H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / H, h = r % H;
      const T* src = xp + t * row_stride + h * D;
      float amax = 0.f;
      for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(static_cast<float>(src[i])));
      const float s = amax / qmax;
      const float safe = s > 0.f ? s : 1.f;
      const int64_t dst_row = slot[t] * H + h;
      sp[dst_row] = s;
      C* dst = dp + dst_row * D;
      for (int64_t i = 0; i < D; ++i) {
        const float y = std::min(std::max(static_cast<float>(src[i]) / safe, -qmax), qmax);
        if constexpr (kInt8) {
          dst[i] = static_cast<int8_t>(std::nearbyint(y));
        } else {
          dst[i] = c10::Float8_e4m3fn(y);
        }
      }
    }
  });
}

void write_kv_quant(const at::Tensor& x, at::Tensor& data, at::Tensor& scale, const at::Tensor& slot_mapping) {
  TORCH_CHECK(x.dim() == 3 && data.dim() == 4 && x.size(1) == data.size(2) && x.size(2) == data.size(3), "bad shapes");
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2), "each token's K/V row must be contiguous");
  TORCH_CHECK(data.is_contiguous() && scale.is_contiguous() && scale.scalar_type() == at::kFloat, "bad cache");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.size(0) == x.size(0), "int64 slot per token");
  auto slots = slot_mapping.contiguous();
  const bool int8 = data.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || data.scalar_type() == at::kFloat8_e4m3fn, "quantized cache must be int8 or float8_e4m3fn");
  if (x.scalar_type() == at::kFloat) {
    int8 ? write_quant_kernel<float, int8_t>(x, data, scale, slots)
         : write_quant_kernel<float, c10::Float8_e4m3fn>(x, data, scale, slots);
  } else if (x.scalar_type() == at::kBFloat16) {
    int8 ? write_quant_kernel<c10::BFloat16, int8_t>(x, data, scale, slots)
         : write_quant_kernel<c10::BFloat16, c10::Float8_e4m3fn>(x, data, scale, slots);
  } else {
    TORCH_CHECK(false, "write_kv_quant supports float32 and bfloat16 inputs");
  }
}

}  // namespace kiln

TORCH_LIBRARY(kiln, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
  m.def("paged_decode_attention_window(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale, int window) -> Tensor");
  m.def("paged_decode_attention_quant(Tensor q, Tensor k_data, Tensor k_scale, Tensor v_data, Tensor v_scale, "
        "Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
  m.def("write_kv_quant(Tensor x, Tensor(a!) data, Tensor(b!) scale, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  m.impl("paged_decode_attention", &kiln::paged_decode_attention);
  m.impl("paged_decode_attention_window", &kiln::paged_decode_attention_window);
  m.impl("paged_decode_attention_quant", &kiln::paged_decode_attention_quant);
  m.impl("write_kv_quant", &kiln::write_kv_quant);
}
