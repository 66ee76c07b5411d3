#include "device.cuh"
#include "launch.h"
#include "row_decode.cuh"
#include "sparse_decode.cuh"

namespace ssae::cuda {
namespace {

// One block per (row, column tile) of gather_launch (row_decode.h): the row's
// (index, value) pairs are staged in shared memory, and every thread adds the
// selected W rows into its kGatherCols columns, in slot order (deterministic),
// reading each run of columns with one 16-byte load where ALIGNED allows.
template <typename T, bool ALIGNED>
__global__ void __launch_bounds__(kGatherMaxThreads, kGatherMinBlocks)
    decode_kernel(const T* __restrict__ values, const int64_t* __restrict__ indices, const T* __restrict__ W,
                  int64_t ldw, const T* __restrict__ bias, bool bias_aligned, int64_t k, int64_t d,
                  int64_t num_latents, int64_t tiles, T* __restrict__ out, bool out_aligned) {
  constexpr int R = Vec16<T>::n == 8 ? 8 : 4;  // columns per run: 16 bytes
  constexpr int U = kGatherCols / R;           // runs per thread
  __shared__ DecodeStage stage;
  const int t = int(threadIdx.x), nt = int(blockDim.x);
  const int64_t n = int64_t(blockIdx.x) / tiles;
  const int64_t first = gather_first_column(blockIdx.x, tiles, nt);

  float acc[U][R];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (bias != nullptr) {
      load_run(bias, gather_run(first, u, t, nt, R), d, bias_aligned, acc[u]);
    } else {
#pragma unroll
      for (int i = 0; i < R; ++i) acc[u][i] = 0.0f;
    }
  }
  for (int64_t j0 = 0; j0 < k; j0 += kStageEntries) {
    const int64_t nj = stage_entries(stage, values, indices, n, k, j0, num_latents);
#pragma unroll 4
    for (int64_t j = 0; j < nj; ++j) {
      const float w = stage.w[j];
      const T* row = W + stage.row[j] * ldw;  // row 0 with a NaN weight for an out-of-range index
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float f[R];
        load_run(row, gather_run(first, u, t, nt, R), d, ALIGNED, f);
#pragma unroll
        for (int i = 0; i < R; ++i) acc[u][i] += w * f[i];
      }
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) store_run(out + n * d, gather_run(first, u, t, nt, R), d, out_aligned, acc[u]);
}

}  // namespace

template <typename T>
cudaError_t sparse_decode(const T* values, const int64_t* indices, const T* W, int64_t ldw, const T* bias,
                          int64_t rows, int64_t k, int64_t d, int64_t num_latents, T* out, cudaStream_t stream) {
  if (rows == 0 || d == 0) return cudaSuccess;
  const Launch l = gather_launch(rows, d);
  if (!grid_fits(l) || k < 0 || ldw < 0) return cudaErrorInvalidValue;
  if (num_latents < 1 && k > 0)  // every index is out of range and W has no row 0: all NaN (0xFF bytes are NaN in T)
    return cudaMemsetAsync(out, 0xFF, size_t(rows * d) * sizeof(T), stream);
  const bool bias_aligned = bias != nullptr && aligned_rows(bias, 0);
  const bool out_aligned = aligned_rows(out, d);
  if (aligned_rows(W, ldw))
    decode_kernel<T, true><<<unsigned(l.blocks), l.threads, 0, stream>>>(values, indices, W, ldw, bias, bias_aligned,
                                                                          k, d, num_latents, l.tiles, out, out_aligned);
  else
    decode_kernel<T, false><<<unsigned(l.blocks), l.threads, 0, stream>>>(
        values, indices, W, ldw, bias, bias_aligned, k, d, num_latents, l.tiles, out, out_aligned);
  return cudaGetLastError();
}

#define SSAE_INSTANTIATE(T)                                                                                     \
  template cudaError_t sparse_decode<T>(const T*, const int64_t*, const T*, int64_t, const T*, int64_t, int64_t, \
                                        int64_t, int64_t, T*, cudaStream_t);
SSAE_INSTANTIATE(float)
SSAE_INSTANTIATE(__nv_bfloat16)
SSAE_INSTANTIATE(__half)
#undef SSAE_INSTANTIATE

}  // namespace ssae::cuda
