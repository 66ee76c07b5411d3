#include "sparse_adam.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../stochastic_round.h"
#include "scalar.h"

namespace ssae::cpu {
namespace {

// The movement of a row's skipped steps at one element. Where m is zero they moved nothing; the
// floor on the denominator keeps 0 / 0 out when eps_skip is zero too (a max, so loops stay vectorised).
template <typename T>
inline T skipped_move(T m0, T v0, T drift, T eps_skip) {
  return drift * m0 / std::max(std::sqrt(v0) + eps_skip, std::numeric_limits<T>::min());
}

// A moment as computed (T) and as held (S: T, or bfloat16 stored with stochastic rounding).
template <typename T, typename S>
inline T get(S s) {
  if constexpr (std::is_same_v<S, bf16>) return to_float(s);
  else return s;
}
template <typename S, typename T>
inline S put(T x, uint32_t random16) {
  if constexpr (std::is_same_v<S, bf16>) return bf16{bf16_bits_stochastic(float_to_bits(x), random16)};
  else return x;
}

// One row's catch-up and update. Rows caught up on nothing (drift 0: touched the step before) skip
// that term's square root and division. The step uses the moments before they are rounded to S.
// Always inlined, so that each target clone of adam_row_mv compiles it for its own instruction set.
template <typename T, typename S>
[[gnu::always_inline]] inline void adam_row(T* __restrict__ p, S* __restrict__ m, S* __restrict__ v, const T* __restrict__ g, int64_t d,
                     const T* c, T beta1, T beta2, T step_size, T bc2_sqrt, T eps, uint32_t row_key) {
  constexpr bool kRound = !std::is_same_v<S, T>;
  const T drift = c[0], decay1 = c[1], decay2 = c[2], eps_skip = c[3];
  if (g == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const T m0 = get<T>(m[i]), v0 = get<T>(v[i]);
      const uint32_t bits = kRound ? element_bits(row_key, i) : 0u;
      p[i] -= skipped_move(m0, v0, drift, eps_skip);
      m[i] = put<S>(decay1 * m0, bits & 0xffffu);
      v[i] = put<S>(decay2 * v0, bits >> 16);
    }
    return;
  }
  const T keep1 = beta1 * decay1, keep2 = beta2 * decay2, new1 = T(1) - beta1, new2 = T(1) - beta2;
  // torch.optim.Adam's order of operations: p - step_size * (m / (sqrt(v) / sqrt(bc2) + eps))
  if (drift == T(0)) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const T gi = g[i];
      const T m1 = keep1 * get<T>(m[i]) + new1 * gi;
      const T v1 = keep2 * get<T>(v[i]) + new2 * gi * gi;
      const uint32_t bits = kRound ? element_bits(row_key, i) : 0u;
      m[i] = put<S>(m1, bits & 0xffffu);
      v[i] = put<S>(v1, bits >> 16);
      p[i] = p[i] - step_size * (m1 / (std::sqrt(v1) / bc2_sqrt + eps));
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    const T m0 = get<T>(m[i]), v0 = get<T>(v[i]), gi = g[i];
    const T skipped = skipped_move(m0, v0, drift, eps_skip);
    const T m1 = keep1 * m0 + new1 * gi;
    const T v1 = keep2 * v0 + new2 * gi * gi;
    const uint32_t bits = kRound ? element_bits(row_key, i) : 0u;
    m[i] = put<S>(m1, bits & 0xffffu);
    v[i] = put<S>(v1, bits >> 16);
    p[i] = p[i] - skipped - step_size * (m1 / (std::sqrt(v1) / bc2_sqrt + eps));
  }
}

#define SSAE_ADAM_ROW(T, S)                                                                                \
  SSAE_MULTIVERSION void adam_row_mv(T* p, S* m, S* v, const T* g, int64_t d, const T* c, T beta1, T beta2, \
                                     T step_size, T bc2_sqrt, T eps, uint32_t row_key) {              \
    adam_row<T, S>(p, m, v, g, d, c, beta1, beta2, step_size, bc2_sqrt, eps, row_key);                \
  }
SSAE_ADAM_ROW(float, float)
SSAE_ADAM_ROW(double, double)
SSAE_ADAM_ROW(float, bf16)
#undef SSAE_ADAM_ROW

// Rows are far apart in memory (a tenth of them, in order, at M = 2^20), so the hardware prefetcher,
// which stays within a 4 KiB page, starts each row cold: fetch the rows kAhead positions on early.
constexpr int64_t kAhead = 2;

inline void prefetch_row(const void* row, int64_t bytes) {
  const char* at = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(at + off, 1, 3);
}

}  // namespace

template <typename T, typename S>
void sparse_adam(const AdamRows<T, S>& a) {
  // Bias corrections in double, as torch.optim.Adam computes them, then rounded once.
  const T step_size = T(a.lr / (1.0 - std::pow(a.beta1, double(a.step))));
  const T bc2_sqrt = T(std::sqrt(1.0 - std::pow(a.beta2, double(a.step))));
  const T beta1 = T(a.beta1), beta2 = T(a.beta2), eps = T(a.eps);
  const uint32_t key = call_key(a.seed, a.step);
#pragma omp parallel for schedule(static) if (parallel_worth(a.num_rows * a.d))
  for (int64_t r = 0; r < a.num_rows; ++r) {
    if (r + kAhead < a.num_rows) {
      const int64_t ahead = a.rows[r + kAhead];
      prefetch_row(a.param + ahead * a.ld_param, a.d * int64_t(sizeof(T)));
      prefetch_row(a.exp_avg + ahead * a.ld_exp_avg, a.d * int64_t(sizeof(S)));
      prefetch_row(a.exp_avg_sq + ahead * a.ld_exp_avg_sq, a.d * int64_t(sizeof(S)));
    }
    const int64_t row = a.rows[r];
    adam_row_mv(a.param + row * a.ld_param, a.exp_avg + row * a.ld_exp_avg, a.exp_avg_sq + row * a.ld_exp_avg_sq,
                a.grad ? a.grad + r * a.ld_grad : nullptr, a.d, a.catchup + 4 * r, beta1, beta2, step_size,
                bc2_sqrt, eps, row_bits(key, row));
  }
}

template void sparse_adam<float, float>(const AdamRows<float, float>&);
template void sparse_adam<double, double>(const AdamRows<double, double>&);
template void sparse_adam<float, bf16>(const AdamRows<float, bf16>&);

int64_t find_bad_row(const int64_t* rows, int64_t num_rows, int64_t num_latents, bool* duplicate) {
  std::vector<bool> seen(size_t(num_latents), false);
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t row = rows[r];
    if (row < 0 || row >= num_latents) { *duplicate = false; return r; }
    if (seen[size_t(row)]) { *duplicate = true; return r; }
    seen[size_t(row)] = true;
  }
  return num_rows;
}

}  // namespace ssae::cpu
