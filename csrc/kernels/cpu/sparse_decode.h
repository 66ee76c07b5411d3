// Sparse decode, CPU: x_hat[n] = bias + sum_j values[n, j] * W[indices[n, j]].
// All arrays are dense row-major; accumulation is in acc_t<T> (float or double).
#pragma once

#include <cstdint>

#include "scalar.h"

namespace ssae::cpu {

// bias may be null. out is [rows, d].
template <typename T>
void sparse_decode(const T* values, const int64_t* indices, const T* W, const T* bias,
                   int64_t rows, int64_t k, int64_t d, T* out);

// out[n] = sum_t (x_hat[n, t] - x[n, t])^2 with x_hat[n] the decode above, accumulated
// in acc_t<T> and never stored: no [rows, d] buffer. bias may be null.
template <typename T>
void sparse_decode_sq_error(const T* values, const int64_t* indices, const T* W, const T* bias,
                            const T* x, int64_t rows, int64_t k, int64_t d, acc_t<T>* out);

// The backward of sparse_decode_sq_error in one pass over each row's k W rows:
// residual[n] = scale[n] * (x_hat[n] - x[n]) ([rows, d]) and grad_values[n, j] =
// residual[n] . W[indices[n, j]] ([rows, k]), dotted with the unrounded acc_t<T>
// residual. scale is [rows]; bias may be null.
template <typename T>
void sparse_decode_residual(const T* values, const int64_t* indices, const T* W, const T* bias, const T* x,
                            const acc_t<T>* scale, int64_t rows, int64_t k, int64_t d, T* residual,
                            T* grad_values);

// First position p with indices[p] outside [0, num_latents), or -1 if all are valid.
int64_t find_invalid_index(const int64_t* indices, int64_t count, int64_t num_latents);

}  // namespace ssae::cpu
