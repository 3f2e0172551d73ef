// Elementwise math that `omp simd` vectorises, shared by the CPU kernels (libm's calls are not vectorised
// without -ffast-math). Each result depends on its own input alone, so a row's values never depend on the batch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// exp(x) for x <= 0 (and -inf), written so that `omp simd` vectorises it: 2^x = 2^n * 2^f with
// |f| <= 1/2, 2^f by its Taylor series to degree 7 (relative error < 1e-8 before rounding).
#pragma omp declare simd
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.0f) * 1.4426950408889634f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest without a libm call
  const float y = (t - n) * 0.6931471805599453f;
  float p = 1.0f / 5040;
  p = p * y + 1.0f / 720;
  p = p * y + 1.0f / 120;
  p = p * y + 1.0f / 24;
  p = p * y + 1.0f / 6;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  int bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int>(n) << 23;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return x < -87.0f ? 0.0f : result;
}

// SiLU(x) = x / (1 + e^-x), from e = e^-|x| <= 1 so that no exponent overflows
#pragma omp declare simd
inline float silu(float x) {
  const float e = exp_nonpositive(-std::abs(x));
  return x >= 0.0f ? x / (1.0f + e) : x * e / (1.0f + e);
}

// The bf16 bits of x rounded to nearest even, as at::BFloat16 rounds (NaN stays NaN)
#pragma omp declare simd
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
