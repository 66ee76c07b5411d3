#include <cub/device/device_radix_sort.cuh>

#include "device.cuh"
#include "launch.h"
#include "sparse_backward.cuh"

namespace ssae::cuda {
namespace {

// ------------------------------------------------------------------ sampled_dot

// One warp per (row, slot): lanes stride over d, then a shuffle reduction.
// The 8 warps of a block share row n, so its grad row is read from L1/L2 once.
template <typename T>
__global__ void __launch_bounds__(32 * kDotWarps)
    sampled_dot_kernel(const T* grad, const int64_t* indices, const T* W, int64_t k, int64_t d, int64_t num_latents,
                       int64_t tiles, T* out) {
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int64_t n = tile_row(blockIdx.x, tiles);
  const int64_t j = dot_slot(blockIdx.x, tiles, warp);
  if (j >= k) return;  // whole warps only; no block barrier follows
  const int64_t idx = indices[n * k + j];
  if (idx < 0 || idx >= num_latents) {
    if (lane == 0) out[n * k + j] = from_float<T>(quiet_nan());
    return;
  }
  const T* g = grad + n * d;
  const T* w = W + idx * d;
  float s = 0.0f;
  for (int64_t c = lane; c < d; c += 32) s += to_float(g[c]) * to_float(w[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) out[n * k + j] = from_float<T>(s);
}

// ------------------------------------------------------------- latent_transpose

// Sort keys: the latent, or num_latents for an out-of-range index (sorted after
// every valid entry, outside offsets[0 .. num_latents]); values: the entry id.
__global__ void transpose_keys_kernel(const int64_t* indices, int64_t count, int64_t num_latents, uint32_t* keys,
                                      int64_t* ids) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= count) return;
  const int64_t idx = indices[p];
  keys[p] = (idx >= 0 && idx < num_latents) ? uint32_t(idx) : uint32_t(num_latents);
  ids[p] = p;
}

// offsets[m] = first position of a key >= m in the sorted keys (binary search).
__global__ void transpose_offsets_kernel(const uint32_t* sorted, int64_t count, int64_t num_latents,
                                         int64_t* offsets) {
  const int64_t m = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (m > num_latents) return;
  int64_t lo = 0, hi = count;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (int64_t(sorted[mid]) < m) lo = mid + 1;
    else hi = mid;
  }
  offsets[m] = lo;
}

// ------------------------------------------------------- sparse_transpose_matmul

// One block per (latent, column tile): the latent's entries are staged in
// shared memory and summed in their sorted order by every thread for its
// columns; thread 0 of the first tile sums the weights for colsum.
template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
    transpose_matmul_kernel(const T* weights, const T* rows, int64_t entries, int64_t k, int64_t d,
                            const int64_t* offsets, const int64_t* order, int64_t tiles, T* out, T* colsum) {
  __shared__ float stage_w[kStageEntries];
  __shared__ int64_t stage_row[kStageEntries];
  const int t = int(threadIdx.x), nt = int(blockDim.x);
  const int64_t m = tile_row(blockIdx.x, tiles);
  const int64_t first = tile_first_column(blockIdx.x, tiles, nt);
  // Offsets not made by latent_transpose must still not send reads out of bounds.
  int64_t begin = offsets[m], end = offsets[m + 1];
  begin = begin < 0 ? 0 : (begin > entries ? entries : begin);
  end = end < begin ? begin : (end > entries ? entries : end);

  float acc[kColsPerThread];
#pragma unroll
  for (int i = 0; i < kColsPerThread; ++i) acc[i] = 0.0f;
  float wsum = 0.0f;
  for (int64_t e0 = begin; e0 < end; e0 += kStageEntries) {
    const int64_t ne = end - e0 < kStageEntries ? end - e0 : kStageEntries;
    __syncthreads();
    for (int64_t e = t; e < ne; e += nt) {
      const int64_t p = order[e0 + e];
      const bool ok = p >= 0 && p < entries;
      stage_row[e] = ok ? p / k : 0;
      stage_w[e] = ok ? to_float(weights[p]) : quiet_nan();
    }
    __syncthreads();
#pragma unroll 4
    for (int64_t e = 0; e < ne; ++e) {
      const float w = stage_w[e];
      const T* row = rows + stage_row[e] * d;
#pragma unroll
      for (int i = 0; i < kColsPerThread; ++i) {
        const int64_t c = tile_column(first, i, t, nt);
        if (c < d) acc[i] += w * to_float(row[c]);
      }
    }
    if (t == 0)
      for (int64_t e = 0; e < ne; ++e) wsum += stage_w[e];
  }
#pragma unroll
  for (int i = 0; i < kColsPerThread; ++i) {
    const int64_t c = tile_column(first, i, t, nt);
    if (c < d) out[m * d + c] = from_float<T>(acc[i]);
  }
  if (colsum != nullptr && first == 0 && t == 0) colsum[m] = from_float<T>(wsum);
}

}  // namespace

template <typename T>
cudaError_t sampled_dot(const T* grad, const int64_t* indices, const T* W, int64_t rows, int64_t k, int64_t d,
                        int64_t num_latents, T* out, cudaStream_t stream) {
  if (rows == 0 || k == 0) return cudaSuccess;
  const Launch l = sampled_dot_launch(rows, k);
  if (!grid_fits(l)) return cudaErrorInvalidValue;
  sampled_dot_kernel<T><<<unsigned(l.blocks), l.threads, 0, stream>>>(grad, indices, W, k, d, num_latents, l.tiles,
                                                                       out);
  return cudaGetLastError();
}

size_t latent_transpose_workspace_bytes(int64_t count, int64_t num_latents) {
  if (count < 0 || count > kMaxTransposeEntries || num_latents < 1) return 0;
  size_t temp = 0;
  // A size query: nothing runs and no pointer is dereferenced.
  if (cub::DeviceRadixSort::SortPairs(nullptr, temp, static_cast<const uint32_t*>(nullptr),
                                      static_cast<uint32_t*>(nullptr), static_cast<const int64_t*>(nullptr),
                                      static_cast<int64_t*>(nullptr), int(count), 0,
                                      transpose_sort_bits(num_latents)) != cudaSuccess)
    return 0;
  return size_t(transpose_workspace(count, int64_t(temp)).total);
}

cudaError_t latent_transpose(const int64_t* indices, int64_t count, int64_t num_latents, int64_t* offsets,
                             int64_t* order, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (count < 0 || count > kMaxTransposeEntries || num_latents < 1) return cudaErrorInvalidValue;
  const size_t needed = latent_transpose_workspace_bytes(count, num_latents);
  if (needed == 0 || workspace_bytes < needed) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  const TransposeWorkspace w = transpose_workspace(count, 0);
  auto* keys_in = reinterpret_cast<uint32_t*>(base + w.keys_in);
  auto* keys_out = reinterpret_cast<uint32_t*>(base + w.keys_out);
  auto* ids = reinterpret_cast<int64_t*>(base + w.ids);
  void* temp = base + w.sort_temp;
  size_t temp_bytes = workspace_bytes - size_t(w.sort_temp);

  if (count > 0) {
    const Launch e = elementwise_launch(count);
    transpose_keys_kernel<<<unsigned(e.blocks), e.threads, 0, stream>>>(indices, count, num_latents, keys_in, ids);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    // LSD radix sort is stable: entries of one latent keep ascending ids.
    err = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, ids, order, int(count), 0,
                                          transpose_sort_bits(num_latents), stream);
    if (err != cudaSuccess) return err;
  }
  const Launch o = elementwise_launch(num_latents + 1);
  if (!grid_fits(o)) return cudaErrorInvalidValue;
  transpose_offsets_kernel<<<unsigned(o.blocks), o.threads, 0, stream>>>(keys_out, count, num_latents, offsets);
  return cudaGetLastError();
}

template <typename T>
cudaError_t sparse_transpose_matmul(const T* weights, const T* rows, int64_t n_rows, int64_t k, int64_t d,
                                    const int64_t* offsets, const int64_t* order, int64_t num_latents, T* out,
                                    T* colsum, cudaStream_t stream) {
  if (num_latents == 0) return cudaSuccess;
  const Launch l = row_tiles_launch(num_latents, d);
  if (!grid_fits(l) || k < 1) return cudaErrorInvalidValue;
  transpose_matmul_kernel<T><<<unsigned(l.blocks), l.threads, 0, stream>>>(weights, rows, n_rows * k, k, d, offsets,
                                                                            order, l.tiles, out, colsum);
  return cudaGetLastError();
}

#define SSAE_INSTANTIATE(T)                                                                                   \
  template cudaError_t sampled_dot<T>(const T*, const int64_t*, const T*, int64_t, int64_t, int64_t, int64_t, \
                                      T*, cudaStream_t);                                                      \
  template cudaError_t sparse_transpose_matmul<T>(const T*, const T*, int64_t, int64_t, int64_t,              \
                                                  const int64_t*, const int64_t*, int64_t, T*, T*, cudaStream_t);
SSAE_INSTANTIATE(float)
SSAE_INSTANTIATE(__nv_bfloat16)
SSAE_INSTANTIATE(__half)
#undef SSAE_INSTANTIATE

}  // namespace ssae::cuda
