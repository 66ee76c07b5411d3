#include "device.cuh"
#include "launch.h"
#include "row_decode.cuh"
#include "sparse_decode.cuh"

namespace ssae::cuda {
namespace {

// One block per (row, column tile): decode_tile (row_decode.cuh) stages the row's
// (index, value) pairs in shared memory and every thread adds the selected W rows
// into its kColsPerThread columns.
template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
    decode_kernel(const T* values, const int64_t* indices, const T* W, const T* bias, int64_t k, int64_t d,
                  int64_t num_latents, int64_t tiles, T* out) {
  __shared__ DecodeStage stage;
  const int t = int(threadIdx.x), nt = int(blockDim.x);
  const int64_t n = tile_row(blockIdx.x, tiles);
  const int64_t first = tile_first_column(blockIdx.x, tiles, nt);

  float acc[kColsPerThread];
#pragma unroll
  for (int i = 0; i < kColsPerThread; ++i) {
    const int64_t c = tile_column(first, i, t, nt);
    acc[i] = (bias != nullptr && c < d) ? to_float(bias[c]) : 0.0f;
  }
  decode_tile(values, indices, W, n, k, d, num_latents, first, stage, acc);
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
