// Small helpers shared by the CPU kernels: bfloat16 <-> float32, one value or 16 at a time (AVX-512).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

// bfloat16 bits -> float32 (exact), and float32 -> bfloat16 bits rounded to nearest even (NaN stays NaN,
// overflow goes to infinity)
inline float bits_to_float(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline uint16_t round_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return bits_to_float(x.x); }

// 16 consecutive values as floats, and back
#if defined(__AVX512F__)
#include <immintrin.h>
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const c10::BFloat16* x) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(float* x, __m512 v) { _mm512_storeu_ps(x, v); }
inline void store16(c10::BFloat16* x, __m512 v) {  // round to nearest even, as c10::BFloat16 does (no NaN here)
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
#endif
