// Weight-only quantized matmul for GGUF-style 32-element blocks, for decode-sized M.
//
// Layouts (repacked once at load by kiln/layers/gguf_quant.py; see kiln/kernels/quant_matmul.py):
//   Q4 (GGUF Q4_0 and Q4_1): qs uint8 [N, P = ceil(K/64), 32]: byte j of pair p holds element j
//     of block 2p in its low nibble and element j of block 2p+1 in its high nibble (zero past
//     the last block); w = d * q + m with q in [0, 15] (Q4_0 is stored with m = -8 d).
//     Zero-extending the 32 bytes to int16 gives both blocks with one AND and one shift.
//   Q8 (GGUF Q8_0): qs int8 [N, K], w = d * q.
//   Q5 (GGUF Q5_0): the Q4 layout for the low four bits plus qh uint32 [N, K/32], bit j of a block's
//     word = bit 4 of its element j (GGUF's own qh); w = d * (q + 16 h) + m with m = -16 d (exact in fp32
//     and fp16, as Q4_0's -8 d). The kernels add 16 to the lanes whose bit is set before the integer dot.
//   d, m: float16 [N, K/32] (GGUF's own scale precision, so the repack is exact).
//
// The activation row is quantized per 32-block to int16 (scale dx = max|x| / 32767): a
// block's dot product is then an exact integer dot (vpmaddwd on AVX-512BW, scalar otherwise)
// scaled by d * dx, plus m * dx * sum(xq) for the Q4 min. int16 rather than llama.cpp's int8
// keeps the result within ~1e-5 of the dequantized matmul at the same weight bandwidth
// (int8 activations cost ~3e-3 nats of KL on the default model).
// The plain-torch twin in quant_matmul.py does exactly the same arithmetic.
#include <torch/extension.h>

#include "kiln_ops.h"
#include "panel_gemm.h"
#include "quant_common.h"
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace kiln {

// Q4 min term: sum_b m[b] * dx[b] * sum(xq_b) for one output row and one activation row.
inline float min_term(const c10::Half* m_row, const float* sx, int64_t nb) {
  float s = 0.f;
  for (int64_t b = 0; b < nb; ++b) s += half_to_float(m_row + b) * sx[b];
  return s;
}

// ---- the chunked Q4 layout (kiln/kernels/quant_matmul.py: pack_q4) ------------------------------
// A row's blocks come in chunks of CHUNK_BLOCKS; chunk c (first block c) is 256 bytes at byte 16 c,
// 8 groups of 32: byte 2j + h of group g holds element 2g + h of the chunk's block j (low nibble) and
// element 2g + 16 + h (high nibble). Zero-extended to int16, group g's low nibbles are the vector
// whose int32 lane j holds elements 2g, 2g + 1 of block j, its high nibbles elements 2g + 16, 2g + 17:
// an integer dot product over a chunk keeps each block in its own lane, so the scales are applied
// once per 16 blocks instead of once per block (the per-block convert and multiply-add cost as much
// as the integer multiply-adds themselves). The nb % 16 blocks after the last chunk keep the pair
// layout exactly where it would put them (pair b / 2 at byte 32 (b / 2), nibble b % 2), as do all
// blocks of the Q5 layout.
constexpr int64_t CHUNK_BLOCKS = 16;

inline int64_t full_chunk_blocks(int64_t nb) { return nb / CHUNK_BLOCKS * CHUNK_BLOCKS; }

#ifdef KILN_AVX512
// r[i] lane j → r[j] lane i for 16 vectors of 16 int32 lanes (unpack 32 / 64-bit, then two 128-bit lane shuffles).
inline void transpose16x16_epi32(__m512i (&r)[16]) {
  __m512i a[16], b[16];
  for (int k = 0; k < 8; ++k) {
    a[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    a[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // 128-bit lane L of b[4k + m]: elements 4L + m of r[4k .. 4k + 3]
    b[4 * k] = _mm512_unpacklo_epi64(a[4 * k], a[4 * k + 2]);
    b[4 * k + 1] = _mm512_unpackhi_epi64(a[4 * k], a[4 * k + 2]);
    b[4 * k + 2] = _mm512_unpacklo_epi64(a[4 * k + 1], a[4 * k + 3]);
    b[4 * k + 3] = _mm512_unpackhi_epi64(a[4 * k + 1], a[4 * k + 3]);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0x44), c1 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0xEE);
    const __m512i d0 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0x44), d1 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0xEE);
    r[m] = _mm512_shuffle_i32x4(c0, d0, 0x88);
    r[4 + m] = _mm512_shuffle_i32x4(c0, d0, 0xDD);
    r[8 + m] = _mm512_shuffle_i32x4(c1, d1, 0x88);
    r[12 + m] = _mm512_shuffle_i32x4(c1, d1, 0xDD);
  }
}
#endif

// One row's 4-bit values in element order: out[b * 32 + j] = element j of block b.
// chunked: the Q4 layout above; otherwise the pair layout (Q5's low bits).
inline void unpack_q4_row(const uint8_t* row, int64_t nb, bool chunked, uint8_t* out) {
  const int64_t full = chunked ? full_chunk_blocks(nb) : 0;
  for (int64_t c = 0; c < full; c += CHUNK_BLOCKS) {
    const uint8_t* chunk = row + c * (QK / 2);
#ifdef KILN_AVX512
    // The chunk's 16 nibble-plane vectors (lane j: a pair of block j's elements) transposed: vector
    // j is then block j's 32 elements in order.
    const __m512i low_mask = _mm512_set1_epi16(0x0F);
    __m512i v[16];
    for (int g = 0; g < 8; ++g) {
      const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + g * QK)));
      v[g] = _mm512_and_si512(w, low_mask);
      v[g + 8] = _mm512_srli_epi16(w, 4);
    }
    transpose16x16_epi32(v);
    for (int j = 0; j < 16; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (c + j) * QK), _mm512_cvtepi16_epi8(v[j]));
#else
    for (int g = 0; g < 8; ++g)
      for (int j = 0; j < static_cast<int>(CHUNK_BLOCKS); ++j)
        for (int h = 0; h < 2; ++h) {
          const uint8_t byte = chunk[g * QK + 2 * j + h];
          out[(c + j) * QK + 2 * g + h] = byte & 0x0F;
          out[(c + j) * QK + 2 * g + 16 + h] = byte >> 4;
        }
#endif
  }
  for (int64_t b = full; b < nb; ++b) {
    const uint8_t* pair = row + (b / 2) * QK;
    const int shift = static_cast<int>(b % 2) * 4;
    for (int j = 0; j < QK; ++j) out[b * QK + j] = (pair[j] >> shift) & 0x0F;
  }
}

// xr.qt: each activation row with its full chunks in the chunked order — the int16 pair t of block
// j moves to pair position 16 t + j of its chunk (a 16 x 16 transpose of pairs), so that vector t of
// a chunk meets the weight vector holding elements 2t, 2t + 1 of every block. The tail is unchanged.
inline void transpose_chunks(QuantizedRows& xr, int64_t M, int64_t K) {
  const int64_t full = full_chunk_blocks(K / QK);
#ifdef KILN_AVX512
  if (int8_activations()) {  // xr.q8t instead (see QuantizedRows): quad t of block j → lane j of vector t
    xr.q8t.assign(M * K, 0);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t c = 0; c < full; c += CHUNK_BLOCKS)
        for (int j = 0; j < static_cast<int>(CHUNK_BLOCKS); ++j)
          for (int t = 0; t < 8; ++t)
            for (int e = 0; e < 4; ++e)
              xr.q8t[i * K + c * QK + (t * CHUNK_BLOCKS + j) * 4 + e] =
                  static_cast<int8_t>(xr.q[i * K + (c + j) * QK + 4 * t + e]);
    return;
  }
#endif
  xr.qt = xr.q;
  for (int64_t i = 0; i < M; ++i) {
    const int16_t* src = xr.q.data() + i * K;
    int16_t* dst = xr.qt.data() + i * K;
    for (int64_t c = 0; c < full; c += CHUNK_BLOCKS)
      for (int j = 0; j < static_cast<int>(CHUNK_BLOCKS); ++j)
        for (int t = 0; t < 16; ++t) {
          const int16_t* from = src + (c + j) * QK + 2 * t;
          int16_t* to = dst + c * QK + (t * CHUNK_BLOCKS + j) * 2;
          to[0] = from[0];
          to[1] = from[1];
        }
  }
}

// Portable path: one output row against one activation row (H: Q5 high bits in qh_row).
template <bool Q4, bool H = false>
float row_dot_scalar(const uint8_t* qs_row, const c10::Half* d_row, const c10::Half* m_row, const QuantizedRows& xr,
                     int64_t mi, int64_t K, const uint32_t* qh_row = nullptr) {
  const int64_t nb = K / QK;
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const int16_t* xq = xr.q.data() + mi * K + b * QK;
    int32_t s = 0;
    if constexpr (Q4) {
      const uint8_t* pair = qs_row + (b / 2) * QK;
      const int shift = (b % 2) * 4;
      if constexpr (H) {
        const uint32_t h = qh_row[b];
        for (int j = 0; j < QK; ++j)
          s += static_cast<int32_t>(((pair[j] >> shift) & 0x0F) | (((h >> j) & 1u) << 4)) * xq[j];
      } else if (b < full_chunk_blocks(nb)) {  // the chunked layout (see unpack_q4_row)
        const uint8_t* group = qs_row + (b / CHUNK_BLOCKS) * CHUNK_BLOCKS * (QK / 2) + (b % CHUNK_BLOCKS) * 2;
        for (int j = 0; j < QK; ++j) {
          const uint8_t byte = group[((j & 15) / 2) * QK + (j % 2)];
          s += static_cast<int32_t>(j < 16 ? (byte & 0x0F) : (byte >> 4)) * xq[j];
        }
      } else {
        for (int j = 0; j < QK; ++j) s += static_cast<int32_t>((pair[j] >> shift) & 0x0F) * xq[j];
      }
    } else {
      const int8_t* q = reinterpret_cast<const int8_t*>(qs_row) + b * QK;
      for (int j = 0; j < QK; ++j) s += static_cast<int32_t>(q[j]) * xq[j];
    }
    acc += half_to_float(d_row + b) * xr.dx[mi * nb + b] * static_cast<float>(s);
  }
  if constexpr (Q4) acc += min_term(m_row, xr.sx.data() + mi * nb, nb);
  return acc;
}

#if defined(KILN_AVX512) || defined(KILN_AVX2)
// Software prefetch distance in output rows: the tile NR rows ahead is 2-5 KB away, about the time
// one tile takes, so its lines arrive as they are needed. Row streams of 300-600 bytes are too
// short for the hardware prefetcher to catch up on (measured: the 49152 x 576 Q8_0 LM head ran at
// 12.6 GB/s from DRAM without it).
constexpr int64_t PREFETCH_ROWS = 8;
// A second, farther prefetch into L2 keeps more DRAM lines in flight than the near L1 one alone: the
// 49152 x 576 Q8_0 LM head read from DRAM (cold cache, 2 threads) took 1.95 ms with the L1 prefetch only
// and 1.09 ms with this one added (24, 32 and 64 rows ahead: 1.30, 1.09, 1.23 ms; AMD EPYC, 2026-11-30);
// single-stream decode of the default model went from 7.6 to 6.2 ms per step.
constexpr int64_t PREFETCH_ROWS_L2 = 4 * PREFETCH_ROWS;

// Every cache line of [p, p + bytes) into the cache `hint` names. The chunked kernels prefetch the rows
// of a later tile whole at the start of a tile: prefetching inside the chunk loop missed the line of
// a row's tail blocks (rows of 288 or 576 bytes straddle lines), whose demand misses stalled the
// stream (a DRAM-bound 3072 x 576 Q4 matmul ran ~7 % slower than the pair-layout kernel before this).
template <int HINT>
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  const uintptr_t first = reinterpret_cast<uintptr_t>(c) & ~static_cast<uintptr_t>(63);
  const uintptr_t last = reinterpret_cast<uintptr_t>(c + bytes - 1);
  for (uintptr_t a = first; a <= last; a += 64) _mm_prefetch(reinterpret_cast<const char*>(a), static_cast<_mm_hint>(HINT));
}
#endif

#ifdef KILN_AVX512
// Blocks are walked in chunks of 16. For each chunk the combined scales d[r,b] * dx[i,b] of the
// NR x MC (output row, activation row) pairs are computed 16 at a time (one vcvtph2ps and one
// multiply per pair) into `sc`, so the per-block inner step is only vpmaddwd, a conversion and an
// FMA whose scale operand is an embedded broadcast from `sc` (a load, not a shuffle-port uop).
// The Q4 min term m[r,b] * dx[i,b] * sum(xq_b) is folded into the same accumulators, 16 blocks per
// FMA, instead of a scalar loop per output row.
constexpr int64_t CHUNK = 16;

template <int NR, int MC>
inline void accumulate_block(__m512 (&acc)[NR][MC], const __m512i (&w)[NR], const float (&sc)[NR][MC][CHUNK],
                             int j, const QuantizedRows& xr, int64_t m0, int64_t K, int64_t b) {
  for (int i = 0; i < MC; ++i) {
    const __m512i xv = _mm512_loadu_si512(xr.q.data() + (m0 + i) * K + b * QK);
    for (int r = 0; r < NR; ++r)
      acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(w[r], xv)), _mm512_set1_ps(sc[r][i][j]),
                                  acc[r][i]);
  }
}

// NR output rows x MC activation rows per pass: each unpacked weight block is reused MC times
// and each activation block NR times, and the NR*MC accumulators are independent FMA chains.
template <bool Q4, bool H, int NR, int MC>
void tile_dot_avx512(const uint8_t* qs, int64_t row_bytes, const c10::Half* d, const c10::Half* m,
                     const uint32_t* qh, const QuantizedRows& xr, int64_t m0, int64_t K, float* out /* [NR][MC] */) {
  const int64_t nb = K / QK;
  __m512 acc[NR][MC];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) acc[r][i] = _mm512_setzero_ps();
  alignas(64) float sc[NR][MC][CHUNK];
  const __m512i low_mask = _mm512_set1_epi16(0x0F);
  const __m512i sixteen = _mm512_set1_epi16(16);
  for (int64_t c = 0; c < nb; c += CHUNK) {
    const int64_t cn = std::min<int64_t>(CHUNK, nb - c);
    const __mmask16 mask = static_cast<__mmask16>((1u << cn) - 1u);
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(d + (r + PREFETCH_ROWS) * nb + c), _MM_HINT_T0);
      if constexpr (Q4) _mm_prefetch(reinterpret_cast<const char*>(m + (r + PREFETCH_ROWS) * nb + c), _MM_HINT_T0);
      const __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, d + r * nb + c));
      for (int i = 0; i < MC; ++i) {
        const __m512 dxv = _mm512_maskz_loadu_ps(mask, xr.dx.data() + (m0 + i) * nb + c);
        _mm512_store_ps(sc[r][i], _mm512_mul_ps(dv, dxv));
      }
      if constexpr (Q4) {
        const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, m + r * nb + c));
        for (int i = 0; i < MC; ++i)
          acc[r][i] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(mask, xr.sx.data() + (m0 + i) * nb + c), acc[r][i]);
      }
    }
    if constexpr (Q4) {
      for (int64_t b = c; b < c + cn; b += 2) {  // c is even, so b walks whole pairs
        __m512i lo[NR], hi[NR];
        for (int r = 0; r < NR; ++r) {
          if ((b & 2) == 0) {  // one prefetch per 64-byte line (two pairs)
            _mm_prefetch(reinterpret_cast<const char*>(qs + (r + PREFETCH_ROWS) * row_bytes + (b / 2) * QK), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(qs + (r + PREFETCH_ROWS_L2) * row_bytes + (b / 2) * QK), _MM_HINT_T1);
          }
          const __m512i v = _mm512_cvtepu8_epi16(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + r * row_bytes + (b / 2) * QK)));
          lo[r] = _mm512_and_si512(v, low_mask);
          hi[r] = _mm512_srli_epi16(v, 4);  // the upper byte is zero after zero-extension
          if constexpr (H) {  // Q5: 16 more in the lanes whose high bit is set
            lo[r] = _mm512_mask_add_epi16(lo[r], static_cast<__mmask32>(qh[r * nb + b]), lo[r], sixteen);
            if (b + 1 < nb)
              hi[r] = _mm512_mask_add_epi16(hi[r], static_cast<__mmask32>(qh[r * nb + b + 1]), hi[r], sixteen);
          }
        }
        accumulate_block<NR, MC>(acc, lo, sc, static_cast<int>(b - c), xr, m0, K, b);
        if (b + 1 < nb) accumulate_block<NR, MC>(acc, hi, sc, static_cast<int>(b + 1 - c), xr, m0, K, b + 1);
      }
    } else {
      for (int64_t b = c; b < c + cn; ++b) {
        __m512i w[NR];
        for (int r = 0; r < NR; ++r) {
          if ((b & 1) == 0) {  // one prefetch per 64-byte line (two blocks)
            _mm_prefetch(reinterpret_cast<const char*>(qs + (r + PREFETCH_ROWS) * row_bytes + b * QK), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(qs + (r + PREFETCH_ROWS_L2) * row_bytes + b * QK), _MM_HINT_T1);
          }
          w[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + r * row_bytes + b * QK)));
        }
        accumulate_block<NR, MC>(acc, w, sc, static_cast<int>(b - c), xr, m0, K, b);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) out[r * MC + i] = _mm512_reduce_add_ps(acc[r][i]);
}



// int32 lanes += pairwise products of int16 lanes: one vpdpwssd with AVX512-VNNI, else vpmaddwd + add.
inline __m512i dot_pairs(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

// int32 lanes += sums of four products of u8 (a) and s8 (b) lanes: one vpdpbusd with AVX512-VNNI, else
// vpmaddubsw (|pair sum| <= 2 * 15 * 127: no saturation) + vpmaddwd by ones + add.
inline __m512i dot_quads(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1)));
#endif
}

// The Q4 block kernel on the chunked layout: NR output rows x MC activation rows. Per chunk, the
// NR * MC int32 accumulators hold one block per lane; at the chunk's end one convert and one
// multiply-add per accumulator apply the 16 blocks' scales d * dx (and one more adds the min term
// m * dx * sum(xq)). Integer block dot products are exact (|lane| <= 32 * 15 * 32767 < 2^31), as in
// the pair-layout kernel; only the float summation order differs. The tail blocks run the
// pair-layout inner step, scaled block by block.
template <int NR, int MC>
void tile_dot_q4_chunked_avx512(const uint8_t* qs, int64_t row_bytes, const c10::Half* d, const c10::Half* m,
                                const QuantizedRows& xr, int64_t m0, int64_t K, float* out /* [NR][MC] */) {
  const int64_t nb = K / QK, full = full_chunk_blocks(nb);
  __m512 acc[NR][MC];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int r = 0; r < NR; ++r) {  // the rows PREFETCH_ROWS (L1) and PREFETCH_ROWS_L2 ahead, whole
    prefetch_bytes<_MM_HINT_T0>(qs + (r + PREFETCH_ROWS) * row_bytes, row_bytes);
    prefetch_bytes<_MM_HINT_T1>(qs + (r + PREFETCH_ROWS_L2) * row_bytes, row_bytes);
  }
  const __m512i low_mask = _mm512_set1_epi16(0x0F);
  const bool int8 = !xr.q8t.empty();
  // int8: words 2j and 2j + 1 of the permuted 64 bytes are word j of group g and of group g + 1, so int32
  // lane j holds bytes (j, 0), (j, 1) of both groups: elements 2g .. 2g + 3 of block j in the low nibbles
  // and 2g + 16 .. 2g + 19 in the high ones, which meet xr.q8t's vectors g / 2 and g / 2 + 4
  const __m512i pair_words = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t c = 0; c < full; c += CHUNK_BLOCKS) {
    const int64_t chunk_byte = c * (QK / 2);
    __m512i ia[NR][MC];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MC; ++i) ia[r][i] = _mm512_setzero_si512();
    if (int8) {
      for (int t = 0; t < 4; ++t) {
        __m512i xlo[MC], xhi[MC];
        for (int i = 0; i < MC; ++i) {
          const int8_t* xc = xr.q8t.data() + (m0 + i) * K + c * QK;
          xlo[i] = _mm512_loadu_si512(xc + t * 64);
          xhi[i] = _mm512_loadu_si512(xc + (t + 4) * 64);
        }
        for (int r = 0; r < NR; ++r) {  // each row's two nibble vectors die at once: no spills at NR = 8
          const __m512i v = _mm512_permutexvar_epi16(pair_words, _mm512_loadu_si512(qs + r * row_bytes + chunk_byte + t * 64));
          const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
          for (int i = 0; i < MC; ++i) ia[r][i] = dot_quads(dot_quads(ia[r][i], lo, xlo[i]), hi, xhi[i]);
        }
      }
    }
    for (int g = 0; g < 8 && !int8; ++g) {
      __m512i lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) {
        const uint8_t* src = qs + r * row_bytes + chunk_byte + g * QK;
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
        lo[r] = _mm512_and_si512(v, low_mask);
        hi[r] = _mm512_srli_epi16(v, 4);  // the upper byte is zero after zero-extension
      }
      for (int i = 0; i < MC; ++i) {
        const int16_t* xc = xr.qt.data() + (m0 + i) * K + c * QK;
        const __m512i xlo = _mm512_loadu_si512(xc + g * QK), xhi = _mm512_loadu_si512(xc + (g + 8) * QK);
        for (int r = 0; r < NR; ++r) ia[r][i] = dot_pairs(dot_pairs(ia[r][i], lo[r], xlo), hi[r], xhi);
      }
    }
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(d + (r + PREFETCH_ROWS) * nb + c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(m + (r + PREFETCH_ROWS) * nb + c), _MM_HINT_T0);
      const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + r * nb + c)));
      const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + r * nb + c)));
      for (int i = 0; i < MC; ++i) {
        const __m512 dxv = _mm512_loadu_ps(xr.dx.data() + (m0 + i) * nb + c);
        const __m512 sxv = _mm512_loadu_ps(xr.sx.data() + (m0 + i) * nb + c);
        acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r][i]), _mm512_mul_ps(dv, dxv), acc[r][i]);
        acc[r][i] = _mm512_fmadd_ps(mv, sxv, acc[r][i]);
      }
    }
  }
  float tail[NR][MC] = {};
  for (int64_t b = full; b < nb; b += 2) {  // full is even, so b walks whole pairs
    __m512i lo[NR], hi[NR];
    for (int r = 0; r < NR; ++r) {
      const __m512i v = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + r * row_bytes + (b / 2) * QK)));
      lo[r] = _mm512_and_si512(v, low_mask);
      hi[r] = _mm512_srli_epi16(v, 4);
    }
    for (int i = 0; i < MC; ++i) {
      const int64_t xi = (m0 + i) * nb;
      const __m512i x0 = _mm512_loadu_si512(xr.q.data() + (m0 + i) * K + b * QK);
      for (int r = 0; r < NR; ++r) {
        const float s0 = half_to_float(d + r * nb + b) * xr.dx[xi + b];
        acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(lo[r], x0)), _mm512_set1_ps(s0), acc[r][i]);
        tail[r][i] += half_to_float(m + r * nb + b) * xr.sx[xi + b];
      }
      if (b + 1 < nb) {
        const __m512i x1 = _mm512_loadu_si512(xr.q.data() + (m0 + i) * K + (b + 1) * QK);
        for (int r = 0; r < NR; ++r) {
          const float s1 = half_to_float(d + r * nb + b + 1) * xr.dx[xi + b + 1];
          acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(hi[r], x1)), _mm512_set1_ps(s1), acc[r][i]);
          tail[r][i] += half_to_float(m + r * nb + b + 1) * xr.sx[xi + b + 1];
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) out[r * MC + i] = _mm512_reduce_add_ps(acc[r][i]) + tail[r][i];
}

#endif

#ifdef KILN_AVX2
// The AVX2 twin of accumulate_block: a 32-element block is two 16 x int16 halves. The two
// halves' vpmaddwd results are added in int32 (at most 2 * 2 * 127 * 32767 per lane: exact) before
// the one conversion to float, so a block's integer dot product stays exact as on AVX-512.
template <int NR, int MC>
inline void accumulate_block_avx2(__m256 (&acc)[NR][MC], const __m256i (&w)[NR][2], const c10::Half* d, int64_t nb,
                                  const QuantizedRows& xr, int64_t m0, int64_t K, int64_t b) {
  float dw[NR];
  for (int r = 0; r < NR; ++r) dw[r] = half_to_float(d + r * nb + b);
  for (int i = 0; i < MC; ++i) {
    const int16_t* xp = xr.q.data() + (m0 + i) * K + b * QK;
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 16));
    const float dx = xr.dx[(m0 + i) * nb + b];
    for (int r = 0; r < NR; ++r) {
      const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(w[r][0], x0), _mm256_madd_epi16(w[r][1], x1));
      acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dw[r] * dx), acc[r][i]);
    }
  }
}

// Q5 high bits of one block as two 16 x int16 vectors of 0 / 16 (lane j: bit j of the word).
inline void high_bits_avx2(uint32_t h, __m256i (&out)[2]) {
  const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                        static_cast<int16_t>(-32768));
  const __m256i sixteen = _mm256_set1_epi16(16);
  for (int half = 0; half < 2; ++half) {
    const __m256i word = _mm256_set1_epi16(static_cast<int16_t>((h >> (16 * half)) & 0xFFFFu));
    const __m256i set = _mm256_cmpeq_epi16(_mm256_and_si256(word, bit), bit);
    out[half] = _mm256_and_si256(set, sixteen);
  }
}

template <bool Q4, bool H, int NR, int MC>
void tile_dot_avx2(const uint8_t* qs, int64_t row_bytes, const c10::Half* d, const c10::Half* m,
                   const uint32_t* qh, const QuantizedRows& xr, int64_t m0, int64_t K, float* out /* [NR][MC] */) {
  const int64_t nb = K / QK;
  __m256 acc[NR][MC];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int r = 0; r < NR; ++r) {  // as the AVX-512 kernels: later tiles' rows whole, to L1 and farther to L2
    prefetch_bytes<_MM_HINT_T0>(qs + (r + PREFETCH_ROWS) * row_bytes, row_bytes);
    prefetch_bytes<_MM_HINT_T1>(qs + (r + PREFETCH_ROWS_L2) * row_bytes, row_bytes);
    prefetch_bytes<_MM_HINT_T0>(d + (r + PREFETCH_ROWS) * nb, nb * 2);
  }
  if constexpr (Q4) {
    const __m256i low_mask = _mm256_set1_epi16(0x0F);
    for (int64_t b = 0; b < nb; b += 2) {
      __m256i lo[NR][2], hi[NR][2];
      for (int r = 0; r < NR; ++r) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + r * row_bytes + (b / 2) * QK));
        const __m256i v0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(raw));
        const __m256i v1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(raw, 1));
        lo[r][0] = _mm256_and_si256(v0, low_mask);
        lo[r][1] = _mm256_and_si256(v1, low_mask);
        hi[r][0] = _mm256_srli_epi16(v0, 4);  // zero-extended bytes: the shift leaves the high nibble
        hi[r][1] = _mm256_srli_epi16(v1, 4);
        if constexpr (H) {
          __m256i add[2];
          high_bits_avx2(qh[r * nb + b], add);
          lo[r][0] = _mm256_add_epi16(lo[r][0], add[0]);
          lo[r][1] = _mm256_add_epi16(lo[r][1], add[1]);
          if (b + 1 < nb) {
            high_bits_avx2(qh[r * nb + b + 1], add);
            hi[r][0] = _mm256_add_epi16(hi[r][0], add[0]);
            hi[r][1] = _mm256_add_epi16(hi[r][1], add[1]);
          }
        }
      }
      accumulate_block_avx2<NR, MC>(acc, lo, d, nb, xr, m0, K, b);
      if (b + 1 < nb) accumulate_block_avx2<NR, MC>(acc, hi, d, nb, xr, m0, K, b + 1);
    }
  } else {
    for (int64_t b = 0; b < nb; ++b) {
      __m256i w[NR][2];
      for (int r = 0; r < NR; ++r) {
        const uint8_t* src = qs + r * row_bytes + b * QK;
        w[r][0] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
        w[r][1] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16)));
      }
      accumulate_block_avx2<NR, MC>(acc, w, d, nb, xr, m0, K, b);
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < MC; ++i) {
      float v = hsum256(acc[r][i]);
      if constexpr (Q4) v += min_term(m + r * nb, xr.sx.data() + (m0 + i) * nb, nb);
      out[r * MC + i] = v;
    }
  }
}


// The chunked Q4 kernel on AVX2 (see tile_dot_q4_chunked_avx512): a chunk's 16 block lanes are two
// 8-lane halves (blocks 0-7 and 8-15 of the chunk), accumulated with vpmaddwd + add in int32.
template <int NR, int MC>
void tile_dot_q4_chunked_avx2(const uint8_t* qs, int64_t row_bytes, const c10::Half* d, const c10::Half* m,
                              const QuantizedRows& xr, int64_t m0, int64_t K, float* out /* [NR][MC] */) {
  const int64_t nb = K / QK, full = full_chunk_blocks(nb);
  __m256 acc[NR][MC];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int r = 0; r < NR; ++r) {  // the rows PREFETCH_ROWS (L1) and PREFETCH_ROWS_L2 ahead, whole
    prefetch_bytes<_MM_HINT_T0>(qs + (r + PREFETCH_ROWS) * row_bytes, row_bytes);
    prefetch_bytes<_MM_HINT_T1>(qs + (r + PREFETCH_ROWS_L2) * row_bytes, row_bytes);
    prefetch_bytes<_MM_HINT_T0>(d + (r + PREFETCH_ROWS) * nb, nb * 2);
    prefetch_bytes<_MM_HINT_T0>(m + (r + PREFETCH_ROWS) * nb, nb * 2);
  }
  const __m256i low_mask = _mm256_set1_epi16(0x0F);
  for (int64_t c = 0; c < full; c += CHUNK_BLOCKS) {
    for (int r = 0; r < NR; ++r) {
      __m256i ia[MC][2];
      for (int i = 0; i < MC; ++i) ia[i][0] = ia[i][1] = _mm256_setzero_si256();
      for (int g = 0; g < 8; ++g) {
        const __m256i raw =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + r * row_bytes + c * (QK / 2) + g * QK));
        const __m256i v0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(raw));       // blocks 0-7
        const __m256i v1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(raw, 1));  // blocks 8-15
        const __m256i lo0 = _mm256_and_si256(v0, low_mask), lo1 = _mm256_and_si256(v1, low_mask);
        const __m256i hi0 = _mm256_srli_epi16(v0, 4), hi1 = _mm256_srli_epi16(v1, 4);
        for (int i = 0; i < MC; ++i) {
          const int16_t* xc = xr.qt.data() + (m0 + i) * K + c * QK;
          const __m256i* xl = reinterpret_cast<const __m256i*>(xc + g * QK);
          const __m256i* xh = reinterpret_cast<const __m256i*>(xc + (g + 8) * QK);
          ia[i][0] = _mm256_add_epi32(ia[i][0], _mm256_add_epi32(_mm256_madd_epi16(lo0, _mm256_loadu_si256(xl)),
                                                                 _mm256_madd_epi16(hi0, _mm256_loadu_si256(xh))));
          ia[i][1] = _mm256_add_epi32(ia[i][1], _mm256_add_epi32(_mm256_madd_epi16(lo1, _mm256_loadu_si256(xl + 1)),
                                                                 _mm256_madd_epi16(hi1, _mm256_loadu_si256(xh + 1))));
        }
      }
      for (int half = 0; half < 2; ++half) {
        const int64_t b0 = c + 8 * half;
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + r * nb + b0)));
        const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + r * nb + b0)));
        for (int i = 0; i < MC; ++i) {
          const __m256 dxv = _mm256_loadu_ps(xr.dx.data() + (m0 + i) * nb + b0);
          const __m256 sxv = _mm256_loadu_ps(xr.sx.data() + (m0 + i) * nb + b0);
          acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[i][half]), _mm256_mul_ps(dv, dxv), acc[r][i]);
          acc[r][i] = _mm256_fmadd_ps(mv, sxv, acc[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < MC; ++i) {
      float v = hsum256(acc[r][i]);
      // the tail in the pair layout (at most 15 blocks per row): the block's exact integer dot product
      // with vpmaddwd (the portable step's sum, bit for bit), then the portable step's float arithmetic
      for (int64_t b = full; b < nb; ++b) {
        const uint8_t* pair = qs + r * row_bytes + (b / 2) * QK;
        const int shift = static_cast<int>(b % 2) * 4;
        const int16_t* xq = xr.q.data() + (m0 + i) * K + b * QK;
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair));
        const __m256i w0 = _mm256_and_si256(_mm256_srl_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(raw)),
                                                             _mm_cvtsi32_si128(shift)), low_mask);
        const __m256i w1 = _mm256_and_si256(_mm256_srl_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(raw, 1)),
                                                             _mm_cvtsi32_si128(shift)), low_mask);
        const __m256i s = _mm256_add_epi32(
            _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))),
            _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16))));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        const int32_t sum = _mm_cvtsi128_si32(s4);
        v += half_to_float(d + r * nb + b) * xr.dx[(m0 + i) * nb + b] * static_cast<float>(sum) +
             half_to_float(m + r * nb + b) * xr.sx[(m0 + i) * nb + b];
      }
      out[r * MC + i] = v;
    }
  }
}

#endif

#if defined(KILN_AVX512) || defined(KILN_AVX2)
// Only one SIMD tile is compiled (the #if/#elif above are exclusive): it is tile_dot_simd.
template <bool Q4, bool H, int NR, int MC>
inline void tile_dot_simd(const uint8_t* qs, int64_t row_bytes, const c10::Half* d, const c10::Half* m,
                          const uint32_t* qh, const QuantizedRows& xr, int64_t m0, int64_t K, float* out) {
#ifdef KILN_AVX512
  tile_dot_avx512<Q4, H, NR, MC>(qs, row_bytes, d, m, qh, xr, m0, K, out);
#else
  tile_dot_avx2<Q4, H, NR, MC>(qs, row_bytes, d, m, qh, xr, m0, K, out);
#endif
}

// Runtime activation-row count (1..4) → the compiled tile for it.
template <bool Q4, bool H, int NR>
void tile_dot(int64_t mc, const uint8_t* qs, int64_t row_bytes, const c10::Half* d, const c10::Half* m,
              const uint32_t* qh, const QuantizedRows& xr, int64_t m0, int64_t K, float* out) {
  switch (mc) {
    case 1: tile_dot_simd<Q4, H, NR, 1>(qs, row_bytes, d, m, qh, xr, m0, K, out); break;
    case 2: tile_dot_simd<Q4, H, NR, 2>(qs, row_bytes, d, m, qh, xr, m0, K, out); break;
    case 3: tile_dot_simd<Q4, H, NR, 3>(qs, row_bytes, d, m, qh, xr, m0, K, out); break;
    default: tile_dot_simd<Q4, H, NR, 4>(qs, row_bytes, d, m, qh, xr, m0, K, out); break;
  }
}
#endif

template <bool Q4, typename T, bool H = false>
void quant_matmul_impl(const QuantizedRows& xr, const uint8_t* qp, const c10::Half* dp, const c10::Half* mp,
                       int64_t M, int64_t N, int64_t K, int64_t row_bytes, T* yp, const uint32_t* qhp = nullptr) {
  const int64_t nb = K / QK;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
#if defined(KILN_AVX512) || defined(KILN_AVX2)
#ifdef KILN_AVX512
    constexpr int NR = 4;
#else
    constexpr int NR = 2;  // 16 ymm registers: 2 rows x 4 activation rows of accumulators + unpacked weights
#endif
    float tmp[NR * 4];
    for (; n + NR <= end; n += NR) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mc = std::min<int64_t>(4, M - m0);
        tile_dot<Q4, H, NR>(mc, qp + n * row_bytes, row_bytes, dp + n * nb, Q4 ? mp + n * nb : nullptr,
                            H ? qhp + n * nb : nullptr, xr, m0, K, tmp);
        for (int r = 0; r < NR; ++r)
          for (int64_t i = 0; i < mc; ++i) yp[(m0 + i) * N + n + r] = static_cast<T>(tmp[r * mc + i]);
      }
    }
#endif
    for (; n < end; ++n)
      for (int64_t i = 0; i < M; ++i)
        yp[i * N + n] = static_cast<T>(
            row_dot_scalar<Q4, H>(qp + n * row_bytes, dp + n * nb, Q4 ? mp + n * nb : nullptr, xr, i, K,
                                  H ? qhp + n * nb : nullptr));
  });
}

#if defined(KILN_AVX512) || defined(KILN_AVX2)
template <int NR, int MC>
inline void tile_q4_chunked(const uint8_t* qs, int64_t row_bytes, const c10::Half* d, const c10::Half* m,
                            const QuantizedRows& xr, int64_t m0, int64_t K, float* out) {
#ifdef KILN_AVX512
  tile_dot_q4_chunked_avx512<NR, MC>(qs, row_bytes, d, m, xr, m0, K, out);
#else
  tile_dot_q4_chunked_avx2<NR, MC>(qs, row_bytes, d, m, xr, m0, K, out);
#endif
}

// NR output rows from row n against every activation row, in passes of up to MCMAX (one tile per pass).
template <int NR, int MCMAX, typename T>
inline void q4_chunked_rows(const QuantizedRows& xr, const uint8_t* qp, const c10::Half* dp, const c10::Half* mp,
                            int64_t n, int64_t M, int64_t N, int64_t K, int64_t row_bytes, T* yp) {
  const int64_t nb = K / QK;
  float tmp[NR * MCMAX];
  const uint8_t* qs = qp + n * row_bytes;
  const c10::Half* d = dp + n * nb;
  const c10::Half* m = mp + n * nb;
  for (int64_t m0 = 0; m0 < M; m0 += MCMAX) {
    const int64_t mc = std::min<int64_t>(MCMAX, M - m0);
    if (mc == 1) tile_q4_chunked<NR, 1>(qs, row_bytes, d, m, xr, m0, K, tmp);
    else if constexpr (MCMAX == 2) tile_q4_chunked<NR, 2>(qs, row_bytes, d, m, xr, m0, K, tmp);
    else if (mc == 2) tile_q4_chunked<NR, 2>(qs, row_bytes, d, m, xr, m0, K, tmp);
    else if (mc == 3) tile_q4_chunked<NR, 3>(qs, row_bytes, d, m, xr, m0, K, tmp);
    else tile_q4_chunked<NR, MCMAX>(qs, row_bytes, d, m, xr, m0, K, tmp);
    for (int r = 0; r < NR; ++r)
      for (int64_t i = 0; i < mc; ++i) yp[(m0 + i) * N + n + r] = static_cast<T>(tmp[r * mc + i]);
  }
}

// The Q4 block kernel on the chunked layout (xr.qt built): NR output rows per tile, activation rows in
// passes of up to MCMAX. Output rows past a thread's last whole tile run one-row tiles of the same
// arithmetic (not the portable loop): which rows fall there depends on NR, which depends on M, and an
// output must not change with the number of activation rows beside it (speculative verification must
// reproduce decode bit for bit; tests/test_quant_rows_independent.py).
template <int NR, int MCMAX, typename T>
void quant_matmul_q4_chunked(const QuantizedRows& xr, const uint8_t* qp, const c10::Half* dp, const c10::Half* mp,
                             int64_t M, int64_t N, int64_t K, int64_t row_bytes, T* yp) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
    for (; n + NR <= end; n += NR) q4_chunked_rows<NR, MCMAX>(xr, qp, dp, mp, n, M, N, K, row_bytes, yp);
    for (; n < end; ++n) q4_chunked_rows<1, MCMAX>(xr, qp, dp, mp, n, M, N, K, row_bytes, yp);
  });
}
#endif

// Q4 (chunked layout): the chunked SIMD kernel, or the portable loop.
template <typename T>
void quant_matmul_q4(QuantizedRows& xr, const uint8_t* qp, const c10::Half* dp, const c10::Half* mp, int64_t M,
                     int64_t N, int64_t K, int64_t row_bytes, T* yp) {
#if defined(KILN_AVX512)
  transpose_chunks(xr, M, K);
  // Tiles that keep every accumulator in a register (32 zmm): 8 output rows x 1-2 activation rows,
  // then 2 x 4 (on an AMD EPYC, 2026-11-30, 8 x 1 ran 1.4x faster than 4 x 1 at M = 1, and 2 x 4
  // 1.15x faster than 4 x 4 at M = 4-16)
  if (M <= 2) quant_matmul_q4_chunked<8, 2>(xr, qp, dp, mp, M, N, K, row_bytes, yp);
  else quant_matmul_q4_chunked<2, 4>(xr, qp, dp, mp, M, N, K, row_bytes, yp);
#elif defined(KILN_AVX2)
  transpose_chunks(xr, M, K);
  quant_matmul_q4_chunked<2, 4>(xr, qp, dp, mp, M, N, K, row_bytes, yp);
#else
  quant_matmul_impl<true>(xr, qp, dp, mp, M, N, K, row_bytes, yp);
#endif
}


// Checks Q5's high-bit plane: uint32 words (an int32 tensor) [N, K/32], one per block.
const uint32_t* high_bits(const at::Tensor& qh, const at::Tensor& d) {
  TORCH_CHECK(qh.scalar_type() == at::kInt && qh.is_contiguous() && qh.sizes() == d.sizes(),
              "qh must be an int32 [N, K/32] tensor of Q5 high bits");
  return reinterpret_cast<const uint32_t*>(qh.data_ptr<int32_t>());
}

at::Tensor quant_matmul_any(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                            bool is_q4, const at::Tensor* qh);

// y[M, N] = x[M, K] @ W^T for a block-quantized W, in x's dtype. Threads split N (torch's pool).
at::Tensor quant_matmul(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                        bool is_q4) {
  return quant_matmul_any(x_in, qs, d, m, is_q4, nullptr);
}

// The same for W in the Q5 layout (Q4 low bits + qh high bits; m = -16 d).
at::Tensor quant_matmul_q5(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& qh, const at::Tensor& d,
                           const at::Tensor& m) {
  return quant_matmul_any(x_in, qs, d, m, true, &qh);
}

at::Tensor quant_matmul_any(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                            bool is_q4, const at::Tensor* qh) {
  TORCH_CHECK(x_in.dim() == 2, "x must be [M, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = d.size(0), nb = K / QK;
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 32, got ", K);
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.dim() == 2 && d.size(1) == nb,
              "d must be float16 [N, K/32]");
  const int64_t row_bytes = is_q4 ? (nb + 1) / 2 * QK : K;
  TORCH_CHECK(qs.is_contiguous() && qs.size(0) == N && qs.numel() == N * row_bytes, "qs has ", qs.numel(),
              " bytes; expected ", N * row_bytes);
  if (is_q4) TORCH_CHECK(m.scalar_type() == at::kHalf && m.is_contiguous() && m.sizes() == d.sizes(), "m must match d");
  const auto* qp = static_cast<const uint8_t*>(qs.data_ptr());
  const auto* dp = d.data_ptr<c10::Half>();
  const auto* mp = is_q4 ? m.data_ptr<c10::Half>() : nullptr;
  at::Tensor y = at::empty({M, N}, x.options());
  if (qh != nullptr) {
    const uint32_t* qhp = high_bits(*qh, d);
    if (x.scalar_type() == at::kFloat) {
      const QuantizedRows xr = quantize_rows(x.data_ptr<float>(), M, K);
      quant_matmul_impl<true, float, true>(xr, qp, dp, mp, M, N, K, row_bytes, y.data_ptr<float>(), qhp);
    } else {
      const QuantizedRows xr = quantize_rows(x.data_ptr<c10::BFloat16>(), M, K);
      quant_matmul_impl<true, c10::BFloat16, true>(xr, qp, dp, mp, M, N, K, row_bytes, y.data_ptr<c10::BFloat16>(), qhp);
    }
    return y;
  }
  if (x.scalar_type() == at::kFloat) {
    QuantizedRows xr = quantize_rows(x.data_ptr<float>(), M, K);
    if (is_q4) quant_matmul_q4(xr, qp, dp, mp, M, N, K, row_bytes, y.data_ptr<float>());
    else quant_matmul_impl<false>(xr, qp, dp, mp, M, N, K, row_bytes, y.data_ptr<float>());
  } else {
    QuantizedRows xr = quantize_rows(x.data_ptr<c10::BFloat16>(), M, K);
    if (is_q4) quant_matmul_q4(xr, qp, dp, mp, M, N, K, row_bytes, y.data_ptr<c10::BFloat16>());
    else quant_matmul_impl<false>(xr, qp, dp, mp, M, N, K, row_bytes, y.data_ptr<c10::BFloat16>());
  }
  return y;
}

at::Tensor quant_dequantize_any(const at::Tensor& qs_in, const at::Tensor& d_in, const at::Tensor& m_in, bool is_q4,
                                at::ScalarType dtype, const at::Tensor* qh_in);

// W as a dense [N, K] tensor of `dtype` (for large M, where the dense GEMM wins).
at::Tensor quant_dequantize(const at::Tensor& qs_in, const at::Tensor& d_in, const at::Tensor& m_in, bool is_q4,
                            at::ScalarType dtype) {
  return quant_dequantize_any(qs_in, d_in, m_in, is_q4, dtype, nullptr);
}

at::Tensor quant_dequantize_q5(const at::Tensor& qs_in, const at::Tensor& qh_in, const at::Tensor& d_in,
                               const at::Tensor& m_in, at::ScalarType dtype) {
  return quant_dequantize_any(qs_in, d_in, m_in, true, dtype, &qh_in);
}

at::Tensor quant_dequantize_any(const at::Tensor& qs_in, const at::Tensor& d_in, const at::Tensor& m_in, bool is_q4,
                                at::ScalarType dtype, const at::Tensor* qh_in) {
  const at::Tensor qs = qs_in.contiguous(), d = d_in.contiguous(), m = m_in.contiguous();
  const at::Tensor qh = qh_in != nullptr ? qh_in->contiguous() : at::Tensor();
  const uint32_t* qhp = qh_in != nullptr ? high_bits(qh, d) : nullptr;
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.dim() == 2, "d must be float16 [N, K/32]");
  const int64_t N = d.size(0), nb = d.size(1), K = nb * QK;
  const int64_t row_bytes = is_q4 ? (nb + 1) / 2 * QK : K;
  TORCH_CHECK(qs.numel() == N * row_bytes, "qs has ", qs.numel(), " bytes; expected ", N * row_bytes);
  at::Tensor w = at::empty({N, K}, d.options().dtype(at::kFloat));
  const auto* qp = static_cast<const uint8_t*>(qs.data_ptr());
  const auto* dp = d.data_ptr<c10::Half>();
  const auto* mp = is_q4 ? m.data_ptr<c10::Half>() : nullptr;
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> elements(is_q4 ? K : 0);
    for (int64_t n = begin; n < end; ++n) {
      if (is_q4) unpack_q4_row(qp + n * row_bytes, nb, qhp == nullptr, elements.data());
      for (int64_t b = 0; b < nb; ++b) {
        const float db = half_to_float(dp + n * nb + b);
        float* out = wp + n * K + b * QK;
        if (is_q4) {
          const float mb = half_to_float(mp + n * nb + b);
          const uint8_t* e = elements.data() + b * QK;
          const uint32_t h = qhp != nullptr ? qhp[n * nb + b] : 0u;
          for (int j = 0; j < QK; ++j) out[j] = db * static_cast<float>(e[j] | (((h >> j) & 1u) << 4)) + mb;
        } else {
          const int8_t* q = reinterpret_cast<const int8_t*>(qp) + n * K + b * QK;
          for (int j = 0; j < QK; ++j) out[j] = db * static_cast<float>(q[j]);
        }
      }
    }
  });
  return dtype == at::kFloat ? w : w.to(dtype);
}

#ifdef KILN_AVX512
// ---- medium M (batched decode): fp32 GEMM on weights dequantized panel by panel ----------------
//
// Above ~16 rows the int16 block kernel loses to a dense fp32 GEMM (its per-block convert and
// scale cost as much as the multiply-adds), and torch's GEMM needs a resident fp32 copy of every
// weight (4x the Q8 / 8x the Q4 bytes) and reaches only about half the FMA peak on these skinny
// shapes (M = 17-128 rows, K = 576-1536). Here each thread dequantizes PANEL_ROWS output rows at
// a time into an L1-resident fp32 buffer (the same values as quant_dequantize) and runs a
// register-blocked micro-kernel over every activation row: 4 x rows x 6 weight rows = 24
// accumulators of 16 k-lanes, 10 loads per 24 FMAs, one horizontal add per output at the end.
// Summation runs along k in 16-lane partial sums; results match x @ dequantize(W)^T to fp32
// rounding (tests/test_quant_kernels.py).

// Rows [n0, n0 + nr) of W as fp32 [nr][K] (w = d * q + m, or d * q for Q8).
template <bool Q4, bool H = false>
void dequant_panel(const uint8_t* qs, int64_t row_bytes, const c10::Half* d, const c10::Half* m, int64_t nb,
                   int64_t n0, int nr, float* out, const uint32_t* qh = nullptr) {
  const int64_t K = nb * QK;
  const __m512i low = _mm512_set1_epi32(0x0F);
  const __m512i sixteen = _mm512_set1_epi32(16);
  std::vector<uint8_t> elements(Q4 && !H ? K : 0);
  for (int r = 0; r < nr; ++r) {
    const uint8_t* row = qs + (n0 + r) * row_bytes;
    const c10::Half* dr = d + (n0 + r) * nb;
    float* o = out + r * K;
    if constexpr (Q4 && !H) {  // the chunked layout: unpack to element order, then scale block by block
      const c10::Half* mr = m + (n0 + r) * nb;
      unpack_q4_row(row, nb, true, elements.data());
      for (int64_t b = 0; b < nb; ++b) {
        const __m512 db = _mm512_set1_ps(half_to_float(dr + b)), mb = _mm512_set1_ps(half_to_float(mr + b));
        for (int h = 0; h < 2; ++h) {
          const __m512i v = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(elements.data() + b * QK + 16 * h)));
          _mm512_storeu_ps(o + b * QK + 16 * h, _mm512_fmadd_ps(db, _mm512_cvtepi32_ps(v), mb));
        }
      }
    } else if constexpr (Q4) {
      const c10::Half* mr = m + (n0 + r) * nb;
      for (int64_t b = 0; b < nb; b += 2) {
        const uint8_t* pair = row + (b / 2) * QK;
        const __m512i u0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair)));
        const __m512i u1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + 16)));
        const __m512 d0 = _mm512_set1_ps(half_to_float(dr + b)), m0 = _mm512_set1_ps(half_to_float(mr + b));
        __m512i q0 = _mm512_and_si512(u0, low), q1 = _mm512_and_si512(u1, low);
        if constexpr (H) {  // Q5: 16 more where the block's high bit is set (lanes 0-15, then 16-31)
          const uint32_t h = qh[(n0 + r) * nb + b];
          q0 = _mm512_mask_add_epi32(q0, static_cast<__mmask16>(h & 0xFFFFu), q0, sixteen);
          q1 = _mm512_mask_add_epi32(q1, static_cast<__mmask16>(h >> 16), q1, sixteen);
        }
        _mm512_storeu_ps(o + b * QK, _mm512_fmadd_ps(d0, _mm512_cvtepi32_ps(q0), m0));
        _mm512_storeu_ps(o + b * QK + 16, _mm512_fmadd_ps(d0, _mm512_cvtepi32_ps(q1), m0));
        if (b + 1 < nb) {
          const __m512 d1 = _mm512_set1_ps(half_to_float(dr + b + 1)), m1 = _mm512_set1_ps(half_to_float(mr + b + 1));
          __m512i p0 = _mm512_srli_epi32(u0, 4), p1 = _mm512_srli_epi32(u1, 4);
          if constexpr (H) {
            const uint32_t h = qh[(n0 + r) * nb + b + 1];
            p0 = _mm512_mask_add_epi32(p0, static_cast<__mmask16>(h & 0xFFFFu), p0, sixteen);
            p1 = _mm512_mask_add_epi32(p1, static_cast<__mmask16>(h >> 16), p1, sixteen);
          }
          _mm512_storeu_ps(o + (b + 1) * QK, _mm512_fmadd_ps(d1, _mm512_cvtepi32_ps(p0), m1));
          _mm512_storeu_ps(o + (b + 1) * QK + 16, _mm512_fmadd_ps(d1, _mm512_cvtepi32_ps(p1), m1));
        }
      }
    } else {
      const int8_t* q = reinterpret_cast<const int8_t*>(row);
      for (int64_t b = 0; b < nb; ++b) {
        const __m512 db = _mm512_set1_ps(half_to_float(dr + b));
        for (int h = 0; h < 2; ++h) {
          const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * QK + 16 * h)));
          _mm512_storeu_ps(o + b * QK + 16 * h, _mm512_mul_ps(db, _mm512_cvtepi32_ps(v)));
        }
      }
    }
  }
}

template <bool Q4, bool H = false>
void quant_matmul_panels_impl(const float* x, const uint8_t* qp, const c10::Half* dp, const c10::Half* mp, int64_t M,
                              int64_t N, int64_t K, int64_t row_bytes, float* y, const uint32_t* qhp = nullptr) {
  const int64_t nb = K / QK;
  panel_matmul(x, M, N, K, y, [&](int64_t n0, int nr, float* w) {
    dequant_panel<Q4, H>(qp, row_bytes, dp, mp, nb, n0, nr, w, qhp);
  });
}
#endif

at::Tensor quant_matmul_panels_any(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& d,
                                   const at::Tensor& m, bool is_q4, const at::Tensor* qh);

// y[M, N] = x[M, K] @ dequantize(W)^T in fp32 for a block-quantized W (medium M; see above).
at::Tensor quant_matmul_panels(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                               bool is_q4) {
  return quant_matmul_panels_any(x_in, qs, d, m, is_q4, nullptr);
}

at::Tensor quant_matmul_panels_q5(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& qh,
                                  const at::Tensor& d, const at::Tensor& m) {
  return quant_matmul_panels_any(x_in, qs, d, m, true, &qh);
}

at::Tensor quant_matmul_panels_any(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& d,
                                   const at::Tensor& m, bool is_q4, const at::Tensor* qh) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x must be a float32 [M, K] tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = d.size(0), nb = K / QK;
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 32, got ", K);
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.dim() == 2 && d.size(1) == nb,
              "d must be float16 [N, K/32]");
  const int64_t row_bytes = is_q4 ? (nb + 1) / 2 * QK : K;
  TORCH_CHECK(qs.is_contiguous() && qs.size(0) == N && qs.numel() == N * row_bytes, "qs has ", qs.numel(),
              " bytes; expected ", N * row_bytes);
  if (is_q4) TORCH_CHECK(m.scalar_type() == at::kHalf && m.is_contiguous() && m.sizes() == d.sizes(), "m must match d");
#ifdef KILN_AVX512
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* qp = static_cast<const uint8_t*>(qs.data_ptr());
  if (qh != nullptr) {
    quant_matmul_panels_impl<true, true>(x.data_ptr<float>(), qp, d.data_ptr<c10::Half>(), m.data_ptr<c10::Half>(), M,
                                         N, K, row_bytes, y.data_ptr<float>(), high_bits(*qh, d));
  } else if (is_q4) {
    quant_matmul_panels_impl<true>(x.data_ptr<float>(), qp, d.data_ptr<c10::Half>(), m.data_ptr<c10::Half>(), M, N, K,
                                   row_bytes, y.data_ptr<float>());
  } else {
    quant_matmul_panels_impl<false>(x.data_ptr<float>(), qp, d.data_ptr<c10::Half>(), nullptr, M, N, K, row_bytes,
                                    y.data_ptr<float>());
  }
  return y;
#else
  // Without AVX-512 the dense GEMM on a dequantized copy is the same arithmetic.
  return at::linear(x, quant_dequantize_any(qs, d, m, is_q4, at::kFloat, qh));
#endif
}

// The activation quantization's range for every kernel of this process (quant_common.h): 8 or 16 bits.
void set_activation_bits(int64_t bits) {
  TORCH_CHECK(bits == 8 || bits == 16, "activation bits must be 8 or 16, got ", bits);
  activation_qmax_value = bits == 8 ? 127.f : 32767.f;
}

int64_t activation_bits() { return int8_activations() ? 8 : 16; }

// Which SIMD path this build of the library runs (for `kiln info`).
int64_t quant_simd_level() {
#if defined(KILN_AVX512)
  return 512;
#elif defined(KILN_AVX2)
  return 256;
#else
  return 0;
#endif
}

}  // namespace kiln

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def("quant_simd_level() -> int", &kiln::quant_simd_level);  // no tensor argument: a catch-all kernel
  m.def("set_activation_bits(int bits) -> ()", &kiln::set_activation_bits);
  m.def("activation_bits() -> int", &kiln::activation_bits);
  m.def("quant_matmul(Tensor x, Tensor qs, Tensor d, Tensor m, bool is_q4) -> Tensor");
  m.def("quant_dequantize(Tensor qs, Tensor d, Tensor m, bool is_q4, ScalarType dtype) -> Tensor");
  m.def("quant_matmul_panels(Tensor x, Tensor qs, Tensor d, Tensor m, bool is_q4) -> Tensor");
  m.def("quant_matmul_q5(Tensor x, Tensor qs, Tensor qh, Tensor d, Tensor m) -> Tensor");
  m.def("quant_dequantize_q5(Tensor qs, Tensor qh, Tensor d, Tensor m, ScalarType dtype) -> Tensor");
  m.def("quant_matmul_panels_q5(Tensor x, Tensor qs, Tensor qh, Tensor d, Tensor m) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  m.impl("quant_matmul", &kiln::quant_matmul);
  m.impl("quant_dequantize", &kiln::quant_dequantize);
  m.impl("quant_matmul_panels", &kiln::quant_matmul_panels);
  m.impl("quant_matmul_q5", &kiln::quant_matmul_q5);
  m.impl("quant_dequantize_q5", &kiln::quant_dequantize_q5);
  m.impl("quant_matmul_panels_q5", &kiln::quant_matmul_panels_q5);
}
