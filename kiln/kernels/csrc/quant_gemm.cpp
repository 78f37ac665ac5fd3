// Weight-only quantized matmul for GGUF-style 32-element blocks, for decode-sized M.
//
// Layouts (repacked once at load by kiln/kernels/quant_linear.py, see its docstring):
//   Q4 (GGUF Q4_0 and Q4_1): qs uint8 [N, K/32, 16], low nibble = element j, high nibble =
//     element j+16 of the block; w = d * q + m with q in [0, 15] (Q4_0 is stored with m = -8 d).
//   Q8 (GGUF Q8_0): qs int8 [N, K], w = d * q.
//   d, m: float32 [N, K/32].
//
// The activation row is quantized per 32-block to int16 (scale dx = max|x| / 32767): a
// block's dot product is then an exact integer dot (vpmaddwd on AVX-512BW / AVX2, scalar
// otherwise) scaled by d * dx, plus m * dx * sum(xq) for the Q4 min. int16 rather than
// llama.cpp's int8 keeps the result within ~1e-5 of the dequantized matmul at the same
// weight bandwidth (int8 activations cost ~3e-3 nats of KL on the default model).
// The plain-torch twin in quant_matmul.py does exactly the same arithmetic.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define KILN_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KILN_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;

constexpr float QMAX = 32767.f;

struct QuantizedRows {
  std::vector<int16_t> q;    // [M, K]
  std::vector<float> dx;     // [M, K/32]
  std::vector<float> sx;     // [M, K/32]: dx * sum(q) of the block
};

// x: float32 [M, K] → int16 per-32-block quantization (round to nearest, ties away from zero).
QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / QK;
  QuantizedRows r{std::vector<int16_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb)};
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + i * K + b * QK;
      float amax = 0.f;
      for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float d = amax / QMAX;
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

// Integer dot of one Q4 weight block (16 packed bytes) with one int16 activation block.
inline int32_t dot_q4_scalar(const uint8_t* qs, const int16_t* xq) {
  int32_t s = 0;
  for (int j = 0; j < 16; ++j) {
    s += static_cast<int32_t>(qs[j] & 0x0F) * xq[j];
    s += static_cast<int32_t>(qs[j] >> 4) * xq[j + 16];
  }
  return s;
}

inline int32_t dot_q8_scalar(const int8_t* qs, const int16_t* xq) {
  int32_t s = 0;
  for (int j = 0; j < QK; ++j) s += static_cast<int32_t>(qs[j]) * xq[j];
  return s;
}

// One output row n against up to 4 activation rows: weights unpacked once, reused per row.
template <bool Q4>
void row_dot(const uint8_t* qs_row, const float* d_row, const float* m_row, const QuantizedRows& xr, int64_t m0,
             int64_t mcount, int64_t K, float* out /* [mcount] */) {
  const int64_t nb = K / QK;
#if defined(KILN_AVX512) || defined(KILN_AVX2)
#ifdef KILN_AVX512
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
#else
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
#endif
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    __m128i w_lo, w_hi;  // elements 0..15 and 16..31 as bytes
    if constexpr (Q4) {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs_row + b * 16));
      w_lo = _mm_and_si128(packed, low_mask);
      w_hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
    } else {
      w_lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs_row + b * QK));
      w_hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs_row + b * QK + 16));
    }
    const float db = d_row[b];
#ifdef KILN_AVX512
    const __m256i w8 = _mm256_inserti128_si256(_mm256_castsi128_si256(w_lo), w_hi, 1);
    const __m512i w16 = Q4 ? _mm512_cvtepu8_epi16(w8) : _mm512_cvtepi8_epi16(w8);
    for (int64_t i = 0; i < mcount; ++i) {
      const int64_t mi = m0 + i;
      const __m512i xv = _mm512_loadu_si512(xr.q.data() + mi * K + b * QK);
      const __m512i isum = _mm512_madd_epi16(w16, xv);  // 16 int32 pair sums, exact
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(db * xr.dx[mi * nb + b]), acc[i]);
    }
#else
    const __m256i wa = Q4 ? _mm256_cvtepu8_epi16(w_lo) : _mm256_cvtepi8_epi16(w_lo);
    const __m256i wb = Q4 ? _mm256_cvtepu8_epi16(w_hi) : _mm256_cvtepi8_epi16(w_hi);
    for (int64_t i = 0; i < mcount; ++i) {
      const int64_t mi = m0 + i;
      const int16_t* xq = xr.q.data() + mi * K + b * QK;
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));
      const __m256i isum = _mm256_add_epi32(_mm256_madd_epi16(wa, xa), _mm256_madd_epi16(wb, xb));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(db * xr.dx[mi * nb + b]), acc[i]);
    }
#endif
  }
  for (int64_t i = 0; i < mcount; ++i) {
#ifdef KILN_AVX512
    out[i] = _mm512_reduce_add_ps(acc[i]);
#else
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    out[i] = _mm_cvtss_f32(s);
#endif
  }
#else
  for (int64_t i = 0; i < mcount; ++i) {
    const int64_t mi = m0 + i;
    float acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const int16_t* xq = xr.q.data() + mi * K + b * QK;
      const int32_t s = Q4 ? dot_q4_scalar(qs_row + b * 16, xq)
                           : dot_q8_scalar(reinterpret_cast<const int8_t*>(qs_row) + b * QK, xq);
      acc += d_row[b] * xr.dx[mi * nb + b] * static_cast<float>(s);
    }
    out[i] = acc;
  }
#endif
  if constexpr (Q4) {
    for (int64_t i = 0; i < mcount; ++i) {
      const float* sx = xr.sx.data() + (m0 + i) * nb;
      float s = 0.f;
      for (int64_t b = 0; b < nb; ++b) s += m_row[b] * sx[b];
      out[i] += s;
    }
  }
}

#ifdef KILN_AVX512
// NR output rows x MC activation rows per pass: each unpacked weight block is reused MC times
// and each activation block NR times, and the NR*MC accumulators are independent FMA chains.
template <bool Q4, int NR, int MC>
void tile_dot_avx512(const uint8_t* qs, int64_t row_bytes, const float* d, const float* m, const QuantizedRows& xr,
                     int64_t m0, int64_t K, float* out /* [NR][MC] */) {
  const int64_t nb = K / QK;
  __m512 acc[NR][MC];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MC; ++i) acc[r][i] = _mm512_setzero_ps();
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    __m512i w16[NR];
    for (int r = 0; r < NR; ++r) {
      if constexpr (Q4) {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + r * row_bytes + b * 16));
        const __m128i lo = _mm_and_si128(packed, low_mask);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
        w16[r] = _mm512_cvtepu8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
      } else {
        w16[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + r * row_bytes + b * QK)));
      }
    }
    for (int i = 0; i < MC; ++i) {
      const __m512i xv = _mm512_loadu_si512(xr.q.data() + (m0 + i) * K + b * QK);
      const float dx = xr.dx[(m0 + i) * nb + b];
      for (int r = 0; r < NR; ++r) {
        const __m512 scale = _mm512_set1_ps(d[r * nb + b] * dx);
        acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(w16[r], xv)), scale, acc[r][i]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < MC; ++i) {
      float v = _mm512_reduce_add_ps(acc[r][i]);
      if constexpr (Q4) {
        const float* sx = xr.sx.data() + (m0 + i) * nb;
        for (int64_t b = 0; b < nb; ++b) v += m[r * nb + b] * sx[b];
      }
      out[r * MC + i] = v;
    }
  }
}

template <bool Q4>
void tile_dot4(int64_t mc, const uint8_t* qs, int64_t row_bytes, const float* d, const float* m,
               const QuantizedRows& xr, int64_t m0, int64_t K, float* out) {
  switch (mc) {
    case 1: tile_dot_avx512<Q4, 4, 1>(qs, row_bytes, d, m, xr, m0, K, out); break;
    case 2: tile_dot_avx512<Q4, 4, 2>(qs, row_bytes, d, m, xr, m0, K, out); break;
    case 3: tile_dot_avx512<Q4, 4, 3>(qs, row_bytes, d, m, xr, m0, K, out); break;
    default: tile_dot_avx512<Q4, 4, 4>(qs, row_bytes, d, m, xr, m0, K, out); break;
  }
}
#endif

// y[M, N] = x[M, K] @ W^T for a block-quantized W. Threads split N (torch's pool).
at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                        bool is_q4) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = d.size(0);
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 32, got ", K);
  TORCH_CHECK(d.scalar_type() == at::kFloat && d.is_contiguous() && d.size(1) == K / QK, "d must be float32 [N, K/32]");
  TORCH_CHECK(qs.is_contiguous() && qs.size(0) == N, "qs must be contiguous with N rows");
  TORCH_CHECK(qs.numel() == N * (is_q4 ? K / 2 : K), "qs has ", qs.numel(), " bytes; expected ", N * (is_q4 ? K / 2 : K));
  if (is_q4) TORCH_CHECK(m.scalar_type() == at::kFloat && m.is_contiguous() && m.sizes() == d.sizes(), "m must match d");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const QuantizedRows xr = quantize_rows(xf.data_ptr<float>(), M, K);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = static_cast<const uint8_t*>(qs.data_ptr());
  const float* dp = d.data_ptr<float>();
  const float* mp = is_q4 ? m.data_ptr<float>() : nullptr;
  const int64_t nb = K / QK, row_bytes = is_q4 ? K / 2 : K;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    float tmp[16];
    int64_t n = begin;
#ifdef KILN_AVX512
    for (; n + 4 <= end; n += 4) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mc = std::min<int64_t>(4, M - m0);
        if (is_q4) {
          tile_dot4<true>(mc, qp + n * row_bytes, row_bytes, dp + n * nb, mp + n * nb, xr, m0, K, tmp);
        } else {
          tile_dot4<false>(mc, qp + n * row_bytes, row_bytes, dp + n * nb, nullptr, xr, m0, K, tmp);
        }
        for (int r = 0; r < 4; ++r)
          for (int64_t i = 0; i < mc; ++i) yp[(m0 + i) * N + n + r] = tmp[r * mc + i];
      }
    }
#endif
    for (; n < end; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mc = std::min<int64_t>(4, M - m0);
        if (is_q4) {
          row_dot<true>(qp + n * row_bytes, dp + n * nb, mp + n * nb, xr, m0, mc, K, tmp);
        } else {
          row_dot<false>(qp + n * row_bytes, dp + n * nb, nullptr, xr, m0, mc, K, tmp);
        }
        for (int64_t i = 0; i < mc; ++i) yp[(m0 + i) * N + n] = tmp[i];
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// W as a dense [N, K] tensor of `dtype` (for large M, where the dense GEMM wins).
at::Tensor quant_dequantize(const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, bool is_q4,
                            at::ScalarType dtype) {
  const int64_t N = d.size(0), nb = d.size(1), K = nb * QK;
  at::Tensor w = at::empty({N, K}, d.options().dtype(at::kFloat));
  const uint8_t* qp = static_cast<const uint8_t*>(qs.data_ptr());
  const float* dp = d.data_ptr<float>();
  const float* mp = is_q4 ? m.data_ptr<float>() : nullptr;
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t b = 0; b < nb; ++b) {
        const float db = dp[n * nb + b];
        float* out = wp + n * K + b * QK;
        if (is_q4) {
          const float mb = mp[n * nb + b];
          const uint8_t* q = qp + n * (K / 2) + b * 16;
          for (int j = 0; j < 16; ++j) {
            out[j] = db * static_cast<float>(q[j] & 0x0F) + mb;
            out[j + 16] = db * static_cast<float>(q[j] >> 4) + mb;
          }
        } else {
          const int8_t* q = reinterpret_cast<const int8_t*>(qp) + n * K + b * QK;
          for (int j = 0; j < QK; ++j) out[j] = db * static_cast<float>(q[j]);
        }
      }
    }
  });
  return dtype == at::kFloat ? w : w.to(dtype);
}

at::Tensor quant_dequantize_op(const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, bool is_q4,
                               at::ScalarType dtype) {
  return quant_dequantize(qs.contiguous(), d.contiguous(), m.contiguous(), is_q4, dtype);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def("quant_matmul(Tensor x, Tensor qs, Tensor d, Tensor m, bool is_q4) -> Tensor");
  m.def("quant_dequantize(Tensor qs, Tensor d, Tensor m, bool is_q4, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  m.impl("quant_matmul", &quant_matmul);
  m.impl("quant_dequantize", &quant_dequantize_op);
}
