// Adam on selected rows of a float32 parameter, CUDA, after catching each row up on
// the steps it skipped (formulas: ssae_kernels/ops/sparse_adam.py; the same arguments
// as the CPU kernel, kernels/cpu/sparse_adam.h, plus num_latents). param, exp_avg,
// exp_avg_sq are [num_latents, d] row-major with their own row strides (unit column
// stride); grad (null: catch-up only) is [R, d] with row stride ld_grad; catchup is
// [R, 4] dense: drift, decay1, decay2, eps_skip. rows must be distinct (two blocks
// would race on a repeated row); a row outside [0, num_latents) is skipped, read and
// written nowhere (ranges are checked only on request, by the op's Python checks).
// The moments are float (S = float) or the bits of bfloat16 (S = uint16_t), computed in float
// and stored with stochastic rounding (kernels/stochastic_round.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ssae::cuda {

template <typename S>
struct AdamRows {
  float* param; int64_t ld_param;
  S* exp_avg; int64_t ld_exp_avg;
  S* exp_avg_sq; int64_t ld_exp_avg_sq;
  const int64_t* rows; int64_t num_rows; int64_t num_latents;
  const float* grad; int64_t ld_grad;
  const float* catchup;
  int64_t d;
  double lr, beta1, beta2, eps;
  int64_t step;
  int64_t seed;  // stochastic rounding of bfloat16 moments
};

// One kernel on `stream`; num_rows == 0 or d == 0 is a no-op.
template <typename S>
cudaError_t sparse_adam(const AdamRows<S>& a, cudaStream_t stream);

}  // namespace ssae::cuda
