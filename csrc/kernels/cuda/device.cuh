// Device-side helpers shared by the CUDA kernels: the block execution policy
// of the selection algorithms (topk_select.h) and float32 <-> storage type
// conversions (bfloat16 / float16 stored as __nv_bfloat16 / __half).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "topk_select.h"

namespace ssae::cuda {

// The policy of topk_select.h on the device: one call per thread, then a barrier.
struct DeviceExec {
  __device__ __forceinline__ int threads() const { return int(blockDim.x); }

  template <class F>
  __device__ __forceinline__ void each(F&& f) {
    f(int(threadIdx.x));
    __syncthreads();
  }

  // Warp-aggregated slot allocation: one shared atomic per warp instead of one
  // per kept element (the first chunk of a row keeps every element). Every
  // lane of every warp calls this the same number of times.
  __device__ __forceinline__ uint32_t append(uint32_t* counter, bool keep) {
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (ballot == 0u) return 0u;
    const int lane = int(threadIdx.x) & 31;
    const int leader = __ffs(int(ballot)) - 1;
    uint32_t base = 0;
    if (lane == leader) base = atomicAdd(counter, uint32_t(__popc(int(ballot))));
    base = __shfl_sync(0xffffffffu, base, leader);
    return base + uint32_t(__popc(int(ballot & ((1u << lane) - 1u))));
  }

  __device__ __forceinline__ void atomic_add(uint32_t* p, uint32_t v) { atomicAdd(p, v); }
  __device__ __forceinline__ void atomic_min(topk_key* p, topk_key v) { atomicMin(p, v); }
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

}  // namespace ssae::cuda
