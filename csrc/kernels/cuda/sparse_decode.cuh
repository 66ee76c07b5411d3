// Sparse decode, CUDA: out[n] = bias + sum_j values[n, j] * W[indices[n, j]],
// float32 accumulation. T is float, __nv_bfloat16 or __half. values and indices
// are dense [rows, k], out dense [rows, d], bias dense [d]; W is read through its
// row stride ldw (elements; unit column stride), so a row-strided view of a
// larger matrix is decoded in place.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ssae::cuda {

// bias may be null. An index outside [0, num_latents) is never dereferenced:
// its row of out becomes NaN (checking on the host would cost a device sync).
// Rows of W are read with 16-byte loads when W and ldw allow it (row_decode.h).
template <typename T>
cudaError_t sparse_decode(const T* values, const int64_t* indices, const T* W, int64_t ldw, const T* bias,
                          int64_t rows, int64_t k, int64_t d, int64_t num_latents, T* out, cudaStream_t stream);

}  // namespace ssae::cuda
