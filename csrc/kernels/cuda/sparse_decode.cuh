// Sparse decode, CUDA: out[n] = bias + sum_j values[n, j] * W[indices[n, j]],
// float32 accumulation. T is float, __nv_bfloat16 or __half; all arrays are
// dense row-major on the device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ssae::cuda {

// bias may be null. An index outside [0, num_latents) is never dereferenced:
// its row of out becomes NaN (checking on the host would cost a device sync).
template <typename T>
cudaError_t sparse_decode(const T* values, const int64_t* indices, const T* W, const T* bias, int64_t rows, int64_t k,
                          int64_t d, int64_t num_latents, T* out, cudaStream_t stream);

}  // namespace ssae::cuda
