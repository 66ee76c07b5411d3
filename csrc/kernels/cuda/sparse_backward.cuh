// Sparse backward primitives, CUDA (same contracts as csrc/kernels/cpu/sparse_backward.h):
//   sampled_dot:             out[n, j] = grad[n] . W[indices[n, j]]
//   latent_transpose:        entries p = n * k + j counting-sorted by latent (stable: ascending p)
//   sparse_transpose_matmul: out[m] = sum over latent m's entries p of weights[p] * rows[p / k],
//                            colsum[m] = sum of the same weights
// float32 accumulation; T is float, __nv_bfloat16 or __half. No atomics on
// the outputs: each latent's sums have one owner and a fixed order, so results
// are deterministic. Out-of-range indices are never dereferenced: they turn the
// affected outputs into NaN (sampled_dot, sparse_transpose_matmul) or are left
// out of the transpose (latent_transpose: offsets[M] then counts valid entries only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace ssae::cuda {

template <typename T>
cudaError_t sampled_dot(const T* grad, const int64_t* indices, const T* W, int64_t rows, int64_t k, int64_t d,
                        int64_t num_latents, T* out, cudaStream_t stream);

// Scratch bytes latent_transpose needs for `count` entries (sort keys, sort
// buffers and the radix sort's own temporary storage). 0 on failure.
size_t latent_transpose_workspace_bytes(int64_t count, int64_t num_latents);

// offsets [num_latents + 1], order [count]; count < 2^31.
cudaError_t latent_transpose(const int64_t* indices, int64_t count, int64_t num_latents, int64_t* offsets,
                             int64_t* order, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// weights [n_rows, k], rows [n_rows, d], offsets / order from latent_transpose;
// out [num_latents, d]; colsum [num_latents] or null.
template <typename T>
cudaError_t sparse_transpose_matmul(const T* weights, const T* rows, int64_t n_rows, int64_t k, int64_t d,
                                    const int64_t* offsets, const int64_t* order, int64_t num_latents, T* out,
                                    T* colsum, cudaStream_t stream);

}  // namespace ssae::cuda
