#include <cub/device/device_radix_sort.cuh>

#include "device.cuh"
#include "launch.h"
#include "row_decode.cuh"
#include "sparse_backward.cuh"
#include "sparse_backward.h"

namespace ssae::cuda {
namespace {

// ------------------------------------------------------------------ sampled_dot

// One warp per (row, slot), then a shuffle reduction. The 8 warps of a block
// share row n, so its grad row is read from L1/L2 once. With ALIGNED (grad and W
// rows 16-byte aligned) lane l reads 16-byte runs (s * 32 + l) * R of both rows,
// then the columns past the last whole run one by one; otherwise every column one
// by one, lanes side by side (coalesced either way).
template <typename T, bool ALIGNED>
__global__ void __launch_bounds__(32 * kDotWarps)
    sampled_dot_kernel(const T* __restrict__ grad, int64_t ldg, const int64_t* __restrict__ indices,
                       const T* __restrict__ W, int64_t ldw, int64_t k, int64_t d, int64_t num_latents, int64_t tiles,
                       T* __restrict__ out) {
  constexpr int R = Vec16<T>::n;
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int64_t n = tile_row(blockIdx.x, tiles);
  const int64_t j = dot_slot(blockIdx.x, tiles, warp);
  if (j >= k) return;  // whole warps only; no block barrier follows
  const int64_t idx = indices[n * k + j];
  if (idx < 0 || idx >= num_latents) {
    if (lane == 0) out[n * k + j] = from_float<T>(quiet_nan());
    return;
  }
  const T* g = grad + n * ldg;
  const T* w = W + idx * ldw;
  float s = 0.0f;
  int64_t tail = 0;
  if constexpr (ALIGNED) {
    tail = vector_columns(d, R);
#pragma unroll 2
    for (int64_t c = int64_t(lane) * R; c < tail; c += 32 * R) {
      float a[R], b[R];
      load_run(g, c, d, true, a);
      load_run(w, c, d, true, b);
#pragma unroll
      for (int i = 0; i < R; ++i) s += a[i] * b[i];
    }
  }
  for (int64_t c = tail + lane; c < d; c += 32) s += to_float(g[c]) * to_float(w[c]);
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

// Work split, hot latents and partial sums: sparse_backward.h. Column layout of
// every block: gather_launch (row_decode.h), R columns per run, U runs per thread.

// acc += sum over sorted positions [begin, end) of weights[p] * rows[p / k], in order,
// for this thread's columns; returns the sum of the weights (meaningful in thread 0).
// Every thread of the block calls it (it stages entries behind barriers).
template <typename T, bool ALIGNED, int U, int R>
__device__ __forceinline__ float sum_entries(const T* __restrict__ weights, const T* __restrict__ rows, int64_t ldr,
                                             int64_t entries, int64_t k, int64_t d,
                                             const int64_t* __restrict__ order, int64_t begin, int64_t end,
                                             int64_t first, float* stage_w, int64_t* stage_row, float (&acc)[U][R]) {
  const int t = int(threadIdx.x), nt = int(blockDim.x);
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
#pragma unroll 2
    for (int64_t e = 0; e < ne; ++e) {
      const float w = stage_w[e];
      const T* row = rows + stage_row[e] * ldr;  // row 0 with a NaN weight for an invalid entry
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float f[R];
        load_run(row, gather_run(first, u, t, nt, R), d, ALIGNED, f);
#pragma unroll
        for (int i = 0; i < R; ++i) acc[u][i] += w * f[i];
      }
    }
    if (t == 0)
      for (int64_t e = 0; e < ne; ++e) wsum += stage_w[e];
  }
  return wsum;
}

// Blocks [0, M * tiles): the owners, one per (latent, column tile): a cold latent's
// sums, written to out and colsum; a hot latent's owner does nothing. Blocks
// [M * tiles, (M + chunks) * tiles): the helpers, one per (chunk, column tile): the
// chunk's pieces of hot segments, written to their partial slots.
template <typename T, bool ALIGNED>
__global__ void __launch_bounds__(kGatherMaxThreads, kGatherMinBlocks)
    transpose_matmul_kernel(const T* __restrict__ weights, const T* __restrict__ rows, int64_t ldr, int64_t entries,
                            int64_t k, int64_t d, const int64_t* __restrict__ offsets,
                            const int64_t* __restrict__ order, int64_t num_latents, int64_t tiles, T* __restrict__ out,
                            bool out_aligned, T* __restrict__ colsum, float* __restrict__ partial,
                            float* __restrict__ partial_colsum, bool partial_aligned) {
  constexpr int R = Vec16<T>::n == 8 ? 8 : 4;
  constexpr int U = kGatherCols / R;
  __shared__ float stage_w[kStageEntries];
  __shared__ int64_t stage_row[kStageEntries];
  const int t = int(threadIdx.x), nt = int(blockDim.x);
  const int64_t item = int64_t(blockIdx.x) / tiles;
  const int64_t first = gather_first_column(blockIdx.x, tiles, nt);
  // The block's sums: one for an owner (none for a hot latent's), up to two for a helper.
  Piece tasks[2];
  if (item < num_latents) {
    const Segment s = segment(offsets, item, entries);
    tasks[0].latent = is_hot(s) ? -1 : item;  // a hot latent is summed by the helpers
    tasks[0].begin = s.begin;
    tasks[0].end = s.end;
    tasks[0].slot = -1;  // written to out and colsum
    tasks[1] = Piece();
  } else {
    hot_pieces(offsets, num_latents, entries, item - num_latents, tasks);
  }
  // One loop body (one inlined sum_entries); the task is selected without indexing
  // the array by the loop variable, which would put it in local memory.
#pragma unroll 1
  for (int q = 0; q < 2; ++q) {
    const Piece task = q == 0 ? tasks[0] : tasks[1];
    if (task.latent < 0) continue;  // uniform across the block
    float acc[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < R; ++i) acc[u][i] = 0.0f;
    const float wsum = sum_entries<T, ALIGNED>(weights, rows, ldr, entries, k, d, order, task.begin, task.end, first,
                                               stage_w, stage_row, acc);
    if (task.slot < 0) {
#pragma unroll
      for (int u = 0; u < U; ++u)
        store_run(out + task.latent * d, gather_run(first, u, t, nt, R), d, out_aligned, acc[u]);
      if (colsum != nullptr && first == 0 && t == 0) colsum[task.latent] = from_float<T>(wsum);
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u)
        store_run(partial + task.slot * d, gather_run(first, u, t, nt, R), d, partial_aligned, acc[u]);
      if (first == 0 && t == 0) partial_colsum[task.slot] = wsum;
    }
  }
}

// One block per (chunk, column tile): the hot latent whose last entry lies in the
// chunk, if any: its partial sums added in chunk order.
template <typename T>
__global__ void __launch_bounds__(kGatherMaxThreads, kGatherMinBlocks)
    transpose_reduce_kernel(int64_t entries, int64_t d, const int64_t* __restrict__ offsets, int64_t num_latents,
                            int64_t tiles, T* __restrict__ out, bool out_aligned, T* __restrict__ colsum,
                            const float* __restrict__ partial, const float* __restrict__ partial_colsum,
                            bool partial_aligned) {
  constexpr int R = Vec16<T>::n == 8 ? 8 : 4;
  constexpr int U = kGatherCols / R;
  const int t = int(threadIdx.x), nt = int(blockDim.x);
  const int64_t chunk = int64_t(blockIdx.x) / tiles;
  const int64_t first = gather_first_column(blockIdx.x, tiles, nt);
  const HotSum h = hot_sum(offsets, num_latents, entries, chunk);
  if (h.latent < 0) return;
  float acc[U][R];
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int i = 0; i < R; ++i) acc[u][i] = 0.0f;
  float wsum = 0.0f;
  for (int64_t q = h.first_chunk; q <= h.last_chunk; ++q) {
    const int64_t slot = hot_slot(h, q);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float f[R];
      load_run(partial + slot * d, gather_run(first, u, t, nt, R), d, partial_aligned, f);
#pragma unroll
      for (int i = 0; i < R; ++i) acc[u][i] += f[i];
    }
    if (t == 0) wsum += partial_colsum[slot];
  }
#pragma unroll
  for (int u = 0; u < U; ++u) store_run(out + h.latent * d, gather_run(first, u, t, nt, R), d, out_aligned, acc[u]);
  if (colsum != nullptr && first == 0 && t == 0) colsum[h.latent] = from_float<T>(wsum);
}

}  // namespace

template <typename T>
cudaError_t sampled_dot(const T* grad, int64_t ldg, const int64_t* indices, const T* W, int64_t ldw, int64_t rows,
                        int64_t k, int64_t d, int64_t num_latents, T* out, cudaStream_t stream) {
  if (rows == 0 || k == 0) return cudaSuccess;
  const Launch l = sampled_dot_launch(rows, k);
  if (!grid_fits(l) || ldg < 0 || ldw < 0) return cudaErrorInvalidValue;
  if (aligned_rows(grad, ldg) && aligned_rows(W, ldw))
    sampled_dot_kernel<T, true><<<unsigned(l.blocks), l.threads, 0, stream>>>(grad, ldg, indices, W, ldw, k, d,
                                                                               num_latents, l.tiles, out);
  else
    sampled_dot_kernel<T, false><<<unsigned(l.blocks), l.threads, 0, stream>>>(grad, ldg, indices, W, ldw, k, d,
                                                                                num_latents, l.tiles, out);
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

int64_t sparse_transpose_matmul_scratch(int64_t n_rows, int64_t k, int64_t d) {
  return stm_partials(n_rows * k) * (d + 1);
}

template <typename T>
cudaError_t sparse_transpose_matmul(const T* weights, const T* rows, int64_t ldr, int64_t n_rows, int64_t k, int64_t d,
                                    const int64_t* offsets, const int64_t* order, int64_t num_latents, T* out,
                                    T* colsum, float* scratch, int64_t scratch_floats, cudaStream_t stream) {
  if (num_latents == 0) return cudaSuccess;
  if (k < 1 || ldr < 0 || scratch_floats < sparse_transpose_matmul_scratch(n_rows, k, d)) return cudaErrorInvalidValue;
  const int64_t entries = n_rows * k, chunks = stm_chunks(entries);
  Launch l = gather_launch(num_latents + chunks, d);
  if (!grid_fits(l)) return cudaErrorInvalidValue;
  float* partial = scratch;
  float* partial_colsum = scratch + stm_partials(entries) * d;
  const bool out_aligned = aligned_rows(out, d), partial_aligned = aligned_rows(partial, d);
  if (aligned_rows(rows, ldr))
    transpose_matmul_kernel<T, true><<<unsigned(l.blocks), l.threads, 0, stream>>>(
        weights, rows, ldr, entries, k, d, offsets, order, num_latents, l.tiles, out, out_aligned, colsum, partial,
        partial_colsum, partial_aligned);
  else
    transpose_matmul_kernel<T, false><<<unsigned(l.blocks), l.threads, 0, stream>>>(
        weights, rows, ldr, entries, k, d, offsets, order, num_latents, l.tiles, out, out_aligned, colsum, partial,
        partial_colsum, partial_aligned);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || chunks == 0) return err;
  const Launch r = gather_launch(chunks, d);  // the same tiles and threads, one row of blocks per chunk
  transpose_reduce_kernel<T><<<unsigned(r.blocks), r.threads, 0, stream>>>(
      entries, d, offsets, num_latents, r.tiles, out, out_aligned, colsum, partial, partial_colsum, partial_aligned);
  return cudaGetLastError();
}

#define SSAE_INSTANTIATE(T)                                                                                      \
  template cudaError_t sampled_dot<T>(const T*, int64_t, const int64_t*, const T*, int64_t, int64_t, int64_t, int64_t, \
                                      int64_t, T*, cudaStream_t);                                                    \
  template cudaError_t sparse_transpose_matmul<T>(const T*, const T*, int64_t, int64_t, int64_t, int64_t,            \
                                                  const int64_t*, const int64_t*, int64_t, T*, T*, float*, int64_t,  \
                                                  cudaStream_t);
SSAE_INSTANTIATE(float)
SSAE_INSTANTIATE(__nv_bfloat16)
SSAE_INSTANTIATE(__half)
#undef SSAE_INSTANTIATE

}  // namespace ssae::cuda
