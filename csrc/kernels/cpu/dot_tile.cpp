#include "dot_tile.h"

#include "scalar.h"

#include <algorithm>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SSAE_DOT_TILE_AVX512 1
#endif

namespace ssae::cpu {

#ifdef SSAE_DOT_TILE_AVX512
namespace {

#define AVX512 __attribute__((target("avx512f"), always_inline)) inline
// GCC 12 flags the _mm512_undefined_ps() inside _mm512_shuffle_f32x4 (and other
// lane extractions) as (maybe) uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

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

// c[i, j] = lane 4 i + j of sums (sum16's layout) for i < RA, j < cols. Whole
// rows of 4 go out as one store: GCC turns the element loop into a memcpy call
// per row, which cost 5% of the encode.
template <int RA>
AVX512 void store_block(__m512 sums, float* c, int64_t ldc, int cols) {
  if (cols == 4) {
    const __m128 q[4] = {_mm512_extractf32x4_ps(sums, 0), _mm512_extractf32x4_ps(sums, 1),
                         _mm512_extractf32x4_ps(sums, 2), _mm512_extractf32x4_ps(sums, 3)};
    for (int i = 0; i < RA; ++i) _mm_storeu_ps(c + i * ldc, q[i]);
    return;
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sums);
  for (int i = 0; i < RA; ++i)
    for (int j = 0; j < cols; ++j) c[i * ldc + j] = lanes[4 * i + j];
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
  store_block<RA>(sum16(acc), c, ldc, cols);
}

#undef AVX512

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

// One 16-lane accumulator reduced in sum16's order: with 4-lane groups g0..g3,
// q = (g0 + g2) + (g1 + g3), then (q0 + q2) + (q1 + q3).
__attribute__((target("avx512f"))) float sum16_one(__m512 v) {
  const __m128 q = _mm_add_ps(_mm_add_ps(_mm512_extractf32x4_ps(v, 0), _mm512_extractf32x4_ps(v, 2)),
                              _mm_add_ps(_mm512_extractf32x4_ps(v, 1), _mm512_extractf32x4_ps(v, 3)));
  alignas(16) float e[4];
  _mm_store_ps(e, q);
  return (e[0] + e[2]) + (e[1] + e[3]);
}

__attribute__((target("avx512f"))) float dot_one_avx512(int64_t d, const float* a, const float* b) {
  __m512 acc = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 16 <= d; t += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + t), _mm512_loadu_ps(b + t), acc);
  if (t < d) {
    const __mmask16 m = __mmask16((1u << (d - t)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + t), _mm512_maskz_loadu_ps(m, b + t), acc);
  }
  return sum16_one(acc);
}

__attribute__((target("avx512f"))) void dot_gather_avx512(int64_t d, const float* a, const float* b,
                                                           const int32_t* cols, int64_t n, float* out) {
  constexpr int kChains = 4;
  int64_t i = 0;
  for (; i + kChains <= n; i += kChains) {
    __m512 acc[kChains];
    const float* bi[kChains];
    for (int q = 0; q < kChains; ++q) acc[q] = _mm512_setzero_ps(), bi[q] = b + int64_t(cols[i + q]) * d;
    int64_t t = 0;
    for (; t + 16 <= d; t += 16) {
      const __m512 av = _mm512_loadu_ps(a + t);
      for (int q = 0; q < kChains; ++q) acc[q] = _mm512_fmadd_ps(av, _mm512_loadu_ps(bi[q] + t), acc[q]);
    }
    if (t < d) {
      const __mmask16 m = __mmask16((1u << (d - t)) - 1);
      const __m512 av = _mm512_maskz_loadu_ps(m, a + t);
      for (int q = 0; q < kChains; ++q) acc[q] = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, bi[q] + t), acc[q]);
    }
    for (int q = 0; q < kChains; ++q) out[i + q] = sum16_one(acc[q]);
  }
  for (; i < n; ++i) out[i] = dot_one_avx512(d, a, b + int64_t(cols[i]) * d);
}

// -------------------------------------------------------- bfloat16 operands

// The 16 bfloat16 values of h back in float32 (their bits in the high halves).
__attribute__((target("avx512f"), always_inline)) inline __m512 bf16_to_float(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

#define AVX512BF16 __attribute__((target("avx512f,avx512bf16"), always_inline)) inline

// A block of R rows against one or two panels of 16 latents: the row's
// bfloat16 pair p, broadcast, times the panel's pair p of 16 latents per
// vdpbf16ps. Sums stay in their lanes (no horizontal reduction) and the
// operands cost 2 + R loads per 2R instructions.
typedef uint32_t pair_t __attribute__((may_alias));

template <int R, bool kTwo>
AVX512BF16 void panel_block(const uint16_t* a, int64_t ld, const uint16_t* p0, const uint16_t* p1, float* c,
                            int64_t ldc, int cols) {
  __m512 acc0[R], acc1[R];
  for (int i = 0; i < R; ++i) acc0[i] = _mm512_setzero_ps(), acc1[i] = _mm512_setzero_ps();
  const pair_t* ap = reinterpret_cast<const pair_t*>(a);
  const int64_t pairs = ld / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(p0 + p * 32);
    const __m512bh w1 = kTwo ? (__m512bh)_mm512_loadu_si512(p1 + p * 32) : w0;
    for (int i = 0; i < R; ++i) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(int(ap[i * pairs + p]));
      acc0[i] = _mm512_dpbf16_ps(acc0[i], x, w0);
      if (kTwo) acc1[i] = _mm512_dpbf16_ps(acc1[i], x, w1);
    }
  }
  const __mmask16 m0 = cols >= 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? __mmask16(0xffff) : cols <= 16 ? __mmask16(0) : __mmask16((1u << (cols - 16)) - 1);
  for (int i = 0; i < R; ++i) {
    _mm512_mask_storeu_ps(c + i * ldc, m0, acc0[i]);
    if (kTwo) _mm512_mask_storeu_ps(c + i * ldc + 16, m1, acc1[i]);
  }
}

#undef AVX512BF16

constexpr int kPanelRows = 12;  // 24 accumulators + 2 panels + a broadcast: 27 of the 32 registers

template <bool kTwo, int R = kPanelRows>
__attribute__((target("avx512f,avx512bf16"))) void panel_rows(int r, const uint16_t* a, int64_t ld,
                                                              const uint16_t* p0, const uint16_t* p1, float* c,
                                                              int64_t ldc, int cols) {
  if constexpr (R > 1) {
    if (r < R) return panel_rows<kTwo, R - 1>(r, a, ld, p0, p1, c, ldc, cols);
  }
  panel_block<R, kTwo>(a, ld, p0, p1, c, ldc, cols);
}

__attribute__((target("avx512f,avx512bf16"))) void dot_tile_bf16_impl(int64_t rows, int64_t cols, int64_t ld,
                                                                          const uint16_t* a, const uint16_t* panels,
                                                                          float* c, int64_t ldc) {
  for (int64_t j0 = 0; j0 < cols; j0 += 32) {
    const int nc = int(std::min<int64_t>(32, cols - j0));
    const uint16_t* p0 = panels + j0 * ld;  // panel j0 / 16: 16 latents x ld values
    const uint16_t* p1 = p0 + 16 * ld;
    for (int64_t r0 = 0; r0 < rows; r0 += kPanelRows) {
      const int r = int(std::min<int64_t>(kPanelRows, rows - r0));
      if (nc > 16) panel_rows<true>(r, a + r0 * ld, ld, p0, p1, c + r0 * ldc + j0, ldc, nc);
      else panel_rows<false>(r, a + r0 * ld, ld, p0, p1, c + r0 * ldc + j0, ldc, nc);
    }
  }
}

// Transposes 16 x 16 32-bit elements: v[i] lane j becomes v[j] lane i.
__attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512i v[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Each 128-bit lane of v[4q + s] now holds column 4 L + s of rows 4q..4q+3 (L the lane): regroup the lanes.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    v[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    v[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    v[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// The 32 bfloat16 values from t of a float32 row of d (zeros past d), and their
// squares and rounding residuals' squares added to sq and res.
__attribute__((target("avx512f,avx512bf16"), always_inline)) inline __m512i convert32(const float* src, int64_t d,
                                                                                     int64_t t, __m512& sq,
                                                                                     __m512& res) {
  const auto mask = [d](int64_t from) {
    return from >= d ? __mmask16(0) : d - from >= 16 ? __mmask16(0xffff) : __mmask16((1u << (d - from)) - 1);
  };
  const __m512 lo = _mm512_maskz_loadu_ps(mask(t), src + t), hi = _mm512_maskz_loadu_ps(mask(t + 16), src + t + 16);
  const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lo in the low half
  sq = _mm512_fmadd_ps(hi, hi, _mm512_fmadd_ps(lo, lo, sq));
  // The residuals are exact in float32: src and its rounding share the leading bits.
  const __m512 res_lo = _mm512_sub_ps(lo, bf16_to_float(_mm512_castsi512_si256(packed)));
  const __m512 res_hi = _mm512_sub_ps(hi, bf16_to_float(_mm512_extracti64x4_epi64(packed, 1)));
  res = _mm512_fmadd_ps(res_hi, res_hi, _mm512_fmadd_ps(res_lo, res_lo, res));
  return packed;
}

// Packs cols latents into panels of 16 (dot_tile_bf16's layout), 32 values
// of 16 latents at a time through a transpose of their 32-bit pairs. F (float
// or uint16_t) is the source type: float32 rows are rounded to bfloat16, with
// their norms written to norms.
template <typename F>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void pack_panels_impl(int64_t cols, int64_t d, int64_t ld,
                                                                              const F* w, uint16_t* panels,
                                                                              Bf16Norms* norms) {
  for (int64_t g = 0; g * 16 < cols; ++g) {
    const int64_t n = std::min<int64_t>(16, cols - g * 16);
    __m512 sq[16], res[16];
    for (int j = 0; j < 16; ++j) sq[j] = _mm512_setzero_ps(), res[j] = _mm512_setzero_ps();
    uint16_t* panel = panels + g * 16 * ld;
    for (int64_t t = 0; t < ld; t += 32) {
      __m512i v[16];
      for (int j = 0; j < 16; ++j) {
        const F* row = w + (g * 16 + j) * d;
        if (j >= n) {
          v[j] = _mm512_setzero_si512();
        } else if constexpr (std::is_same_v<F, float>) {
          v[j] = convert32(row, d, t, sq[j], res[j]);
        } else {
          const __mmask32 m = t >= d ? 0 : d - t >= 32 ? ~__mmask32(0) : (__mmask32(1) << (d - t)) - 1;
          v[j] = _mm512_maskz_loadu_epi16(m, row + t);
        }
      }
      transpose16(v);
      for (int q = 0; q < 16; ++q) _mm512_storeu_si512(panel + (t / 2 + q) * 32, v[q]);
    }
    if constexpr (std::is_same_v<F, float>)
      for (int64_t j = 0; j < n; ++j) norms[g * 16 + j] = {_mm512_reduce_add_ps(sq[j]), _mm512_reduce_add_ps(res[j])};
  }
}

__attribute__((target("avx512f,avx512bf16"))) Bf16Norms to_bf16_row_impl(int64_t d, int64_t ld, const float* src,
                                                                          uint16_t* dst) {
  __m512 sq = _mm512_setzero_ps(), res = _mm512_setzero_ps();
  for (int64_t t = 0; t < ld; t += 32) _mm512_storeu_si512(dst + t, convert32(src, d, t, sq, res));
  return {_mm512_reduce_add_ps(sq), _mm512_reduce_add_ps(res)};
}

bool detect_avx512bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

#pragma GCC diagnostic pop

}  // namespace

bool dot_tile_fast() {
  static const bool fast = detect_avx512f();
  return fast;
}

bool dot_tile_bf16_available() {
  static const bool available = detect_avx512bf16();
  return available;
}

float dot_tile_one(int64_t d, const float* a, const float* b) { return dot_one_avx512(d, a, b); }

void dot_tile_gather(int64_t d, const float* a, const float* b, const int32_t* cols, int64_t n, float* out) {
  dot_gather_avx512(d, a, b, cols, n, out);
}

void dot_tile_bf16(int64_t rows, int64_t cols, int64_t ld, const uint16_t* a, const uint16_t* panels, float* c,
                   int64_t ldc) {
  dot_tile_bf16_impl(rows, cols, ld, a, panels, c, ldc);
}

void pack_bf16_panels(int64_t cols, int64_t d, int64_t ld, const float* w, uint16_t* panels, Bf16Norms* norms) {
  pack_panels_impl<float>(cols, d, ld, w, panels, norms);
}

void pack_bf16_panels(int64_t cols, int64_t d, int64_t ld, const uint16_t* w, uint16_t* panels) {
  pack_panels_impl<uint16_t>(cols, d, ld, w, panels, nullptr);
}

Bf16Norms to_bf16_row(int64_t d, int64_t ld, const float* src, uint16_t* dst) {
  return to_bf16_row_impl(d, ld, src, dst);
}
#else
bool dot_tile_fast() { return false; }
bool dot_tile_bf16_available() { return false; }
// Callers check dot_tile_fast() / dot_tile_bf16_available() first.
float dot_tile_one(int64_t, const float*, const float*) { __builtin_trap(); }
void dot_tile_gather(int64_t, const float*, const float*, const int32_t*, int64_t, float*) { __builtin_trap(); }
void dot_tile_bf16(int64_t, int64_t, int64_t, const uint16_t*, const uint16_t*, float*, int64_t) { __builtin_trap(); }
void pack_bf16_panels(int64_t, int64_t, int64_t, const float*, uint16_t*, Bf16Norms*) { __builtin_trap(); }
void pack_bf16_panels(int64_t, int64_t, int64_t, const uint16_t*, uint16_t*) { __builtin_trap(); }
Bf16Norms to_bf16_row(int64_t, int64_t, const float*, uint16_t*) { __builtin_trap(); }
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
