// exp(x) for the cpu backend's native kernels, shared by their sources (native_kernels.py hashes this header
// into every build's cache key, so a change here rebuilds them all).
#pragma once

#include <cstdint>

// exp(x) for x in [-87, 88], within ~2 ulp: 2^n * p(r), r = x - n ln 2 (Cephes expf). Callers clamp into that
// range first (each kernel knows its own). Written so `omp simd` loops vectorize it: glibc's expf would run
// one lane at a time, and n = round(x / ln 2) comes from the 1.5 * 2^23 trick because std::floor would keep
// GCC from vectorizing the loop.
inline float exp_in_range(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}
