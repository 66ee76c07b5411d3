// Tilted (TERM) reductions, CPU.
//
// For the losses of one group and a tilt t != 0 the kernels return the anchor
// l* (the loss maximising t * l) and log_mean = log((1/n) sum_i exp(t (l_i - l*)));
// the tilted risk is then R = l* + log_mean / t. log_mean is accumulated as
// log1p of a float64 sum of expm1 terms, so it stays exact both when t is tiny
// (every term near 0, where log(sum exp) - log n would cancel) and when t is
// huge (every term but the anchor's near -1). For t == 0 the anchor is the
// mean and log_mean is 0.
#pragma once

#include <cstdint>

#include "scalar.h"

namespace ssae::cpu {

// groups may be null (one group); otherwise groups[i] in [0, num_groups).
// anchor, log_mean: [num_groups] float64; count: [num_groups] (0 for empty groups,
// whose anchor and log_mean are 0).
template <typename T>
void tilted_group_stats(const T* losses, int64_t n, double t, const int64_t* groups, int64_t num_groups,
                        double* anchor, double* log_mean, int64_t* count);

// out[i] = sum_j (a[i, j] - b[i, j])^2, accumulated in acc_t<T>, stored as float (double for double).
template <typename T>
void row_sq_error(const T* a, const T* b, int64_t rows, int64_t d, acc_t<T>* out);

}  // namespace ssae::cpu
