#include "dot_tile.h"

#include "scalar.h"

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SSAE_DOT_TILE_AVX512 1
#endif

namespace ssae::cpu {

#ifdef SSAE_DOT_TILE_AVX512
namespace {

#define AVX512 __attribute__((target("avx512f"), always_inline)) inline
// GCC 12 flags the _mm512_undefined_ps() inside _mm512_shuffle_f32x4 as maybe uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// The 16 horizontal sums of v[0..15] in one register: lane 4 i + j holds the sum
// of v[4 j + i]. Four levels of shuffle-and-add (30 shuffles, 15 adds) instead of
// 16 separate reductions (about 8 dependent operations each).
AVX512 __m512 sum16(const __m512 v[16]) {
  __m512 u[8], w[4], z[2];
  // u[m]: 128-bit lanes 0-1 hold partial sums of v[2m], lanes 2-3 of v[2m + 1]
  for (int m = 0; m < 8; ++m)
    u[m] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * m], v[2 * m + 1], 0xEE));
  // w[n]: lane L holds four partial sums of v[4n + L]
  for (int n = 0; n < 4; ++n)
    w[n] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * n], u[2 * n + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * n], u[2 * n + 1], 0xDD));
  // z[p]: lane L holds two partial sums of v[8p + L], then two of v[8p + 4 + L]
  for (int p = 0; p < 2; ++p)
    z[p] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * p], w[2 * p + 1], 0x44),
                         _mm512_shuffle_ps(w[2 * p], w[2 * p + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
}

// Latents are prefetched this far ahead into L2, by the first row block that
// passes over them. The hardware prefetcher alone left the 20-row retrieval
// block at 52 GFLOP/s (memory stalls); with this, 80 (96 with data in cache).
// Into L1 (_MM_HINT_T0) it gained little; 4 or 12 latents ahead did worse.
constexpr int64_t kPrefetchLatents = 8;

// acc[4 j + i] += a[i, t:t+16] * b[j][t:t+16], the lanes outside `mask` read as 0.
// With `prefetch`, the latents kPrefetchLatents ahead of b are fetched into L2.
template <int RA, bool kFull>
AVX512 void fma_step(__m512 acc[16], const float* a, int64_t d, const float* const b[4], int64_t t, __mmask16 mask,
                     bool prefetch) {
  __m512 bv[4];
  if (prefetch)
    for (int j = 0; j < 4; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(b[j] + kPrefetchLatents * d + t), _MM_HINT_T1);
  for (int j = 0; j < 4; ++j) bv[j] = kFull ? _mm512_loadu_ps(b[j] + t) : _mm512_maskz_loadu_ps(mask, b[j] + t);
  for (int i = 0; i < RA; ++i) {
    const __m512 av = kFull ? _mm512_loadu_ps(a + i * d + t) : _mm512_maskz_loadu_ps(mask, a + i * d + t);
    for (int j = 0; j < 4; ++j) acc[4 * j + i] = _mm512_fmadd_ps(av, bv[j], acc[4 * j + i]);
  }
}

// c[i, j] for the RA rows at a against the 4 latents at b[0..3] (of which the
// first `cols` are stored): 4 RA accumulators of 16 lanes over d.
template <int RA>
AVX512 void block(const float* a, int64_t d, const float* const b[4], float* c, int64_t ldc, int cols, bool prefetch) {
  __m512 acc[16];
  for (auto& v : acc) v = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 16 <= d; t += 16) fma_step<RA, true>(acc, a, d, b, t, 0, prefetch);
  if (t < d) fma_step<RA, false>(acc, a, d, b, t, __mmask16((1u << (d - t)) - 1), false);
  alignas(64) float sums[16];
  _mm512_store_ps(sums, sum16(acc));
  for (int i = 0; i < RA; ++i)
    for (int j = 0; j < cols; ++j) c[i * ldc + j] = sums[4 * i + j];
}

#undef AVX512
#pragma GCC diagnostic pop

__attribute__((target("avx512f"))) void dot_tile_avx512(int64_t rows, int64_t cols, int64_t d, const float* a,
                                                         const float* b, float* c, int64_t ldc) {
  // Latents outer, 4 at a time: their 4 d floats stay in L1 while every row
  // block passes over them, so each latent is read from memory once.
  for (int64_t j0 = 0; j0 < cols; j0 += 4) {
    const int nc = int(std::min<int64_t>(4, cols - j0));
    // A partial group repeats its last latent; the repeats are not stored.
    const float* bj[4];
    for (int j = 0; j < 4; ++j) bj[j] = b + (j0 + std::min(j, nc - 1)) * d;
    const bool ahead_in_tile = j0 + kPrefetchLatents + 4 <= cols;
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const float* ar = a + r0 * d;
      float* cr = c + r0 * ldc + j0;
      const bool prefetch = r0 == 0 && ahead_in_tile;
      switch (std::min<int64_t>(4, rows - r0)) {
        case 4: block<4>(ar, d, bj, cr, ldc, nc, prefetch); break;
        case 3: block<3>(ar, d, bj, cr, ldc, nc, prefetch); break;
        case 2: block<2>(ar, d, bj, cr, ldc, nc, prefetch); break;
        default: block<1>(ar, d, bj, cr, ldc, nc, prefetch); break;
      }
    }
  }
}

bool detect_avx512f() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

}  // namespace

bool dot_tile_fast() {
  static const bool fast = detect_avx512f();
  return fast;
}
#else
bool dot_tile_fast() { return false; }
#endif

namespace {

// Without AVX-512F: 16 partial sums per dot product, which the compiler
// vectorises for whatever the CPU has (AVX2, or the SSE2 baseline).
SSAE_MULTIVERSION
void dot_tile_portable(int64_t rows, int64_t cols, int64_t d, const float* a, const float* b, float* c,
                       int64_t ldc) {
  constexpr int64_t kLanes = 16;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) {
      const float* ar = a + r * d;
      const float* bj = b + j * d;
      float part[kLanes] = {};
      int64_t t = 0;
      for (; t + kLanes <= d; t += kLanes)
        for (int64_t u = 0; u < kLanes; ++u) part[u] += ar[t + u] * bj[t + u];
      float s = 0;
      for (int64_t u = 0; u < kLanes; ++u) s += part[u];
      for (; t < d; ++t) s += ar[t] * bj[t];
      c[r * ldc + j] = s;
    }
}

}  // namespace

void dot_tile(int64_t rows, int64_t cols, int64_t d, const float* a, const float* b, float* c, int64_t ldc) {
#ifdef SSAE_DOT_TILE_AVX512
  if (dot_tile_fast()) return dot_tile_avx512(rows, cols, d, a, b, c, ldc);
#endif
  dot_tile_portable(rows, cols, d, a, b, c, ldc);
}

}  // namespace ssae::cpu
