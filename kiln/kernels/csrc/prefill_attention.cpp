// Paged prefill attention for CPU: one sequence's chunk of L new queries over its whole context
// (cached prefix + the chunk itself, K/V already written), read from the block-table-addressed
// cache, flash-style: online softmax over 32-key tiles, no L x S score matrix.
//
// Layout: q [L, Hq, D] (query i sits at position S - L + i and attends to keys 0..S-L+i);
// k_cache/v_cache [num_blocks, BS, Hkv, D] float32 / float16 / bfloat16 (widened to fp32 as they
// are read); block_table int32 [>= ceil(S / BS)]; out [L, Hq, D].
//
// Work: K is first laid out key-in-lane per kv head and 32-key tile ([Hkv][S/32][D][32] fp32,
// O(S * D) memory, shared by every query tile) so a score tile is D broadcast-FMAs per query
// vector with no horizontal adds; V rows are widened once into [Hkv][S][D]. Tasks are
// (query tile of QT rows, kv head) pairs: the QT * G query vectors of a GQA group share every K
// and V load. Per 32-key tile each query vector updates its running max m, denominator l and
// unnormalized output o (all fp32); tiles past a query's position are skipped, the diagonal tile
// masks keys after it. A query's result depends only on its own position and the keys (tiles
// visited in order), not on how the chunk was tiled or split across calls.
// Twin: attention_reference.paged_attention_reference (tests/test_prefill_attention.py).
#include <torch/extension.h>

#include "kiln_ops.h"
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "avx512_load.h"
#include "fast_math.h"

namespace kiln {

#if defined(__AVX512F__)
namespace {

constexpr int64_t KT = 32;  // keys per tile: two vectors of scores per query vector
constexpr int64_t KV = KT / 16;
constexpr int64_t QT = 8;   // query rows per task
constexpr int SR = 8;       // query vectors per score micro-tile (16 accumulators, 2 K loads per 16 FMAs)

// The lanes [0, valid) of a 16-key vector (valid clamped to 0..16): its keys at or before the query.
inline __mmask16 valid_lanes(int64_t valid) {
  if (valid >= 16) return static_cast<__mmask16>(0xFFFF);
  if (valid <= 0) return 0;
  return static_cast<__mmask16>((1u << valid) - 1);
}

// s[r][0..KT) = q[r] . k_i for R query vectors (q rows D apart, s rows KT apart) against one
// key-in-lane tile [D][KT]; the R x KT/16 accumulators stay in registers across D.
template <int64_t D, int R>
inline void score_tile(const float* q, const float* ktile, float* s) {
  __m512 acc[R][KV];
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < KV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 kv[KV];
    for (int64_t c = 0; c < KV; ++c) kv[c] = _mm512_loadu_ps(ktile + d * KT + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 qv = _mm512_set1_ps(q[r * D + d]);
      for (int64_t c = 0; c < KV; ++c) acc[r][c] = _mm512_fmadd_ps(qv, kv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < KV; ++c) _mm512_storeu_ps(s + r * KT + 16 * c, acc[r][c]);
}

// o[r] += sum_i p[r][i] * v[i] for R query vectors (p rows KT apart, o rows D apart) over `keys`
// V rows; the R x DV accumulators stay in registers across the keys.
template <int DV, int R>
inline void pv_tile(const float* p, const float* v, int64_t keys, float* o) {
  constexpr int64_t D = 16 * DV;
  __m512 acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * D + 16 * c);
  for (int64_t i = 0; i < keys; ++i) {
    __m512 vv[DV];
    for (int c = 0; c < DV; ++c) vv[c] = _mm512_loadu_ps(v + i * D + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 pv = _mm512_set1_ps(p[r * KT + i]);
      for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_fmadd_ps(pv, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) _mm512_storeu_ps(o + r * D + 16 * c, acc[r][c]);
}

// One (query tile, kv head) task. qf: NQ x D scaled fp32 queries (vector j = row j / G, head j % G);
// pos[j]: its position; kt: this head's key tiles [tiles][D][KT]; vf: this head's V rows [S][D].
// l holds 16 lane-wise partial denominators per query vector (summed once at the end).
template <int DV>
void prefill_task(const float* qf, const int64_t* pos, int64_t NQ, const float* kt, const float* vf,
                  float* m, float* l, float* o, float* s) {
  constexpr int64_t D = 16 * DV;
  constexpr int VR = DV <= 4 ? 4 : 2;  // query vectors per output micro-tile: VR x DV accumulators <= 16
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < NQ; ++j) m[j] = neg_inf;
  std::fill(l, l + NQ * 16, 0.f);
  std::fill(o, o + NQ * D, 0.f);
  int64_t last = 0;
  for (int64_t j = 0; j < NQ; ++j) last = std::max(last, pos[j]);
  const int64_t tiles = last / KT + 1;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const float* ktile = kt + tile * D * KT;
    const int64_t t0 = tile * KT;
    // scores s[j][0..KT) = q_j . k_{t0 + i}, SR query vectors at a time (a partial group one by one)
    int64_t js = 0;
    for (; js + SR <= NQ; js += SR) score_tile<D, SR>(qf + js * D, ktile, s + js * KT);
    for (; js < NQ; ++js) score_tile<D, 1>(qf + js * D, ktile, s + js * KT);
    // online softmax: mask keys after each query's position, rescale its running state
    for (int64_t j = 0; j < NQ; ++j) {
      float* sj = s + j * KT;
      if (pos[j] < t0) {  // tile entirely after this query: contributes nothing
        for (int64_t c = 0; c < KV; ++c) _mm512_storeu_ps(sj + 16 * c, _mm512_setzero_ps());
        continue;
      }
      __mmask16 keep[KV];
      __m512 sv[KV];
      __m512 vmax = _mm512_set1_ps(neg_inf);
      for (int64_t c = 0; c < KV; ++c) {
        keep[c] = valid_lanes(pos[j] - t0 - 16 * c + 1);
        sv[c] = _mm512_mask_blend_ps(keep[c], _mm512_set1_ps(neg_inf), _mm512_loadu_ps(sj + 16 * c));
        vmax = _mm512_max_ps(vmax, sv[c]);
      }
      const float m_new = std::max(m[j], _mm512_reduce_max_ps(vmax));
      const float alpha = kiln_exp(m[j] - m_new);  // first tile: m = -inf, and l, o are still 0
      __m512 psum = _mm512_mul_ps(_mm512_set1_ps(alpha), _mm512_loadu_ps(l + j * 16));
      for (int64_t c = 0; c < KV; ++c) {
        const __m512 p = _mm512_maskz_mov_ps(keep[c], kiln_exp16(_mm512_sub_ps(sv[c], _mm512_set1_ps(m_new))));
        psum = _mm512_add_ps(psum, p);
        _mm512_storeu_ps(sj + 16 * c, p);
      }
      _mm512_storeu_ps(l + j * 16, psum);
      m[j] = m_new;
      if (alpha != 1.f) {
        const __m512 av = _mm512_set1_ps(alpha);
        for (int c = 0; c < DV; ++c) _mm512_storeu_ps(o + j * D + 16 * c, _mm512_mul_ps(av, _mm512_loadu_ps(o + j * D + 16 * c)));
      }
    }
    // o_j += sum_i p[j][i] * v_{t0 + i}, VR query vectors at a time (a partial group one by one)
    const int64_t keys = std::min<int64_t>(KT, last + 1 - t0);
    int64_t j0 = 0;
    for (; j0 + VR <= NQ; j0 += VR) pv_tile<DV, VR>(s + j0 * KT, vf + t0 * D, keys, o + j0 * D);
    for (; j0 < NQ; ++j0) pv_tile<DV, 1>(s + j0 * KT, vf + t0 * D, keys, o + j0 * D);
  }
  for (int64_t j = 0; j < NQ; ++j) l[j * 16] = _mm512_reduce_add_ps(_mm512_loadu_ps(l + j * 16));
}

template <typename T, typename C>
void prefill_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const int32_t* table, int64_t S, double scale, at::Tensor& out) {
  const int64_t L = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), Hkv = k_cache.size(2), G = Hq / Hkv;
  const int64_t tiles = (S + KT - 1) / KT;
  const C* kp = static_cast<const C*>(k_cache.data_ptr());
  const C* vp = static_cast<const C*>(v_cache.data_ptr());
  const int64_t token_stride = Hkv * D, block_stride = BS * token_stride;
  // K in key-in-lane tiles and V widened, per kv head (zero past S: those keys are masked)
  std::vector<float> kt(Hkv * tiles * D * KT, 0.f), vf(Hkv * tiles * KT * D, 0.f);
  at::parallel_for(0, Hkv * tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float row[16];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / tiles, tile = item % tiles;
      float* kdst = kt.data() + (h * tiles + tile) * D * KT;
      for (int64_t i = 0; i < KT && tile * KT + i < S; ++i) {
        const int64_t t = tile * KT + i;
        const int64_t off = table[t / BS] * block_stride + (t % BS) * token_stride + h * D;
        float* vdst = vf.data() + (h * tiles * KT + t) * D;
        for (int64_t d = 0; d < D; d += 16) {
          _mm512_storeu_ps(vdst + d, load16(vp + off + d));
          _mm512_store_ps(row, load16(kp + off + d));
          for (int64_t e = 0; e < 16; ++e) kdst[(d + e) * KT + i] = row[e];
        }
      }
    }
  });
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t qtiles = (L + QT - 1) / QT;
  // Later query tiles see more keys: order tasks 0, n-1, 1, n-2, ... so each thread's contiguous
  // share of the range (at::parallel_for splits it statically) gets a balanced amount of work.
  const int64_t tasks = qtiles * Hkv;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t NQ = QT * G;
    std::vector<float> qf(NQ * D), m(NQ), l(NQ * 16), o(NQ * D), s(NQ * KT);
    std::vector<int64_t> pos(NQ);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / Hkv, h = item % Hkv;
      const int64_t qtile = k % 2 == 0 ? k / 2 : qtiles - 1 - k / 2;
      const int64_t r0 = qtile * QT, rows = std::min<int64_t>(QT, L - r0), nq = rows * G;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t j = r * G + g;
          pos[j] = S - L + r0 + r;
          const T* src = qp + ((r0 + r) * Hq + h * G + g) * D;
          for (int64_t d = 0; d < D; ++d) qf[j * D + d] = static_cast<float>(src[d]) * static_cast<float>(scale);
        }
      }
      const float* kh = kt.data() + h * tiles * D * KT;
      const float* vh = vf.data() + h * tiles * KT * D;
      if (D == 64) {
        prefill_task<4>(qf.data(), pos.data(), nq, kh, vh, m.data(), l.data(), o.data(), s.data());
      } else {
        prefill_task<8>(qf.data(), pos.data(), nq, kh, vh, m.data(), l.data(), o.data(), s.data());
      }
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t j = r * G + g;
          const float inv = 1.f / l[j * 16];
          T* dst = op + ((r0 + r) * Hq + h * G + g) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[j * D + d] * inv);
        }
      }
    }
  });
}

}  // namespace
#endif

// Whether this build has the kernel (AVX-512); without it callers use gather + SDPA.
bool paged_prefill_supported() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_table, int64_t seq_len, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head_dim mismatch");
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "paged_prefill_attention supports head_dim 64 and 128, got ",
              q.size(2));
  TORCH_CHECK(block_table.dim() == 1 && block_table.scalar_type() == at::kInt, "block_table must be int32 [blocks]");
  TORCH_CHECK(seq_len >= q.size(0) && q.size(0) > 0, "seq_len (", seq_len, ") must cover the ", q.size(0), " queries");
  TORCH_CHECK(block_table.size(0) * k_cache.size(1) >= seq_len, "block_table too short for seq_len");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cache must be contiguous");
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == ct, "K and V caches must share a dtype");
  auto qc = q.contiguous();
  auto bt = block_table.contiguous();
  auto out = at::empty_like(qc);
#if defined(__AVX512F__)
  const int32_t* table = bt.data_ptr<int32_t>();
  if (qt == at::kFloat && ct == at::kFloat) {
    prefill_kernel<float, float>(qc, k_cache, v_cache, table, seq_len, scale, out);
  } else if (qt == at::kFloat && ct == at::kHalf) {
    prefill_kernel<float, c10::Half>(qc, k_cache, v_cache, table, seq_len, scale, out);
  } else if (qt == at::kFloat && ct == at::kBFloat16) {
    prefill_kernel<float, c10::BFloat16>(qc, k_cache, v_cache, table, seq_len, scale, out);
  } else if (qt == at::kBFloat16 && ct == at::kBFloat16) {
    prefill_kernel<c10::BFloat16, c10::BFloat16>(qc, k_cache, v_cache, table, seq_len, scale, out);
  } else {
    TORCH_CHECK(false, "paged_prefill_attention supports float32 queries over a float32/float16/bfloat16 cache "
                "and bfloat16 queries over a bfloat16 cache; got ", qt, " over ", ct);
  }
#else
  TORCH_CHECK(false, "paged_prefill_attention needs AVX-512 (this build has none); use the gather + SDPA path");
#endif
  return out;
}

}  // namespace kiln

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def("paged_prefill_supported() -> bool", &kiln::paged_prefill_supported);
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, int seq_len, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  m.impl("paged_prefill_attention", &kiln::paged_prefill_attention);
}
