// Vectorizable float exp for the kernels' inner loops (std::exp is a scalar libm call that
// the compiler cannot turn into SIMD without -ffast-math). Cody-Waite range reduction
// x = n ln2 + r, |r| <= ln2/2, then a degree-6 polynomial for e^r and 2^n by exponent
// bits. Max relative error ~2e-7 over [-87, 88]; inputs below -87 return 0.
#pragma once
#include <cstdint>
#include <cstring>

inline float kiln_exp(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.3888889e-3f;
  p = p * r + 8.3333338e-3f;
  p = p * r + 4.1666668e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
