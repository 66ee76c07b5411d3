// Subspace projection, CUDA: out = U (U^T G), or G - U (U^T G) with complement.
// U is [d, r] dense row-major; G and out are [d, n] row-major with row strides
// ldg and ldo (unit column stride); T is float, __nv_bfloat16 or __half;
// float32 accumulation.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ssae::cuda {

// Floats of device scratch the launcher needs: U^T G, float32 [r, n].
inline int64_t project_subspace_scratch(int64_t r, int64_t n) { return r * n; }

// Two kernels on `stream`: scratch = U^T G, then out = U scratch (or G - U scratch).
// out may be G itself (ldo == ldg): the second kernel reads each element of G in
// the thread that writes the same element of out. Needs d, r >= 1; n == 0 is a no-op.
template <typename T>
cudaError_t project_subspace(const T* G, int64_t ldg, const T* U, int64_t d, int64_t r, int64_t n, bool complement,
                             T* out, int64_t ldo, float* scratch, cudaStream_t stream);

}  // namespace ssae::cuda
