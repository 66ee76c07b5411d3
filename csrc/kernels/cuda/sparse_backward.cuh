// Sparse backward primitives, CUDA (same contracts as csrc/kernels/cpu/sparse_backward.h):
//   sampled_dot:             out[n, j] = grad[n] . W[indices[n, j]]
//   latent_transpose:        entries p = n * k + j counting-sorted by latent (stable: ascending p)
//   sparse_transpose_matmul: out[m] = sum over latent m's entries p of weights[p] * rows[p / k],
//                            colsum[m] = sum of the same weights
// float32 accumulation; T is float, __nv_bfloat16 or __half. No atomics on
// the outputs: each latent's sums have one owner and a fixed order, so results
// are deterministic (sparse_transpose_matmul splits hot latents across blocks and
// adds their partial sums in a fixed order: sparse_backward.h). Out-of-range
// indices are never dereferenced: they turn the affected outputs into NaN
// (sampled_dot, sparse_transpose_matmul) or are left out of the transpose
// (latent_transpose: offsets[M] then counts valid entries only).
//
// Matrices of d columns (grad, W, rows) are read through their row strides (ld*,
// in elements; unit column stride), with 16-byte loads where the rows are aligned
// (row_decode.h); index, weight and output arrays are dense.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace ssae::cuda {

template <typename T>
cudaError_t sampled_dot(const T* grad, int64_t ldg, const int64_t* indices, const T* W, int64_t ldw, int64_t rows,
                        int64_t k, int64_t d, int64_t num_latents, T* out, cudaStream_t stream);

// Scratch bytes latent_transpose needs for `count` entries (sort keys, sort
// buffers and the radix sort's own temporary storage). 0 on failure.
size_t latent_transpose_workspace_bytes(int64_t count, int64_t num_latents);

// offsets [num_latents + 1], order [count]; count < 2^31.
cudaError_t latent_transpose(const int64_t* indices, int64_t count, int64_t num_latents, int64_t* offsets,
                             int64_t* order, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Float32 scratch sparse_transpose_matmul needs for n_rows * k entries and d
// columns: partial sums of hot latents, stm_partials(entries) * (d + 1) floats
// (sparse_backward.h), whether or not any latent turns out hot (knowing would
// cost a device sync).
int64_t sparse_transpose_matmul_scratch(int64_t n_rows, int64_t k, int64_t d);

// weights [n_rows, k], rows [n_rows, d] with row stride ldr, offsets / order from
// latent_transpose; out [num_latents, d]; colsum [num_latents] or null; scratch of
// sparse_transpose_matmul_scratch(n_rows, k, d) floats.
template <typename T>
cudaError_t sparse_transpose_matmul(const T* weights, const T* rows, int64_t ldr, int64_t n_rows, int64_t k, int64_t d,
                                    const int64_t* offsets, const int64_t* order, int64_t num_latents, T* out,
                                    T* colsum, float* scratch, int64_t scratch_floats, cudaStream_t stream);

}  // namespace ssae::cuda
