// Tilted (TERM) reductions and per-row squared errors, CUDA. T is float,
// __nv_bfloat16 or __half; all arrays are dense row-major on the device.
// Semantics as the CPU kernels (csrc/kernels/cpu/tilted_loss.h, sparse_decode.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace ssae::cuda {

// Bytes of tilted_group_stats' workspace (plan_tilted_group_stats in launch.h).
size_t tilted_group_stats_workspace_bytes(int64_t n, int64_t num_groups);

// anchor, log_mean: [num_groups] float64, count: [num_groups] int64 (see
// csrc/kernels/cpu/tilted_loss.h). groups may be null (one group). A group id
// outside [0, num_groups) is never dereferenced: its loss is left out and
// every anchor and log_mean becomes NaN (checking on the host would cost a sync).
template <typename T>
cudaError_t tilted_group_stats(const T* losses, int64_t n, double t, const int64_t* groups, int64_t num_groups,
                               double* anchor, double* log_mean, int64_t* count, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream);

// out[i] = sum_j (a[i, j] - b[i, j])^2 in float32.
template <typename T>
cudaError_t row_sq_error(const T* a, const T* b, int64_t rows, int64_t d, float* out, cudaStream_t stream);

// out[n] = sum_c (bias[c] + sum_j values[n, j] W[indices[n, j], c] - x[n, c])^2
// in float32, without storing the decode. bias may be null. A row with an
// index outside [0, num_latents) gets NaN (the index is never dereferenced).
template <typename T>
cudaError_t sparse_decode_sq_error(const T* values, const int64_t* indices, const T* W, const T* bias, const T* x,
                                   int64_t rows, int64_t k, int64_t d, int64_t num_latents, float* out,
                                   cudaStream_t stream);

// The backward of sparse_decode_sq_error in one pass over each row's W rows:
// residual[n, c] = scale[n] (x_hat[n, c] - x[n, c]) stored as T, and dots[n, j] =
// sum_c residual[n, c] W[indices[n, j], c] in float32 with the unrounded residual.
// A row with an index outside [0, num_latents) gets NaN (never dereferenced).
template <typename T>
cudaError_t sparse_decode_residual(const T* values, const int64_t* indices, const T* W, const T* bias, const T* x,
                                   const float* scale, int64_t rows, int64_t k, int64_t d, int64_t num_latents,
                                   T* residual, float* dots, cudaStream_t stream);

}  // namespace ssae::cuda
