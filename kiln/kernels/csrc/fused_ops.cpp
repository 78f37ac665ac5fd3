// Fused element-wise ops for the decode step: each replaces 5-10 eager torch ops (and
// their temporaries) with one pass over the data. Every op has a plain-torch twin in
// kiln/kernels/fused.py that the tests compare against.
#include <torch/extension.h>

#include "kiln_ops.h"
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cmath>
#include <vector>

#include "fast_math.h"
#include <type_traits>

namespace kiln {

// out = rms_norm(x + residual) * weight; residual <- x + residual (in place, rounded to the
// storage dtype as HF does before normalizing). With has_residual=false: out = rms_norm(x) * weight
// and residual is neither read nor written. Accumulation in fp32 whatever the storage dtype.
template <typename T>
void add_rms_norm_kernel(const at::Tensor& x, T* rp, const at::Tensor& weight, at::Tensor& out, double eps) {
  const int64_t rows = x.size(0), H = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(H);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * H;
      T* rr = rp != nullptr ? rp + r * H : nullptr;
      float ss = 0.f;
      for (int64_t i = 0; i < H; ++i) {
        float v = static_cast<float>(xr[i]);
        if (rr != nullptr) {
          v += static_cast<float>(rr[i]);
          const T stored = static_cast<T>(v);
          rr[i] = stored;
          v = static_cast<float>(stored);
        }
        buf[i] = v;
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
      T* orow = op + r * H;
      for (int64_t i = 0; i < H; ++i) {
        const T normed = static_cast<T>(buf[i] * inv);
        orow[i] = static_cast<T>(static_cast<float>(wp[i]) * static_cast<float>(normed));
      }
    }
  });
}

at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor residual, const at::Tensor& weight, double eps,
                        bool has_residual) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [rows, hidden] tensor");
  if (has_residual)
    TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() &&
                    residual.scalar_type() == x.scalar_type(), "residual must match x");
  auto out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    add_rms_norm_kernel<float>(x, has_residual ? residual.data_ptr<float>() : nullptr, weight.contiguous(), out, eps);
  } else if (x.scalar_type() == at::kBFloat16) {
    add_rms_norm_kernel<c10::BFloat16>(x, has_residual ? residual.data_ptr<c10::BFloat16>() : nullptr,
                                       weight.contiguous(), out, eps);
  } else {
    TORCH_CHECK(false, "add_rms_norm supports float32 and bfloat16");
  }
  return out;
}

#if defined(__AVX512F__)
// One fp32 row of silu(gate) * up, 16 lanes at a time: gate / (1 + exp(-gate)) with kiln_exp16 and an
// exact division, then the product — the scalar loop's steps, so the same values up to the
// polynomial's rounding (the scalar tail is that loop). GCC does not vectorize the loop below (its
// `static_cast`s and the exp's bit tricks), which left the op at ~4 ns per element.
inline void silu_mul_row_avx512(const float* g, const float* u, float* o, int64_t I) {
  int64_t i = 0;
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= I; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 act = _mm512_div_ps(gv, _mm512_add_ps(one, kiln_exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    _mm512_storeu_ps(o + i, _mm512_mul_ps(act, _mm512_loadu_ps(u + i)));
  }
  for (; i < I; ++i) o[i] = g[i] / (1.f + kiln_exp(-g[i])) * u[i];
}
#elif defined(__AVX2__) && defined(__FMA__)
// The AVX2 twin (8 lanes, kiln_exp8): the same steps, so the same values as the AVX-512 row. Without it
// an AVX2-only CPU ran the scalar loop at ~4-5 ns per element: 1.8 s of a 33 s run of 32 streams there.
inline void silu_mul_row_avx2(const float* g, const float* u, float* o, int64_t I) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= I; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 act = _mm256_div_ps(gv, _mm256_add_ps(one, kiln_exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(act, _mm256_loadu_ps(u + i)));
  }
  for (; i < I; ++i) o[i] = g[i] / (1.f + kiln_exp(-g[i])) * u[i];
}
#endif

// silu(gate) * up for gate_up = [gate | up] along the last dim.
template <typename T>
void silu_mul_kernel(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), I = out.size(1);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * 2 * I;
      const T* u = g + I;
      T* o = op + r * I;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>) {
        silu_mul_row_avx512(g, u, o, I);
        continue;
      }
#elif defined(__AVX2__) && defined(__FMA__)
      if constexpr (std::is_same_v<T, float>) {
        silu_mul_row_avx2(g, u, o, I);
        continue;
      }
#endif
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        const float gv = static_cast<float>(g[i]);
        const T act = static_cast<T>(gv / (1.f + kiln_exp(-gv)));
        o[i] = static_cast<T>(static_cast<float>(act) * static_cast<float>(u[i]));
      }
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0, "bad gate_up");
  auto out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_kernel<float>(gate_up, out);
  } else if (gate_up.scalar_type() == at::kBFloat16) {
    silu_mul_kernel<c10::BFloat16>(gate_up, out);
  } else {
    TORCH_CHECK(false, "silu_and_mul supports float32 and bfloat16");
  }
  return out;
}

// Rotate-half RoPE applied in place to the q and k heads of a fused qkv row:
// qkv [T, (Hq + 2 Hkv) * D]; cos/sin tables [max_pos, D/2] fp32; positions [T] int64.
template <typename T>
void rope_kernel(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                 int64_t num_heads, int64_t num_kv_heads, int64_t D) {
  const int64_t rows = qkv.size(0), stride = qkv.size(1), half = D / 2;
  T* base = qkv.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t heads = num_heads + num_kv_heads;  // q heads then k heads are contiguous
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* c = cp + pos[r] * half;
      const float* s = sp + pos[r] * half;
      for (int64_t h = 0; h < heads; ++h) {
        T* x = base + r * stride + h * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
          x[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
          x[i + half] = static_cast<T>(x2 * c[i] + x1 * s[i]);
        }
      }
    }
  });
}

void rope_qkv_(at::Tensor qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "qkv must be contiguous [T, width]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && cos.scalar_type() == at::kFloat, "bad rope inputs");
  auto p = positions.contiguous();
  TORCH_CHECK(p.numel() >= qkv.size(0), "rope_qkv_: ", qkv.size(0), " rows but ", p.numel(), " positions");
  TORCH_CHECK(cos.size(1) * 2 == head_dim && sin.sizes() == cos.sizes(), "rope_qkv_: tables of the wrong width");
  if (qkv.size(0) > 0) {
    const auto [lo, hi] = std::minmax_element(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + qkv.size(0));
    TORCH_CHECK(*lo >= 0 && *hi < cos.size(0), "rope_qkv_: position ", *hi, " is past the RoPE table's ",
                cos.size(0), " positions (the model's max_position_embeddings)");
  }
  if (qkv.scalar_type() == at::kFloat) {
    rope_kernel<float>(qkv, p, cos, sin, num_heads, num_kv_heads, head_dim);
  } else if (qkv.scalar_type() == at::kBFloat16) {
    rope_kernel<c10::BFloat16>(qkv, p, cos, sin, num_heads, num_kv_heads, head_dim);
  } else {
    TORCH_CHECK(false, "rope_qkv_ supports float32 and bfloat16");
  }
}

}  // namespace kiln

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  // residual is updated in place (declared, so torch.compile's functionalization knows it).
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps, bool has_residual) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rope_qkv_(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, int head_dim) -> ()");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  m.impl("add_rms_norm", &kiln::add_rms_norm);
  m.impl("silu_and_mul", &kiln::silu_and_mul);
  m.impl("rope_qkv_", &kiln::rope_qkv_);
}
