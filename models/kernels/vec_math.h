// Elementwise math that `omp simd` vectorises, and 16 values of any float type as fp32, shared by the CPU kernels
// (libm's calls are not vectorised without -ffast-math). Each result depends on its own input alone, so a row's
// values never depend on the batch.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// bf16 values as fp32 in generic vectors: bf16 is the top half of an fp32 (F: their float vector; U16, U32: the
// same lanes as 16- and 32-bit integers)
template <typename F, typename U16, typename U32>
inline F widen_bf16(const at::BFloat16* p) {
  U16 h;
  std::memcpy(&h, p, sizeof(h));
  const U32 bits = __builtin_convertvector(h, U32) << 16;
  F v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline f32x16 load16(const at::BFloat16* p) {
#ifdef __AVX512F__  // (GCC's generic vectors load and widen in many more instructions: half the speed)
  const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return reinterpret_cast<f32x16>(_mm512_castsi512_ps(bits));
#else
  return widen_bf16<f32x16, u16x16, u32x16>(p);
#endif
}

inline f32x16 load16(const at::Half* p) {
#ifdef __AVX512F__
  return reinterpret_cast<f32x16>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
  const __m128i* h = reinterpret_cast<const __m128i*>(p);
  f32x16 v;
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(h)), hi = _mm256_cvtph_ps(_mm_loadu_si128(h + 1));
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
  return v;
#else
  f32x16 v;
  for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// The native vector: 16 lanes on AVX-512, else 8 (GCC lowers 16-lane generic vectors on AVX2 through memory: a
// third of the speed)
#ifdef __AVX512F__
typedef f32x16 Vec;
#else
typedef float Vec __attribute__((vector_size(32)));
#endif
constexpr int kVecLanes = sizeof(Vec) / sizeof(float);

inline void store_vec(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// kVecLanes values of any float type, as fp32
inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline Vec load_vec(const at::BFloat16* p) {
#ifdef __AVX512F__
  return load16(p);
#else
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  return widen_bf16<Vec, u16x8, u32x8>(p);
#endif
}

inline Vec load_vec(const at::Half* p) {
#ifdef __AVX512F__
  return load16(p);
#elif defined(__F16C__)
  return reinterpret_cast<Vec>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  Vec v;
  for (int i = 0; i < kVecLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

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
