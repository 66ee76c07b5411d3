// Row decode on the device, shared by sparse_decode.cu and tilted_loss.cu: a block
// adds the W rows selected by row n into its threads' columns of one column tile
// (the layout of row_tiles_launch in launch.h: kColsPerThread columns per thread,
// strided by the block width so that every load is coalesced).
#pragma once

#include <cstdint>

#include "device.cuh"
#include "launch.h"

namespace ssae::cuda {

// One round of a row's (index, value) entries, staged in shared memory.
struct DecodeStage {
  float w[kStageEntries];
  int64_t row[kStageEntries];
};

// Stages entries j0 .. j0 + nj - 1 of row n and returns nj. An index outside
// [0, num_latents) is never dereferenced: it reads row 0 with a NaN weight.
// Starts with a barrier (the previous round's readers are done) and ends with one.
template <typename T>
__device__ __forceinline__ int64_t stage_entries(DecodeStage& s, const T* values, const int64_t* indices, int64_t n,
                                                 int64_t k, int64_t j0, int64_t num_latents) {
  const int t = int(threadIdx.x), nt = int(blockDim.x);
  const int64_t nj = k - j0 < kStageEntries ? k - j0 : kStageEntries;
  __syncthreads();
  for (int64_t j = t; j < nj; j += nt) {
    const int64_t idx = indices[n * k + j0 + j];
    const bool ok = idx >= 0 && idx < num_latents;
    s.row[j] = ok ? idx : 0;
    s.w[j] = ok ? to_float(values[n * k + j0 + j]) : quiet_nan();
  }
  __syncthreads();
  return nj;
}

// acc[i] += sum_j values[n, j] * W[indices[n, j], c_i] in slot order, for this
// thread's columns c_i = tile_column(first, i, ...) < d. Every thread of the block calls it.
template <typename T>
__device__ __forceinline__ void decode_tile(const T* values, const int64_t* indices, const T* W, int64_t n, int64_t k,
                                            int64_t d, int64_t num_latents, int64_t first, DecodeStage& stage,
                                            float (&acc)[kColsPerThread]) {
  const int t = int(threadIdx.x), nt = int(blockDim.x);
  for (int64_t j0 = 0; j0 < k; j0 += kStageEntries) {
    const int64_t nj = stage_entries(stage, values, indices, n, k, j0, num_latents);
#pragma unroll 4
    for (int64_t j = 0; j < nj; ++j) {
      const float w = stage.w[j];
      const T* row = W + stage.row[j] * d;
#pragma unroll
      for (int i = 0; i < kColsPerThread; ++i) {
        const int64_t c = tile_column(first, i, t, nt);
        if (c < d) acc[i] += w * to_float(row[c]);
      }
    }
  }
}

}  // namespace ssae::cuda
