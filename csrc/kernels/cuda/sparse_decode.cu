#include "device.cuh"
#include "launch.h"
#include "sparse_decode.cuh"

namespace ssae::cuda {
namespace {

// One block per (row, column tile); the row's (index, value) pairs are staged
// in shared memory, then every thread adds the selected W rows into its
// kColsPerThread columns (coalesced loads: consecutive threads, consecutive columns).
template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
    decode_kernel(const T* values, const int64_t* indices, const T* W, const T* bias, int64_t k, int64_t d,
                  int64_t num_latents, int64_t tiles, T* out) {
  __shared__ float stage_w[kStageEntries];
  __shared__ int64_t stage_row[kStageEntries];
  const int t = int(threadIdx.x), nt = int(blockDim.x);
  const int64_t n = tile_row(blockIdx.x, tiles);
  const int64_t first = tile_first_column(blockIdx.x, tiles, nt);

  float acc[kColsPerThread];
#pragma unroll
  for (int i = 0; i < kColsPerThread; ++i) {
    const int64_t c = tile_column(first, i, t, nt);
    acc[i] = (bias != nullptr && c < d) ? to_float(bias[c]) : 0.0f;
  }
  for (int64_t j0 = 0; j0 < k; j0 += kStageEntries) {
    const int64_t nj = k - j0 < kStageEntries ? k - j0 : kStageEntries;
    __syncthreads();  // the previous round's readers are done with the stage
    for (int64_t j = t; j < nj; j += nt) {
      const int64_t idx = indices[n * k + j0 + j];
      const bool ok = idx >= 0 && idx < num_latents;
      stage_row[j] = ok ? idx : 0;
      stage_w[j] = ok ? to_float(values[n * k + j0 + j]) : quiet_nan();
    }
    __syncthreads();
#pragma unroll 4
    for (int64_t j = 0; j < nj; ++j) {
      const float w = stage_w[j];
      const T* row = W + stage_row[j] * d;
#pragma unroll
      for (int i = 0; i < kColsPerThread; ++i) {
        const int64_t c = tile_column(first, i, t, nt);
        if (c < d) acc[i] += w * to_float(row[c]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kColsPerThread; ++i) {
    const int64_t c = tile_column(first, i, t, nt);
    if (c < d) out[n * d + c] = from_float<T>(acc[i]);
  }
}

}  // namespace

template <typename T>
cudaError_t sparse_decode(const T* values, const int64_t* indices, const T* W, const T* bias, int64_t rows, int64_t k,
                          int64_t d, int64_t num_latents, T* out, cudaStream_t stream) {
  if (rows == 0 || d == 0) return cudaSuccess;
  const Launch l = row_tiles_launch(rows, d);
  if (!grid_fits(l) || k < 0) return cudaErrorInvalidValue;
  decode_kernel<T><<<unsigned(l.blocks), l.threads, 0, stream>>>(values, indices, W, bias, k, d, num_latents, l.tiles,
                                                                  out);
  return cudaGetLastError();
}

#define SSAE_INSTANTIATE(T)                                                                                    \
  template cudaError_t sparse_decode<T>(const T*, const int64_t*, const T*, const T*, int64_t, int64_t, int64_t, \
                                        int64_t, T*, cudaStream_t);
SSAE_INSTANTIATE(float)
SSAE_INSTANTIATE(__nv_bfloat16)
SSAE_INSTANTIATE(__half)
#undef SSAE_INSTANTIATE

}  // namespace ssae::cuda
