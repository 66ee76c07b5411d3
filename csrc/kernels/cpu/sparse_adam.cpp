#include "sparse_adam.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "scalar.h"

namespace ssae::cpu {
namespace {

// The movement of a row's skipped steps at one element. Where m is zero they moved nothing; the
// floor on the denominator keeps 0 / 0 out when eps_skip is zero too (a max, so loops stay vectorised).
template <typename T>
inline T skipped_move(T m0, T v0, T drift, T eps_skip) {
  return drift * m0 / std::max(std::sqrt(v0) + eps_skip, std::numeric_limits<T>::min());
}

// One row's catch-up and update. Rows caught up on nothing (drift 0: touched the step before) skip
// that term's square root and division.
template <typename T>
inline void adam_row(T* __restrict__ p, T* __restrict__ m, T* __restrict__ v, const T* __restrict__ g, int64_t d,
                     const T* c, T beta1, T beta2, T step_size, T bc2_sqrt, T eps) {
  const T drift = c[0], decay1 = c[1], decay2 = c[2], eps_skip = c[3];
  if (g == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const T m0 = m[i], v0 = v[i];
      p[i] -= skipped_move(m0, v0, drift, eps_skip);
      m[i] = decay1 * m0;
      v[i] = decay2 * v0;
    }
    return;
  }
  const T keep1 = beta1 * decay1, keep2 = beta2 * decay2, new1 = T(1) - beta1, new2 = T(1) - beta2;
  // torch.optim.Adam's order of operations: p - step_size * (m / (sqrt(v) / sqrt(bc2) + eps))
  if (drift == T(0)) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const T gi = g[i];
      const T m1 = keep1 * m[i] + new1 * gi;
      const T v1 = keep2 * v[i] + new2 * gi * gi;
      m[i] = m1;
      v[i] = v1;
      p[i] = p[i] - step_size * (m1 / (std::sqrt(v1) / bc2_sqrt + eps));
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    const T m0 = m[i], v0 = v[i], gi = g[i];
    const T skipped = skipped_move(m0, v0, drift, eps_skip);
    const T m1 = keep1 * m0 + new1 * gi;
    const T v1 = keep2 * v0 + new2 * gi * gi;
    m[i] = m1;
    v[i] = v1;
    p[i] = p[i] - skipped - step_size * (m1 / (std::sqrt(v1) / bc2_sqrt + eps));
  }
}

#define SSAE_ADAM_ROW(T)                                                                                  \
  SSAE_MULTIVERSION void adam_row_mv(T* p, T* m, T* v, const T* g, int64_t d, const T* c, T beta1, T beta2, \
                                     T step_size, T bc2_sqrt, T eps) {                                \
    adam_row<T>(p, m, v, g, d, c, beta1, beta2, step_size, bc2_sqrt, eps);                            \
  }
SSAE_ADAM_ROW(float)
SSAE_ADAM_ROW(double)
#undef SSAE_ADAM_ROW

}  // namespace

template <typename T>
void sparse_adam(const AdamRows<T>& a) {
  // Bias corrections in double, as torch.optim.Adam computes them, then rounded once.
  const T step_size = T(a.lr / (1.0 - std::pow(a.beta1, double(a.step))));
  const T bc2_sqrt = T(std::sqrt(1.0 - std::pow(a.beta2, double(a.step))));
  const T beta1 = T(a.beta1), beta2 = T(a.beta2), eps = T(a.eps);
#pragma omp parallel for schedule(static) if (parallel_worth(a.num_rows * a.d))
  for (int64_t r = 0; r < a.num_rows; ++r) {
    const int64_t row = a.rows[r];
    adam_row_mv(a.param + row * a.ld_param, a.exp_avg + row * a.ld_exp_avg, a.exp_avg_sq + row * a.ld_exp_avg_sq,
                a.grad ? a.grad + r * a.ld_grad : nullptr, a.d, a.catchup + 4 * r, beta1, beta2, step_size,
                bc2_sqrt, eps);
  }
}

template void sparse_adam<float>(const AdamRows<float>&);
template void sparse_adam<double>(const AdamRows<double>&);

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
