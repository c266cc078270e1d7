// y = x W^T for weights kept in GGUF's blocks of 32 inputs, multiplied the way llama.cpp multiplies them.
// Q4_1: 4-bit codes q with a scale d and a minimum m per block (w = d q + m); Q8_0: signed 8-bit codes with a scale
// (w = d q), kept here as u = q + 128 with m = -128 d, so both are w = d u + m with u unsigned. Each block of 32
// activations is quantized to int8 with its own scale (dx = max |x| / 127, llama.cpp's q8_1), the block's integer
// dot product sum(u xq) is exact (AVX512-VNNI: 64 byte products per instruction), and
//   y = sum over blocks of d dx sum(u xq) + m dx sum(xq).
// Every output is the same sequence of operations whatever the number of rows M, so a row's result never depends
// on the rows beside it: a token verified with its draft tokens gets the bits it gets decoded alone.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;
constexpr int ROWS = 2;  // activation rows sharing each unpacked block of weights

float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// x [M, K] -> xq [M, K] int8, dx [M, G] (the block's scale), sx [M, G] (dx times the block's sum of xq)
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* sx) {
  const int64_t G = K / BLOCK;
  at::parallel_for(0, M * G, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* b = x + i * BLOCK;  // block g of row r: rows are K = G * BLOCK long
      float amax = 0.f;
      for (int64_t k = 0; k < BLOCK; ++k) amax = std::max(amax, std::fabs(to_float(b[k])));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int64_t k = 0; k < BLOCK; ++k) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(to_float(b[k]) * inv));
        xq[i * BLOCK + k] = static_cast<int8_t>(q);
        sum += q;
      }
      dx[i] = d;
      sx[i] = d * static_cast<float>(sum);
    }
  });
}

// 4-bit codes are laid out for the unpacking: each run of four blocks (128 inputs) is 64 bytes, byte j holding
// input j in its low nibble and input 64 + j in its high one, so one load, a mask and a shift give two vectors of 64
// codes in input order; the last G % 4 blocks keep GGUF's own 16 bytes (byte j: inputs j and j + 16).
inline int32_t code4(const uint8_t* row, int64_t G, int64_t g, int64_t k) {  // block g's input k (0..31)
  if (g < G / 4 * 4) {
    const uint8_t b = row[(g / 4) * 64 + (g % 2) * 32 + k];
    return (g % 4 < 2 ? b : b >> 4) & 0x0F;
  }
  const uint8_t b = row[g * (BLOCK / 2) + k % 16];
  return (k < 16 ? b : b >> 4) & 0x0F;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
// codes of blocks g and g + 1 (one only when `two` is false) as 64 unsigned bytes in input order, from GGUF's
// layout (8-bit codes, and the last G % 4 blocks of 4-bit codes)
template <int BITS>
inline __m512i block_pair(const uint8_t* codes, int64_t g, bool two) {
  if constexpr (BITS == 8) {
    return _mm512_maskz_loadu_epi8(two ? ~0ULL : 0xFFFFFFFFULL, codes + g * BLOCK);
  } else {
    // a block is 16 bytes: byte j holds input j in its low nibble and input j + 16 in its high one
    const __m256i raw = _mm256_maskz_loadu_epi8(two ? 0xFFFFFFFFu : 0xFFFFu, codes + g * (BLOCK / 2));
    const __m512i v = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0), _mm512_castsi256_si512(raw));
    const __m512i low = _mm512_set1_epi8(0x0F);
    return _mm512_mask_blend_epi64(0xCC, _mm512_and_si512(v, low), _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
  }
}

// the 16 lanes' sum in one fixed tree: the adds carry a rounding mode, so -ffast-math cannot regroup them (it may
// regroup the plain adds of _mm512_reduce_add_ps differently in different tiles, and a row's bits would then
// depend on the tile it lands in)
inline float reduce_exact(__m512 v) {
  constexpr int NEAREST = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  v = _mm512_add_round_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E), NEAREST);  // 256-bit halves
  v = _mm512_add_round_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1), NEAREST);  // 128-bit lanes
  v = _mm512_add_round_ps(v, _mm512_permute_ps(v, 0x4E), NEAREST);  // pairs
  v = _mm512_add_round_ps(v, _mm512_permute_ps(v, 0xB1), NEAREST);  // neighbours
  return _mm512_cvtss_f32(v);
}

// y[i * R + r] = weight row i (of NR, `row_bytes` of codes apart, d and m G apart) against activation row r (of R):
// NR * R independent sums, so the dot products of several rows overlap in the pipeline
template <int BITS, int NR, int R>
void tile_dots(const uint8_t* codes, int64_t row_bytes, const uint16_t* d, const uint16_t* m, const int8_t* xq,
               const float* dx, const float* sx, int64_t K, float* y) {
  const int64_t G = K / BLOCK;
  __m512 acc[NR][R];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  const __m512i pair_base = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t g0 = 0; g0 < G; g0 += 16) {
    const int64_t n = std::min<int64_t>(16, G - g0);
    const __mmask16 live = static_cast<__mmask16>((1u << n) - 1);
    __m512 scale[NR][R];
    for (int i = 0; i < NR; ++i) {
      const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, d + i * G + g0));
      const __m512 mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, m + i * G + g0));
      for (int r = 0; r < R; ++r) {
        scale[i][r] = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(live, dx + r * G + g0));
        acc[i][r] = _mm512_fmadd_ps(mw, _mm512_maskz_loadu_ps(live, sx + r * G + g0), acc[i][r]);
      }
    }
    int64_t p = 0;
    if constexpr (BITS == 4) {
      for (; p + 4 <= n; p += 4) {  // four blocks from one 64-byte load
        const __m512i low = _mm512_set1_epi8(0x0F);
        const __m512i pick0 = _mm512_add_epi32(pair_base, _mm512_set1_epi32(static_cast<int>(p)));
        const __m512i pick1 = _mm512_add_epi32(pick0, _mm512_set1_epi32(2));
        __m512i x0[R], x1[R];
        for (int r = 0; r < R; ++r) {
          x0[r] = _mm512_loadu_si512(xq + r * K + (g0 + p) * BLOCK);
          x1[r] = _mm512_loadu_si512(xq + r * K + (g0 + p + 2) * BLOCK);
        }
        for (int i = 0; i < NR; ++i) {
          const __m512i v = _mm512_loadu_si512(codes + i * row_bytes + (g0 + p) * (BLOCK / 2));
          const __m512i w0 = _mm512_and_si512(v, low), w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
          for (int r = 0; r < R; ++r) {
            const __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, x0[r]);
            const __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, x1[r]);
            acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_permutexvar_ps(pick0, scale[i][r]), acc[i][r]);
            acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_permutexvar_ps(pick1, scale[i][r]), acc[i][r]);
          }
        }
      }
    }
    for (; p < n; p += 2) {
      const bool two = p + 1 < n;
      const __m512i pick = _mm512_add_epi32(pair_base, _mm512_set1_epi32(static_cast<int>(p)));
      __m512i x[R];
      for (int r = 0; r < R; ++r)
        x[r] = _mm512_maskz_loadu_epi8(two ? ~0ULL : 0xFFFFFFFFULL, xq + r * K + (g0 + p) * BLOCK);
      for (int i = 0; i < NR; ++i) {
        const __m512i w = block_pair<BITS>(codes + i * row_bytes, g0 + p, two);
        for (int r = 0; r < R; ++r) {
          const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x[r]);  // lanes 0-7: block g, 8-15: g+1
          acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_permutexvar_ps(pick, scale[i][r]), acc[i][r]);
        }
      }
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < R; ++r) y[i * R + r] = reduce_exact(acc[i][r]);
}
#else
// the same products without AVX512-VNNI: each block's integer sum, then its two float terms
template <int BITS, int NR, int R>
void tile_dots(const uint8_t* codes, int64_t row_bytes, const uint16_t* d, const uint16_t* m, const int8_t* xq,
               const float* dx, const float* sx, int64_t K, float* y) {
  const int64_t G = K / BLOCK;
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < R; ++r) {
      const uint8_t* c = codes + i * row_bytes;
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const int8_t* xb = xq + r * K + g * BLOCK;
        int32_t sum = 0;
        if constexpr (BITS == 8) {
          for (int64_t k = 0; k < BLOCK; ++k) sum += static_cast<int32_t>(c[g * BLOCK + k]) * xb[k];
        } else {
          for (int64_t k = 0; k < BLOCK; ++k) sum += code4(c, G, g, k) * xb[k];
        }
        acc += half_to_float(d[i * G + g]) * dx[r * G + g] * static_cast<float>(sum) +
               half_to_float(m[i * G + g]) * sx[r * G + g];
      }
      y[i * R + r] = acc;
    }
}
#endif

// NR weight rows (by R activation rows) in one tile; ragged ends take smaller tiles with the same per-output sums
template <int BITS, int R>
void tile(int64_t NR, const uint8_t* codes, int64_t row_bytes, const uint16_t* d, const uint16_t* m,
          const int8_t* xq, const float* dx, const float* sx, int64_t K, float* y) {
  switch (NR) {
    case 4: tile_dots<BITS, 4, R>(codes, row_bytes, d, m, xq, dx, sx, K, y); break;
    case 3: tile_dots<BITS, 3, R>(codes, row_bytes, d, m, xq, dx, sx, K, y); break;
    case 2: tile_dots<BITS, 2, R>(codes, row_bytes, d, m, xq, dx, sx, K, y); break;
    default: tile_dots<BITS, 1, R>(codes, row_bytes, d, m, xq, dx, sx, K, y); break;
  }
}

template <int BITS, typename T>
void gguf_matmul(const T* x, const uint8_t* codes, const uint16_t* d, const uint16_t* m, T* y, int64_t M, int64_t N,
                 int64_t K) {
  constexpr int64_t NR = 4;  // weight rows per tile
  constexpr int64_t AHEAD = 16;  // tiles between the one multiplied and the one prefetched
  const int64_t G = K / BLOCK, row_bytes = BITS == 8 ? K : K / 2;
  std::vector<int8_t> xq(M * K);
  std::vector<float> dx(M * G), sx(M * G);
  quantize_rows(x, M, K, xq.data(), dx.data(), sx.data());
  // tiles of weight rows split over threads; each tile is unpacked once per ROWS activation rows
  at::parallel_for(0, (N + NR - 1) / NR, 4, [&](int64_t begin, int64_t end) {
    float out[NR * ROWS];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * NR, nr = std::min<int64_t>(NR, N - n);
      const uint8_t* c = codes + n * row_bytes;
      const uint16_t* dn = d + n * G;
      const uint16_t* mn = m + n * G;
      if (t + AHEAD < end) {  // a later tile's weights, on their way from memory while this one is multiplied
        const int64_t later = (t + AHEAD) * NR, rows = std::min<int64_t>(NR, N - later);
        for (int64_t b = 0; b < rows * row_bytes; b += 64) __builtin_prefetch(codes + later * row_bytes + b);
        for (int64_t b = 0; b < rows * G * 2; b += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(d + later * G) + b);
          __builtin_prefetch(reinterpret_cast<const char*>(m + later * G) + b);
        }
      }
      for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
        const int64_t R = std::min<int64_t>(ROWS, M - r0);
        const int8_t* xr = xq.data() + r0 * K;
        const float* dr = dx.data() + r0 * G;
        const float* sr = sx.data() + r0 * G;
        switch (R) {
          case 2: tile<BITS, 2>(nr, c, row_bytes, dn, mn, xr, dr, sr, K, out); break;
          default: tile<BITS, 1>(nr, c, row_bytes, dn, mn, xr, dr, sr, K, out); break;
        }
        for (int64_t i = 0; i < nr; ++i)
          for (int64_t r = 0; r < R; ++r) y[(r0 + r) * N + n + i] = static_cast<T>(out[i * R + r]);
      }
    }
  });
}

}  // namespace

// x [M, K] float32 or bfloat16; codes [N, K / 2] (bits 4) or [N, K] (bits 8) uint8; d, m [N, K / 32] float16
// -> y [M, N] in x's dtype
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor d, torch::Tensor m, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, not ", bits);
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-d CPU tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), G = K / BLOCK;
  TORCH_CHECK(K % BLOCK == 0, "in_features ", K, " is not a multiple of ", BLOCK);
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 2 && codes.is_contiguous() &&
                  codes.size(1) == (bits == 8 ? K : K / 2), "codes must be contiguous uint8 [N, K * bits / 8]");
  for (const auto& t : {d, m})
    TORCH_CHECK(t.scalar_type() == torch::kFloat16 && t.is_contiguous() && t.dim() == 2 && t.size(0) == N &&
                    t.size(1) == G, "d and m must be contiguous float16 [N, K / 32]");
  auto xc = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  const auto* c = codes.data_ptr<uint8_t>();
  const auto* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const auto* mp = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
  if (x.scalar_type() == torch::kFloat32) {
    if (bits == 4) gguf_matmul<4>(xc.data_ptr<float>(), c, dp, mp, y.data_ptr<float>(), M, N, K);
    else gguf_matmul<8>(xc.data_ptr<float>(), c, dp, mp, y.data_ptr<float>(), M, N, K);
  } else {
    using bf16 = c10::BFloat16;
    if (bits == 4) gguf_matmul<4>(xc.data_ptr<bf16>(), c, dp, mp, y.data_ptr<bf16>(), M, N, K);
    else gguf_matmul<8>(xc.data_ptr<bf16>(), c, dp, mp, y.data_ptr<bf16>(), M, N, K);
  }
  return y;
}
