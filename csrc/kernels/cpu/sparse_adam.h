// Adam on selected rows of a parameter, CPU, after catching each row up on the
// steps it skipped (formulas: ssae_kernels/ops/sparse_adam.py). param, exp_avg,
// exp_avg_sq are row-major with their own row strides (unit column stride);
// grad (may be null: catch-up only) is [R, d] with row stride ldg; catchup is
// [R, 4] dense: drift, decay1, decay2, eps_skip. rows must be distinct and in range.
// The moments are of the parameter's type T, or bfloat16 (S = bf16, T = float):
// computed in float32 and stored with stochastic rounding (kernels/stochastic_round.h)
// from the bits of (seed, step, row, column).
#pragma once

#include <cstdint>

#include "scalar.h"

namespace ssae::cpu {

template <typename T, typename S = T>
struct AdamRows {
  T* param; int64_t ld_param;
  S* exp_avg; int64_t ld_exp_avg;
  S* exp_avg_sq; int64_t ld_exp_avg_sq;
  const int64_t* rows; int64_t num_rows;
  const T* grad; int64_t ld_grad;
  const T* catchup;
  int64_t d;
  double lr, beta1, beta2, eps;
  int64_t step;
  int64_t seed = 0;  // stochastic rounding of bfloat16 moments
};

template <typename T, typename S>
void sparse_adam(const AdamRows<T, S>& a);

// The first position of a row outside [0, num_latents) or listed twice (num_rows when none);
// *duplicate tells which. Uses one bit of scratch per latent.
int64_t find_bad_row(const int64_t* rows, int64_t num_rows, int64_t num_latents, bool* duplicate);

}  // namespace ssae::cpu
