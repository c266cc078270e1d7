// Paged attention on the CPU: each query token attends over its own context, read from the KV cache's blocks in
// place (no gathered copy). A decode row is one token over its whole context; a prompt's token at position p is
// one token over the first p + 1 slots of its sequence (causal attention, token by token), so decode rows, prompt
// chunks and rows verifying draft tokens all go through one call, and a token's output does not depend on how its
// prompt was split into steps. The cache is heads-major, [Hkv, slots, D] (labkit.model.kv_cache.KVCache), so one
// block of one head is block_size * D contiguous values. Scores, softmax and the weighted sum of values are taken
// in float32 whatever the storage dtype (float32 or bfloat16). Work is split over (token, KV head) pairs; each pair
// reads its keys once for all the query heads that share them (grouped-query attention). On the bfloat16 fast path
// a prompt's consecutive tokens go in runs of up to 16, and a (run, KV head) pair reads each tile of keys once for
// the whole run, with the same sums, bit for bit, as each token alone.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vec.h"

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

// row t of a sequence's context in one head's slots: block table[t / bs], offset t % bs
template <typename T>
inline const T* slot_row(const T* head, const int64_t* table, int64_t t, int64_t bs, int64_t D) {
  return head + (table[t / bs] * bs + t % bs) * D;
}

// q_g . k_t for every query head g of the group, k_t one row of D values; D a multiple of 16 on the fast path
template <typename T>
inline void dots(const float* qf, const T* kt, int64_t group, int64_t D, float* out, int64_t stride) {
#if defined(__AVX512F__)
  if (D % 16 == 0 && D <= 256) {
    __m512 kv[16];
    for (int64_t c = 0; c < D / 16; ++c) kv[c] = load16(kt + c * 16);
    for (int64_t g = 0; g < group; ++g) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t c = 0; c < D / 16; ++c) s = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + c * 16), kv[c], s);
      out[g * stride] = _mm512_reduce_add_ps(s);
    }
    return;
  }
#endif
  for (int64_t g = 0; g < group; ++g) {
    float s = 0.f;
    for (int64_t d = 0; d < D; ++d) s += qf[g * D + d] * to_float(kt[d]);
    out[g * stride] = s;
  }
}

// acc_g += p_g * v_t for every query head g of the group
template <typename T>
inline void axpys(const float* p, int64_t stride, const T* vt, int64_t group, int64_t D, float* acc) {
#if defined(__AVX512F__)
  if (D % 16 == 0 && D <= 256) {
    for (int64_t c = 0; c < D / 16; ++c) {
      const __m512 x = load16(vt + c * 16);
      for (int64_t g = 0; g < group; ++g) {
        float* a = acc + g * D + c * 16;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[g * stride]), x, _mm512_loadu_ps(a)));
      }
    }
    return;
  }
#endif
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < D; ++d) acc[g * D + d] += p[g * stride] * to_float(vt[d]);
}

// exp(s - max s) in place; returns the sum (the softmax's denominator)
inline float softmax_in_place(float* s, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) top = s[t] > top ? s[t] : top;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    s[t] = std::exp(s[t] - top);
    sum += s[t];
  }
  return sum;
}

// A task's first keys (up to 32 rows), asked for while the task before it on the thread runs.
template <typename T>
inline void prefetch_first_keys(const T* head, const int64_t* table, int64_t len, int64_t bs, int64_t D) {
  for (int64_t t = 0; t < std::min<int64_t>(len, 32); ++t)
    for (int64_t line = 0; line < D * static_cast<int64_t>(sizeof(T)); line += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(slot_row(head, table, t, bs, D)) + line);
}

// a run of tokens of one sequence over one KV head (run_task_dpbf16)
using RunFn = void (*)(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, const c10::BFloat16*,
                       const int64_t*, int64_t, int64_t, float, c10::BFloat16*, int64_t, std::vector<float>&);

#if defined(__AVX512F__)
#if defined(__AVX512BF16__)
// The rows of a sequence are scattered over the cache in blocks, so the hardware prefetcher does not see them
// coming: the kernels ask for the keys PREFETCH_AHEAD tiles of 16 on, and for a tile's values as they score it
// (the values' pass reads them next).
constexpr int64_t PREFETCH_AHEAD = 2;
template <int64_t D, typename T>
inline void prefetch_rows(const T* head, const int64_t* table, int64_t bs, int64_t from, int64_t to, int64_t len) {
  for (int64_t t = from; t < std::min(to, len); ++t)
    for (int64_t line = 0; line < D * static_cast<int64_t>(sizeof(T)); line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(slot_row(head, table, t, bs, D)) + line, _MM_HINT_T1);
}

// a + b rounded to nearest, as written: a builtin the compiler does not reassociate under -ffast-math (plain
// _mm512_add_ps is a vector +, which it may regroup), so that two trees of the same sums agree bit for bit
inline __m512 add_exact(__m512 a, __m512 b) {
  return _mm512_add_round_ps(a, b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// lane j of the result = the sum of the 16 lanes of s[j]: a transposing tree of 45 instructions, where 16
// horizontal sums would take ~130. The sums, lane l of s[j] written s_l: y_k = (s_4k + s_4k+2) + (s_4k+1 + s_4k+3),
// then (y_0 + y_1) + (y_2 + y_3).
inline __m512 sum16x16(const __m512* s) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit chunk: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[i] = add_exact(_mm512_unpacklo_ps(s[2 * i], s[2 * i + 1]), _mm512_unpackhi_ps(s[2 * i], s[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // chunk c, lane l: chunk c's partial sum of row 4i + l
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = add_exact(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 x = add_exact(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 y = add_exact(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return add_exact(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
}

// A 16 x 16 matrix of 32-bit lanes transposed in registers: afterwards r[i] lane j holds what r[j] lane i held.
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + m], 128-bit chunk L: rows 4i..4i+3 at column 4L + m
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // the 128-bit chunks of r[m], r[4 + m], r[8 + m], r[12 + m], transposed
    const __m512i x0 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x44), x1 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xEE);
    t[m] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    t[4 + m] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    t[8 + m] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    t[12 + m] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// decode_row's sums for one query row against a tile of 16 keys transposed into pairs (kt[16c + l] lane j: the
// pair 16c + l of key j), bit for bit: accumulator l takes, for all 16 keys at once, the chain over the pairs
// 16c + l that lane l of decode_row's dpbf16 takes, and vertical adds follow sum16x16's tree. The tile is
// transposed once for a run of tokens, and no horizontal sums are left.
template <int C>
inline __m512 tile_row_scores(const c10::BFloat16* q, const __m512i* kt) {
  constexpr int P = C / 2;
  __m512 a[16];
  for (int l = 0; l < 16; ++l) a[l] = _mm512_setzero_ps();
  for (int c = 0; c < P; ++c)
#pragma GCC unroll 16
    for (int l = 0; l < 16; ++l) {
      int32_t pair;
      std::memcpy(&pair, q + 2 * (16 * c + l), sizeof pair);
      a[l] = _mm512_dpbf16_ps(a[l], (__m512bh)_mm512_set1_epi32(pair), (__m512bh)kt[16 * c + l]);
    }
  __m512 y[4];
  for (int k = 0; k < 4; ++k)
    y[k] = add_exact(add_exact(a[4 * k], a[4 * k + 2]), add_exact(a[4 * k + 1], a[4 * k + 3]));
  return add_exact(add_exact(y[0], y[1]), add_exact(y[2], y[3]));
}

// One token's G heads after their scores: softmax, the probabilities rounded to bfloat16, and their weighted sum of
// values, two value rows at a time: the rows' elements interleaved in pairs and one dpbf16 per 16 outputs adds
// p_t v_t + p_t+1 v_t+1 (as a bf16 flash-attention kernel's second product does), the sums in float32.
template <int G, int C>
void attend_values(float* scores, int64_t s_stride, int64_t len, const c10::BFloat16* vh, const int64_t* table,
                   int64_t bs, c10::BFloat16* out) {
  constexpr int64_t D = 16 * C;
  constexpr int P = C / 2;  // 32-value chunks of a row
  static const uint16_t zero_row[D] = {};
  // probabilities (unnormalised) as bfloat16, each head's row padded to an even length with a zero
  const int64_t even = (len + 1) & ~int64_t{1};
  thread_local std::vector<uint16_t> pb;
  pb.resize(G * even);
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* sg = scores + g * s_stride;
    inv[g] = 1.f / softmax_in_place(sg, len);
    uint16_t* pg = pb.data() + g * even;
    int64_t t = 0;
    for (; t + 32 <= len; t += 32)
      _mm512_storeu_si512(pg + t,
                          (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(sg + t + 16), _mm512_loadu_ps(sg + t)));
    for (; t < len; ++t) pg[t] = round_bits(sg[t]);
    if (even != len) pg[len] = 0;
  }
  __m512 acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; t += 2) {
    const c10::BFloat16* v0 = slot_row(vh, table, t, bs, D);
    const c10::BFloat16* v1 =
        t + 1 < len ? slot_row(vh, table, t + 1, bs, D) : reinterpret_cast<const c10::BFloat16*>(zero_row);
    __m512bh p[G];
    for (int g = 0; g < G; ++g) {
      int32_t pair;
      std::memcpy(&pair, pb.data() + g * even + t, sizeof pair);  // (p_t, p_t+1)
      p[g] = (__m512bh)_mm512_set1_epi32(pair);
    }
    for (int c = 0; c < P; ++c) {
      const __m512i a = _mm512_loadu_si512(v0 + c * 32), b = _mm512_loadu_si512(v1 + c * 32);
      // 32-bit lane 4L + m: (v_t, v_t+1) at d = 32c + 8L + m (lo) and 32c + 8L + 4 + m (hi)
      const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b), hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
      for (int g = 0; g < G; ++g) {
        acc[g][2 * c] = _mm512_dpbf16_ps(acc[g][2 * c], lo, p[g]);
        acc[g][2 * c + 1] = _mm512_dpbf16_ps(acc[g][2 * c + 1], hi, p[g]);
      }
    }
  }
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < P; ++c) {  // back to d order
      const __m512 norm = _mm512_set1_ps(inv[g]);
      store16(out + g * D + c * 32,
              _mm512_mul_ps(_mm512_permutex2var_ps(acc[g][2 * c], first, acc[g][2 * c + 1]), norm));
      store16(out + g * D + c * 32 + 16,
              _mm512_mul_ps(_mm512_permutex2var_ps(acc[g][2 * c], second, acc[g][2 * c + 1]), norm));
    }
}

// One token (a decode row): scores 16 keys at a time, key row by key row: per key, dpbf16 takes the 32 exact bf16
// products of a 32-value chunk of the query and of the key, summed in float32 into 16 lanes (lane l: the pairs
// 16c + l of the chunks c, in turn), and one transposing tree (sum16x16) sums the 16 keys' lanes; then the values.
// Kept out of line, with its own prefetch loop: inlined into the run's code, or with prefetch_rows in that loop's
// place, decode rows ran measurably slower.
template <int G, int C>
__attribute__((noinline)) void decode_row(const c10::BFloat16* q, const c10::BFloat16* kh, const c10::BFloat16* vh,
                                          const int64_t* table, int64_t len, int64_t bs, float scale,
                                          c10::BFloat16* out, float* scores) {
  constexpr int64_t D = 16 * C;
  constexpr int P = C / 2;  // 32-value chunks of a row
  static const uint16_t zero_row[D] = {};
  auto row = [&](const c10::BFloat16* head, int64_t t) { return slot_row(head, table, t, bs, D); };
  __m512bh qb[G][P];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < P; ++c) qb[g][c] = (__m512bh)_mm512_loadu_si512(q + g * D + c * 32);
  auto prefetch = [&](const c10::BFloat16* base, int64_t from, int64_t to) {
    for (int64_t t = from; t < std::min(to, len); ++t)
      for (int64_t line = 0; line < D * 2; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row(base, t)) + line, _MM_HINT_T1);
  };
  prefetch(kh, 0, 16 * PREFETCH_AHEAD);
  const c10::BFloat16* rows[16];
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, len - t0));
    prefetch(kh, t0 + 16 * PREFETCH_AHEAD, t0 + 16 * (PREFETCH_AHEAD + 1));
    prefetch(vh, t0, t0 + 16);
    for (int j = 0; j < 16; ++j) rows[j] = j < n ? row(kh, t0 + j) : reinterpret_cast<const c10::BFloat16*>(zero_row);
    for (int g = 0; g < G; ++g) {
      __m512 s[16];
      for (int j = 0; j < 16; ++j) {
        s[j] = _mm512_setzero_ps();
        for (int c = 0; c < P; ++c)
          s[j] = _mm512_dpbf16_ps(s[j], qb[g][c], (__m512bh)_mm512_loadu_si512(rows[j] + c * 32));
      }
      _mm512_mask_storeu_ps(scores + g * len + t0, static_cast<__mmask16>((1u << n) - 1),
                            _mm512_mul_ps(sum16x16(s), _mm512_set1_ps(scale)));
    }
  }
  attend_values<G, C>(scores, len, len, vh, table, bs, out);
}

// The fast path for a bfloat16 cache on a CPU with AVX512-BF16, a group of G query heads, D = 16 * C (C even), and
// a run of R consecutive tokens of one sequence (a prompt's chunk, or a decode row alone), the first over len0
// keys, each next one over one more. A decode row is scored key row by key row (decode_row); a longer run reads
// and transposes each tile of 16 keys once for all its tokens (tile_row_scores), with the same sums bit for bit,
// so that a token's output does not depend on the run it came in. Each token's softmax and values follow.
template <int G, int C>
void run_task_dpbf16(const c10::BFloat16* q, int64_t q_stride, int64_t R, const c10::BFloat16* kh,
                     const c10::BFloat16* vh, const int64_t* table, int64_t len0, int64_t bs, float scale,
                     c10::BFloat16* out, int64_t out_stride, std::vector<float>& scores) {
  constexpr int64_t D = 16 * C;
  constexpr int P = C / 2;
  static const uint16_t zero_row[D] = {};
  const int64_t last = len0 + R - 1;  // the keys of the run's last token
  const int64_t stride = (last + 15) & ~int64_t{15};
  scores.resize(R * G * stride);
  if (R == 1) {
    decode_row<G, C>(q, kh, vh, table, len0, bs, scale, out, scores.data());
    return;
  }
  prefetch_rows<D>(kh, table, bs, 0, 16 * PREFETCH_AHEAD, last);
  __m512i kt[8 * C];
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < last; t0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, last - t0));
    prefetch_rows<D>(kh, table, bs, t0 + 16 * PREFETCH_AHEAD, t0 + 16 * (PREFETCH_AHEAD + 1), last);
    prefetch_rows<D>(vh, table, bs, t0, t0 + 16, last);
    for (int c = 0; c < P; ++c) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j)
        r[j] = _mm512_loadu_si512(j < n ? slot_row(kh, table, t0 + j, bs, D) + c * 32
                                        : reinterpret_cast<const c10::BFloat16*>(zero_row));
      transpose16(r);
      for (int i = 0; i < 16; ++i) kt[c * 16 + i] = r[i];
    }
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    for (int64_t r = std::max<int64_t>(0, t0 - len0 + 1); r < R; ++r)  // tokens whose keys end earlier skip it
      for (int g = 0; g < G; ++g)
        _mm512_mask_storeu_ps(scores.data() + (r * G + g) * stride + t0, mask,
                              _mm512_mul_ps(tile_row_scores<C>(q + r * q_stride + g * D, kt), sc));
  }
  for (int64_t r = 0; r < R; ++r)
    attend_values<G, C>(scores.data() + r * G * stride, stride, len0 + r, vh, table, bs, out + r * out_stride);
}

template <int C>
RunFn run_for_group(int64_t group) {
  switch (group) {
    case 1: return run_task_dpbf16<1, C>;
    case 2: return run_task_dpbf16<2, C>;
    case 3: return run_task_dpbf16<3, C>;
    case 4: return run_task_dpbf16<4, C>;
    case 5: return run_task_dpbf16<5, C>;
    case 6: return run_task_dpbf16<6, C>;
    case 7: return run_task_dpbf16<7, C>;
    case 8: return run_task_dpbf16<8, C>;
    default: return nullptr;
  }
}

// the run specialisation for (group, D), or null: groups of 1 to 8 heads, head sizes 64 and 128
inline RunFn fast_run(int64_t group, int64_t D) {
  if (D == 64) return run_for_group<4>(group);
  if (D == 128) return run_for_group<8>(group);
  return nullptr;
}
#endif

// The fast path for a group of G query heads and D = 16 * C where the run path does not serve (float32, or no
// AVX512-BF16): queries, the running sums and one key or value row live in registers.
template <typename T, int G, int C>
void decode_task(const T* q, const T* kh, const T* vh, const int64_t* table, int64_t len, int64_t bs, float scale,
                 T* out, float* scores) {
  constexpr int64_t D = 16 * C;
  __m512 qf[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) qf[g][c] = _mm512_mul_ps(load16(q + g * D + c * 16), _mm512_set1_ps(scale));
  for (int64_t t = 0; t < len; ++t) {
    const T* kt = slot_row(kh, table, t, bs, D);
    __m512 kf[C];
    for (int c = 0; c < C; ++c) kf[c] = load16(kt + c * 16);
    for (int g = 0; g < G; ++g) {
      __m512 s = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) s = _mm512_fmadd_ps(qf[g][c], kf[c], s);
      scores[g * len + t] = _mm512_reduce_add_ps(s);
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) inv[g] = 1.f / softmax_in_place(scores + g * len, len);
  __m512 acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    const T* vt = slot_row(vh, table, t, bs, D);
    for (int c = 0; c < C; ++c) {
      const __m512 x = load16(vt + c * 16);
      for (int g = 0; g < G; ++g) acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * len + t]), x, acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) store16(out + g * D + c * 16, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv[g])));
}

template <typename T>
using TaskFn = void (*)(const T*, const T*, const T*, const int64_t*, int64_t, int64_t, float, T*, float*);

// the specialisation for (group, D), or null: groups of 1 to 8 heads, head sizes 64 and 128
template <typename T, int C>
TaskFn<T> task_for_group(int64_t group) {
  switch (group) {
    case 1: return decode_task<T, 1, C>;
    case 2: return decode_task<T, 2, C>;
    case 3: return decode_task<T, 3, C>;
    case 4: return decode_task<T, 4, C>;
    case 5: return decode_task<T, 5, C>;
    case 6: return decode_task<T, 6, C>;
    case 7: return decode_task<T, 7, C>;
    case 8: return decode_task<T, 8, C>;
    default: return nullptr;
  }
}

template <typename T>
TaskFn<T> fast_task(int64_t group, int64_t D) {
  if (D == 64) return task_for_group<T, 4>(group);
  if (D == 128) return task_for_group<T, 8>(group);
  return nullptr;
}
#else
template <typename T>
using TaskFn = void (*)(const T*, const T*, const T*, const int64_t*, int64_t, int64_t, float, T*, float*);
template <typename T>
TaskFn<T> fast_task(int64_t, int64_t) { return nullptr; }
#endif
#if !(defined(__AVX512F__) && defined(__AVX512BF16__))
inline RunFn fast_run(int64_t, int64_t) { return nullptr; }
#endif

// Tokens in runs: consecutive tokens that read one block table with context lengths one apart (a prompt's chunk,
// draft tokens being verified), up to MAX_RUN; each (run, KV head) pair is a task.
void decode_runs(RunFn run, const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v,
                 const int64_t* tables, const int64_t* lens, const int64_t* rows, c10::BFloat16* out, int64_t N,
                 int64_t H, int64_t Hkv, int64_t D, int64_t slots, int64_t M, int64_t bs, float scale) {
  constexpr int64_t MAX_RUN = 16;
  std::vector<int64_t> starts;  // run i: tokens starts[i] .. starts[i + 1] - 1
  for (int64_t n = 0; n < N; ++n) {
    const bool joins = n > 0 && rows != nullptr && rows[n] == rows[n - 1] && lens[n] == lens[n - 1] + 1 &&
                       n - starts.back() < MAX_RUN;
    if (!joins) starts.push_back(n);
  }
  starts.push_back(N);
  const int64_t group = H / Hkv, tasks = (static_cast<int64_t>(starts.size()) - 1) * Hkv;
  // tasks dealt round-robin, one stride per thread: a prompt's runs attend over more keys the later they come,
  // and contiguous ranges would give the last thread the longest ones
  const int64_t stride = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  at::parallel_for(0, stride, 1, [&](int64_t first, int64_t last) {
    std::vector<float> scores;
    for (int64_t lane = first; lane < last; ++lane)
      for (int64_t i = lane; i < tasks; i += stride) {
        const int64_t r = i / Hkv, h = i % Hkv, n = starts[r], R = starts[r + 1] - n;
        const int64_t* table = tables + (rows != nullptr ? rows[n] : n) * M;
        if (i + stride < tasks) {  // the next task's first keys, on their way while this one runs
          const int64_t nn = starts[(i + stride) / Hkv];
          prefetch_first_keys(k + ((i + stride) % Hkv) * slots * D, tables + (rows != nullptr ? rows[nn] : nn) * M,
                              lens[nn], bs, D);
        }
        const int64_t at = (n * H + h * group) * D;
        run(q + at, H * D, R, k + h * slots * D, v + h * slots * D, table, lens[n], bs, scale, out + at, H * D,
            scores);
      }
  });
}

template <typename T>
void decode(const T* q, const T* k, const T* v, const int64_t* tables, const int64_t* lens, const int64_t* rows,
            T* out, int64_t N, int64_t H, int64_t Hkv, int64_t D, int64_t slots, int64_t M, int64_t block_size,
            float scale) {
  const int64_t group = H / Hkv, bs = block_size;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (const RunFn run = fast_run(group, D); run != nullptr) {
      decode_runs(run, q, k, v, tables, lens, rows, out, N, H, Hkv, D, slots, M, block_size, scale);
      return;
    }
  }
  const int64_t tasks = N * Hkv;
  const TaskFn<T> task = fast_task<T>(group, D);
  // tasks dealt round-robin, one stride per thread: a prompt's tokens attend over 1, 2, ... keys, and contiguous
  // ranges would give the last thread the longest ones
  const int64_t stride = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  at::parallel_for(0, stride, 1, [&](int64_t first, int64_t last) {
    std::vector<float> qf(group * D), acc(group * D), scores, total(group);
    for (int64_t lane = first; lane < last; ++lane)
      for (int64_t i = lane; i < tasks; i += stride) {
        const int64_t n = i / Hkv, h = i % Hkv, len = lens[n];
        const int64_t* table = tables + (rows != nullptr ? rows[n] : n) * M;
        const T* kh = k + h * slots * D;
        const T* vh = v + h * slots * D;
        if (i + stride < tasks) {  // the next task's first keys, on their way while this one runs
          const int64_t nn = (i + stride) / Hkv;
          prefetch_first_keys(k + ((i + stride) % Hkv) * slots * D, tables + (rows != nullptr ? rows[nn] : nn) * M,
                              lens[nn], bs, D);
        }
        scores.resize(group * len);
        if (task != nullptr) {
          const int64_t at = (n * H + h * group) * D;
          task(q + at, kh, vh, table, len, bs, scale, out + at, scores.data());
          continue;
        }
        for (int64_t g = 0; g < group; ++g)
          for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_float(q[(n * H + h * group + g) * D + d]) * scale;
        for (int64_t t = 0; t < len; ++t)  // scores[g, t] = q_g . k_t
          dots(qf.data(), slot_row(kh, table, t, bs, D), group, D, scores.data() + t, len);
        for (int64_t g = 0; g < group; ++g) total[g] = softmax_in_place(scores.data() + g * len, len);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = 0; t < len; ++t)  // acc[g] = sum_t p[g, t] v_t
          axpys(scores.data() + t, len, slot_row(vh, table, t, bs, D), group, D, acc.data());
        for (int64_t g = 0; g < group; ++g) {
          const float inv = 1.f / total[g];
          for (int64_t d = 0; d < D; ++d) out[(n * H + h * group + g) * D + d] = static_cast<T>(acc[g * D + d] * inv);
        }
      }
  });
}

}  // namespace

// q [N, H, D]; k_cache, v_cache [Hkv, slots, D] contiguous; block_tables [B, M] int64; context_lens [N] int64: the
// slots token n attends over; token_rows [N] int64: the row of block_tables token n reads (none: row n, N == B).
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                           torch::Tensor context_lens, int64_t block_size, double scale,
                           std::optional<torch::Tensor> token_rows) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "q and the cache must share a dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the cache must be heads-major and contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && context_lens.scalar_type() == torch::kInt64,
              "block tables and context lengths must be int64");
  auto qc = q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(0), slots = k_cache.size(1);
  const int64_t B = tables.size(0), M = tables.size(1);
  TORCH_CHECK(k_cache.size(2) == D && H % Hkv == 0 && lens.dim() == 1 && lens.size(0) == N, "bad shapes");
  torch::Tensor rows;
  if (token_rows.has_value()) {
    rows = token_rows->contiguous();
    TORCH_CHECK(rows.scalar_type() == torch::kInt64 && rows.dim() == 1 && rows.size(0) == N,
                "token_rows must be [N] int64");
    const int64_t* r = rows.data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n) TORCH_CHECK(r[n] >= 0 && r[n] < B, "token row ", r[n], " is not a table row");
  } else {
    TORCH_CHECK(B == N, "without token_rows, one block table per query token");
  }
  const int64_t* l = lens.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(l[n] >= 1 && l[n] <= M * block_size, "context length ", l[n], " does not fit its block table");
  const int64_t* r = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  auto out = torch::empty_like(qc);
  const float s = static_cast<float>(scale);
  if (q.scalar_type() == torch::kFloat32) {
    decode<float>(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                  tables.data_ptr<int64_t>(), l, r, out.data_ptr<float>(), N, H, Hkv, D, slots, M, block_size, s);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "paged_decode takes float32 or bfloat16");
    decode<c10::BFloat16>(qc.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                          v_cache.data_ptr<c10::BFloat16>(), tables.data_ptr<int64_t>(), l, r,
                          out.data_ptr<c10::BFloat16>(), N, H, Hkv, D, slots, M, block_size, s);
  }
  return out;
}
