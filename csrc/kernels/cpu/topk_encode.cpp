#include "topk_encode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "dot_tile.h"
#include "scalar.h"

namespace ssae::cpu {
namespace {

// Total order of (score, latent): larger score first, NaN above everything,
// equal scores by lower latent.
template <typename A>
inline bool ranks_before(A av, int32_t ai, A bv, int32_t bi) {
  if (av > bv) return true;  // the common case first
  if (av < bv) return false;
  const bool an = std::isnan(av), bn = std::isnan(bv);
  if (an != bn) return an;
  return ai < bi;  // equal, or both NaN
}

constexpr int64_t kChunk = 16;

// Position of the first 16-wide chunk holding a score that beats theta, or n
// rounded down to a chunk. "Beats" is !(s + b <= theta), which is also true for
// NaN. After the first tiles almost no chunk does, so this test is nearly all
// the selection costs: GCC does not vectorise the early exit, hence intrinsics.
template <typename A>
int64_t next_hit_scalar(const A* s, const A* b, int64_t n, A theta) {
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    bool hit = false;
    for (int64_t t = 0; t < kChunk; ++t) hit |= !(s[j + t] + b[j + t] <= theta);
    if (hit) return j;
  }
  return j;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) int64_t next_hit_avx512(const float* s, const float* b, int64_t n, float theta) {
  const __m512 th = _mm512_set1_ps(theta);
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk)
    if (_mm512_cmp_ps_mask(_mm512_add_ps(_mm512_loadu_ps(s + j), _mm512_loadu_ps(b + j)), th, _CMP_NLE_UQ)) return j;
  return j;
}
__attribute__((target("avx512f"))) int64_t next_hit_avx512(const double* s, const double* b, int64_t n, double theta) {
  const __m512d th = _mm512_set1_pd(theta);
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    const __mmask8 lo = _mm512_cmp_pd_mask(_mm512_add_pd(_mm512_loadu_pd(s + j), _mm512_loadu_pd(b + j)), th, _CMP_NLE_UQ);
    const __mmask8 hi = _mm512_cmp_pd_mask(_mm512_add_pd(_mm512_loadu_pd(s + j + 8), _mm512_loadu_pd(b + j + 8)), th, _CMP_NLE_UQ);
    if (lo | hi) return j;
  }
  return j;
}
__attribute__((target("avx2"))) int64_t next_hit_avx2(const float* s, const float* b, int64_t n, float theta) {
  const __m256 th = _mm256_set1_ps(theta);
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    const __m256 lo = _mm256_cmp_ps(_mm256_add_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(b + j)), th, _CMP_NLE_UQ);
    const __m256 hi = _mm256_cmp_ps(_mm256_add_ps(_mm256_loadu_ps(s + j + 8), _mm256_loadu_ps(b + j + 8)), th, _CMP_NLE_UQ);
    if (_mm256_movemask_ps(_mm256_or_ps(lo, hi))) return j;
  }
  return j;
}
__attribute__((target("avx2"))) int64_t next_hit_avx2(const double* s, const double* b, int64_t n, double theta) {
  const __m256d th = _mm256_set1_pd(theta);
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    __m256d any = _mm256_setzero_pd();
    for (int q = 0; q < 4; ++q)
      any = _mm256_or_pd(any, _mm256_cmp_pd(_mm256_add_pd(_mm256_loadu_pd(s + j + 4 * q), _mm256_loadu_pd(b + j + 4 * q)), th, _CMP_NLE_UQ));
    if (_mm256_movemask_pd(any)) return j;
  }
  return j;
}

enum class Isa { kScalar, kAvx2, kAvx512 };
Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
  return Isa::kScalar;
}
const Isa kIsa = detect_isa();

template <typename A>
inline int64_t next_hit(const A* s, const A* b, int64_t n, A theta) {
  switch (kIsa) {
    case Isa::kAvx512: return next_hit_avx512(s, b, n, theta);
    case Isa::kAvx2: return next_hit_avx2(s, b, n, theta);
    default: return next_hit_scalar(s, b, n, theta);
  }
}
#else
template <typename A>
inline int64_t next_hit(const A* s, const A* b, int64_t n, A theta) { return next_hit_scalar(s, b, n, theta); }
#endif

// One row of a screened tile: its screen scores and the factors of its bound
// (ScreenTile), numbered from the first latent collect_passing looks at.
struct ScreenedRow {
  const float* s;
  float a, b;
  const float *col_a, *col_b, *col_reach;
};

// Appends to `out` every latent j < n of `row` that may beat theta: screen
// score plus bound not below theta (true for NaN). AVX-512 where the CPU has
// it (always, where screening runs: it needs AVX512_BF16).
void collect_passing_scalar(const ScreenedRow& row, int64_t n, float theta, std::vector<int32_t>& out) {
  for (int64_t j = 0; j < n; ++j)
    if (!(row.s[j] + std::fma(row.a, row.col_a[j], std::fma(row.b, row.col_b[j], row.col_reach[j])) < theta))
      out.push_back(int32_t(j));
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) void collect_passing_avx512(const ScreenedRow& row, int64_t n, float theta,
                                                               std::vector<int32_t>& out) {
  const __m512 th = _mm512_set1_ps(theta), a = _mm512_set1_ps(row.a), b = _mm512_set1_ps(row.b);
  for (int64_t j = 0; j < n; j += kChunk) {
    const __mmask16 lanes = n - j >= kChunk ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    const __m512 bound = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(lanes, row.col_a + j),
                                         _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(lanes, row.col_b + j),
                                                         _mm512_maskz_loadu_ps(lanes, row.col_reach + j)));
    const __m512 upper = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, row.s + j), bound);
    for (unsigned m = _mm512_mask_cmp_ps_mask(lanes, upper, th, _CMP_NLT_UQ); m; m &= m - 1)
      out.push_back(int32_t(j + __builtin_ctz(m)));
  }
}

void collect_passing(const ScreenedRow& row, int64_t n, float theta, std::vector<int32_t>& out) {
  if (kIsa == Isa::kAvx512) return collect_passing_avx512(row, n, theta, out);
  collect_passing_scalar(row, n, theta, out);
}
#else
void collect_passing(const ScreenedRow& row, int64_t n, float theta, std::vector<int32_t>& out) {
  collect_passing_scalar(row, n, theta, out);
}
#endif

// The bfloat16 screen's error bound. For a row x and a latent w (float32), let
// x~, w~ be their bfloat16 roundings and r_x = x - x~, r_w = w - w~ (exact in
// float32), with X = |x| + |r_x| >= |x|, |x~| and W likewise (Euclidean norms).
// The screen sums x~ w~ (dot_tile_bf16), the exact score x w (dot_tile_one):
//   |x w - x~ w~| = |x r_w + r_x w~| <= X |r_w| + |r_x| W       (Cauchy-Schwarz)
// and each sum's rounding is at most g_n X W, g_n = n u / (1 - n u), u = 2^-24,
// n = d + 8 (more roundings than along any lane's chain of either sum,
// reduction included). Subnormals: if a conversion kept one that vdpbf16ps then
// reads as zero, at most a (X + W) more with a = 2^-126 sqrt(d); flushed
// products and partial sums, and gradual underflow in the exact sum, at most
// 2^-121 n. So
//   |screen - exact| <= X (|r_w| + (2 g_n + 2^-18) W + a) + (|r_x| + a) W + 2^-121 n
// where the 2^-18 X W, and 2^-20 |bias| in the reach, leave room for the
// rounding of the test's own arithmetic and of exact + bias (each at most u of
// magnitudes below 1.1 X W + |bias|). Norms at or above 2^63 (or not finite)
// give +inf: the bfloat16 roundings or the sums could overflow.
namespace screen_bound {
constexpr double kU = 1.0 / (1 << 24);
constexpr double kMaxNorm = 9223372036854775808.0;  // 2^63

double relative(int64_t d) {
  const double n = double(d + 8);
  return 2 * n * kU / (1 - n * kU) + 1.0 / (1 << 18);
}
double subnormal(int64_t d) { return std::ldexp(std::sqrt(double(d)), -126); }

// The smallest float at or above v.
float up(double v) {
  float f = float(v);
  if (double(f) < v) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}
// An upper bound of the norm whose squares to_bf16_row summed in float32 (at
// most n roundings, each within u, or 2^-126 where flushed); +inf when too
// large to bound.
double norm(double sum_sq, int64_t d) {
  const double n = double(d + 8);
  const double r = std::sqrt(sum_sq * (1 + 2 * n * kU) + std::ldexp(n, -126)) * (1 + 1e-12);
  return r < kMaxNorm ? r : std::numeric_limits<double>::infinity();  // NaN too
}
}  // namespace screen_bound

}  // namespace

template <typename A>
TopKSelector<A>::TopKSelector(int64_t rows, int64_t k)
    // Room for k + k (at least 16) candidates: compaction (a linear-time
    // nth_element) then runs once per k accepted candidates.
    : rows_(rows), k_(k), cap_(k + std::max<int64_t>(k, 16)),
      cand_(rows * cap_), count_(rows, 0), theta_(rows, A(0)) {}

template <typename A>
int64_t TopKSelector<A>::state_bytes(int64_t rows, int64_t k) {
  const int64_t cap = k + std::max<int64_t>(k, 16);
  return rows * (cap * int64_t(sizeof(Candidate)) + int64_t(sizeof(int32_t) + sizeof(A)));
}

template <typename A>
void TopKSelector<A>::compact(int64_t row, int64_t keep) {
  Candidate* c = cand_.data() + row * cap_;
  const auto better = [](const Candidate& a, const Candidate& b) {
    return ranks_before(a.score, a.latent, b.score, b.latent);
  };
  // Afterwards c[keep - 1] is the keep-th best and everything before it is better.
  std::nth_element(c, c + (keep - 1), c + count_[row], better);
  count_[row] = int32_t(keep);
  theta_[row] = c[keep - 1].score;
}

template <typename A>
inline bool TopKSelector<A>::offer(int64_t row, A score, int32_t latent) {
  // Later latents lose ties, so only a strictly better score (or a NaN, for
  // which the comparison is false) is kept.
  if (score <= theta_[row]) return true;
  Candidate* c = cand_.data() + row * cap_;
  c[count_[row]++] = {score, latent};
  if (count_[row] == cap_) compact(row, k_);
  return !std::isnan(theta_[row]);
}

template <typename A>
void TopKSelector<A>::consume(const A* scores, int64_t ld, int64_t row0, int64_t nrows,
                              int64_t col0, int64_t ncols, const A* bias) {
#pragma omp parallel for schedule(static) if (parallel_worth(nrows * ncols))
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t row = row0 + r;
    const A* s = scores + r * ld;
    Candidate* c = cand_.data() + row * cap_;
    int32_t& count = count_[row];
    int64_t j = 0;
    // Fill phase: the first k latents of the row are taken unconditionally.
    for (; count < k_ && j < ncols; ++j) {
      c[count++] = {s[j] + bias[j], int32_t(col0 + j)};
      if (count == k_) compact(row, k_);
    }
    // A NaN k-th best cannot be beaten by a later latent: the row is settled.
    if (count < k_ || std::isnan(theta_[row])) continue;
    while (j < ncols) {
      j += next_hit(s + j, bias + j, ncols - j, theta_[row]);
      const int64_t end = std::min(j + kChunk, ncols);
      for (; j < end; ++j)
        if (!offer(row, s[j] + bias[j], int32_t(col0 + j))) { j = ncols; break; }
    }
  }
}

template <typename A>
void TopKSelector<A>::consume_screened(const ScreenTile& tile, int64_t row0, int64_t nrows, int64_t col0,
                                      int64_t ncols, const A* bias) {
#pragma omp parallel for schedule(static) if (parallel_worth(nrows * ncols))
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t row = row0 + r;
    const float* x = tile.x + r * tile.d;
    Candidate* c = cand_.data() + row * cap_;
    int32_t& count = count_[row];
    // The pre-activation consume() would have been handed: the same products,
    // sums and bias addition, bit for bit.
    int64_t j = 0;
    for (; count < k_ && j < ncols; ++j) {  // consume()'s fill phase, on exact scores
      c[count++] = {A(dot_tile_one(tile.d, x, tile.w + j * tile.d)) + bias[j], int32_t(col0 + j)};
      if (count == k_) compact(row, k_);
    }
    if (count < k_ || std::isnan(theta_[row])) continue;
    // Latents that pass the screen against the threshold as the row enters the
    // tile (it only rises), scored exactly together, then offered in order.
    thread_local std::vector<int32_t> passed;
    thread_local std::vector<float> exact;
    passed.clear();
    const float theta = float(theta_[row]);
    // Latents from j on (past any fill phase), numbered from j.
    const ScreenedRow screened{tile.scores + r * tile.ld + j, tile.row_a[r], tile.row_b[r],
                               tile.col_a + j, tile.col_b + j, tile.col_reach + j};
    collect_passing(screened, ncols - j, theta, passed);
    const float* w = tile.w + j * tile.d;
    exact.resize(passed.size());
    dot_tile_gather(tile.d, x, w, passed.data(), int64_t(passed.size()), exact.data());
    for (size_t i = 0; i < passed.size(); ++i) {
      const int64_t col = j + passed[i];
      if (!offer(row, A(exact[i]) + bias[col], int32_t(col0 + col))) break;  // consume()'s test, exact score
    }
  }
}

ScreenRow screen_row(const Bf16Norms& norms, int64_t d) {
  const double residual = screen_bound::norm(norms.residual_sq, d);
  return {screen_bound::up(screen_bound::norm(norms.sum_sq, d) + residual),
          screen_bound::up(residual + screen_bound::subnormal(d))};
}

ScreenCol screen_col(const Bf16Norms& norms, float bias, int64_t d) {
  const double residual = screen_bound::norm(norms.residual_sq, d);
  const double W = screen_bound::norm(norms.sum_sq, d) + residual;
  return {screen_bound::up(residual + screen_bound::relative(d) * W + screen_bound::subnormal(d)),
          screen_bound::up(W),
          screen_bound::up(double(bias) + std::fabs(double(bias)) / (1 << 20) + std::ldexp(double(d + 8), -121))};
}

template <typename A>
void TopKSelector<A>::merge(const TopKSelector& other) {
#pragma omp parallel for schedule(static) if (parallel_worth(rows_ * cap_))
  for (int64_t row = 0; row < rows_; ++row) {
    const Candidate* src = other.cand_.data() + row * cap_;
    Candidate* c = cand_.data() + row * cap_;
    for (int32_t i = 0; i < other.count_[row]; ++i) {
      if (count_[row] == cap_) compact(row, k_);
      c[count_[row]++] = src[i];
    }
  }
}

template <typename A>
template <typename T>
void TopKSelector<A>::finish(T* values, int64_t* indices, bool relu) {
#pragma omp parallel for schedule(static) if (parallel_worth(rows_ * cap_ * 8))
  for (int64_t row = 0; row < rows_; ++row) {
    compact(row, k_);
    Candidate* c = cand_.data() + row * cap_;
    std::sort(c, c + k_, [](const Candidate& a, const Candidate& b) {
      return ranks_before(a.score, a.latent, b.score, b.latent);
    });
    for (int64_t j = 0; j < k_; ++j) {
      // ReLU that keeps NaN (as torch.relu does)
      values[row * k_ + j] = store<T, A>(relu && c[j].score < A(0) ? A(0) : c[j].score);
      indices[row * k_ + j] = c[j].latent;
    }
  }
}

template class TopKSelector<float>;
template class TopKSelector<double>;
template void TopKSelector<float>::finish<float>(float*, int64_t*, bool);
template void TopKSelector<float>::finish<bf16>(bf16*, int64_t*, bool);
template void TopKSelector<float>::finish<f16>(f16*, int64_t*, bool);
template void TopKSelector<double>::finish<double>(double*, int64_t*, bool);

namespace {
template <typename A>
SSAE_MULTIVERSION int64_t keep_above_row(A* s, int64_t cols, const A* bias, const A* threshold) {
  int64_t kept = 0;
  for (int64_t c = 0; c < cols; ++c) {
    const A v = s[c] + bias[c];
    const bool keep = v > threshold[c];
    s[c] = keep ? v : -std::numeric_limits<A>::infinity();
    kept += keep;
  }
  return kept;
}
}  // namespace

template <typename A>
void keep_above(A* scores, int64_t ld, int64_t rows, int64_t cols, const A* bias, const A* threshold, int64_t* counts) {
  for (int64_t r = 0; r < rows; ++r) counts[r] += keep_above_row(scores + r * ld, cols, bias, threshold);
}

template void keep_above<float>(float*, int64_t, int64_t, int64_t, const float*, const float*, int64_t*);
template void keep_above<double>(double*, int64_t, int64_t, int64_t, const double*, const double*, int64_t*);

}  // namespace ssae::cpu
