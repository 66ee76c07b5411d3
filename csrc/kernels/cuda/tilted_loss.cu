#include "device.cuh"
#include "launch.h"
#include "row_decode.cuh"
#include "tilt_state.h"
#include "tilted_loss.cuh"

namespace ssae::cuda {
namespace {

struct TiltArrays {
  double* anchor;
  double* s;
  int64_t* count;
  int* bad_group;
};

__device__ __forceinline__ TiltState load_state(const TiltArrays& a, int64_t e) {
  return TiltState{a.anchor[e], a.s[e], a.count[e]};
}
__device__ __forceinline__ void store_state(const TiltArrays& a, int64_t e, const TiltState& st) {
  a.anchor[e] = st.anchor;
  a.s[e] = st.s;
  a.count[e] = st.count;
}

// Pass 1: thread `slot` folds losses slot, slot + slots, ... into its states.
// Without groups the state stays in registers; with groups each (group, slot)
// state lives in the workspace (zeroed beforehand), private to this thread.
template <typename T>
__global__ void __launch_bounds__(kTiltThreads)
    tilt_partial_kernel(const T* losses, int64_t n, double t, const int64_t* groups, int64_t num_groups,
                        int64_t slots, TiltArrays a) {
  const int64_t slot = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (groups == nullptr) {
    TiltState st = tilt_empty();
    for (int64_t i = slot; i < n; i += slots) tilt_add(st, double(to_float(losses[i])), t);
    store_state(a, tilt_entry(0, slot, slots), st);
    return;
  }
  bool bad = false;
  for (int64_t i = slot; i < n; i += slots) {
    const int64_t g = groups[i];
    if (g < 0 || g >= num_groups) {
      bad = true;
      continue;
    }
    const int64_t e = tilt_entry(g, slot, slots);
    TiltState st = load_state(a, e);
    tilt_add(st, double(to_float(losses[i])), t);
    store_state(a, e, st);
  }
  if (bad) *a.bad_group = 1;
}

// Pass 2: one block per group merges its slots in a fixed order (strided per
// thread, then a shared-memory tree), so the result does not depend on timing.
__global__ void __launch_bounds__(kTiltMergeThreads)
    tilt_merge_kernel(double t, int64_t slots, TiltArrays a, double* anchor, double* log_mean, int64_t* count) {
  __shared__ double sh_anchor[kTiltMergeThreads], sh_s[kTiltMergeThreads];
  __shared__ int64_t sh_count[kTiltMergeThreads];
  const int64_t g = blockIdx.x;
  const int tid = int(threadIdx.x);
  TiltState st = tilt_empty();
  for (int64_t j = tid; j < slots; j += kTiltMergeThreads) tilt_merge(st, load_state(a, tilt_entry(g, j, slots)), t);
  sh_anchor[tid] = st.anchor;
  sh_s[tid] = st.s;
  sh_count[tid] = st.count;
  __syncthreads();
  for (int half = kTiltMergeThreads / 2; half > 0; half /= 2) {
    if (tid < half) {
      tilt_merge(st, TiltState{sh_anchor[tid + half], sh_s[tid + half], sh_count[tid + half]}, t);
      sh_anchor[tid] = st.anchor;
      sh_s[tid] = st.s;
      sh_count[tid] = st.count;
    }
    __syncthreads();
  }
  if (tid == 0) {
    tilt_finish(st, t, anchor + g, log_mean + g, count + g);
    if (*a.bad_group) anchor[g] = log_mean[g] = quiet_nan();
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// One warp per row.
template <typename T>
__global__ void __launch_bounds__(32 * kSqRowsPerBlock)
    row_sq_error_kernel(const T* a, const T* b, int64_t rows, int64_t d, float* out) {
  const int64_t row = int64_t(blockIdx.x) * kSqRowsPerBlock + threadIdx.x / 32;
  const int lane = int(threadIdx.x) & 31;
  if (row >= rows) return;  // whole warps leave together
  const T* pa = a + row * d;
  const T* pb = b + row * d;
  float s = 0.0f;
  for (int64_t c = lane; c < d; c += 32) {
    const float diff = to_float(pa[c]) - to_float(pb[c]);
    s += diff * diff;
  }
  s = warp_sum(s);
  if (lane == 0) out[row] = s;
}

// One block per row: sparse_decode's column tiles (decode_tile, row_decode.cuh),
// each thread squaring its columns' errors, then a block reduction in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
    decode_sq_error_kernel(const T* values, const int64_t* indices, const T* W, const T* bias, const T* x, int64_t k,
                           int64_t d, int64_t num_latents, int64_t tiles, float* out) {
  __shared__ DecodeStage stage;
  __shared__ float warp_part[kMaxRowThreads / 32];
  const int t = int(threadIdx.x), nt = int(blockDim.x);
  const int64_t n = blockIdx.x;
  float sq = 0.0f;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t first = tile_first_column(tile, tiles, nt);
    float acc[kColsPerThread];
#pragma unroll
    for (int i = 0; i < kColsPerThread; ++i) {
      const int64_t c = tile_column(first, i, t, nt);
      acc[i] = c < d ? (bias != nullptr ? to_float(bias[c]) : 0.0f) - to_float(x[n * d + c]) : 0.0f;
    }
    decode_tile(values, indices, W, n, k, d, num_latents, first, stage, acc);
#pragma unroll
    for (int i = 0; i < kColsPerThread; ++i) sq += acc[i] * acc[i];
  }
  sq = warp_sum(sq);
  if ((t & 31) == 0) warp_part[t / 32] = sq;
  __syncthreads();
  if (t == 0) {
    float total = 0.0f;
    for (int w = 0; w < nt / 32; ++w) total += warp_part[w];
    out[n] = total;
  }
}

// The backward of decode_sq_error_kernel, one block per row over its column
// tiles: the residual scale[n] (x_hat - x) of the tile in registers (stored as T),
// then its dot with each staged W row, read again right after decode_tile read it
// (L1/L2 hits). Per slot j: warp sums, then the warps' sums in a fixed order by the
// thread that owns j in every tile (j % kStageEntries == t mod threads), which adds
// the tile's share to dots[n, j]: no atomics, the same result on every run.
template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
    decode_residual_kernel(const T* values, const int64_t* indices, const T* W, const T* bias, const T* x,
                           const float* scale, int64_t k, int64_t d, int64_t num_latents, int64_t tiles, T* residual,
                           float* dots) {
  __shared__ DecodeStage stage;
  __shared__ float warp_dot[kMaxRowThreads / 32][kStageEntries];
  const int t = int(threadIdx.x), nt = int(blockDim.x), warp = t / 32, lane = t & 31;
  const int64_t n = blockIdx.x;
  const float s = scale[n];
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t first = tile_first_column(tile, tiles, nt);
    float acc[kColsPerThread];
#pragma unroll
    for (int i = 0; i < kColsPerThread; ++i) {
      const int64_t c = tile_column(first, i, t, nt);
      acc[i] = c < d ? (bias != nullptr ? to_float(bias[c]) : 0.0f) - to_float(x[n * d + c]) : 0.0f;
    }
    decode_tile(values, indices, W, n, k, d, num_latents, first, stage, acc);
#pragma unroll
    for (int i = 0; i < kColsPerThread; ++i) {
      const int64_t c = tile_column(first, i, t, nt);
      acc[i] = c < d ? s * acc[i] : 0.0f;
      if (c < d) residual[n * d + c] = from_float<T>(acc[i]);
    }
    for (int64_t j0 = 0; j0 < k; j0 += kStageEntries) {
      // (its leading barrier also keeps warp_dot until the previous round has read it)
      const int64_t nj = stage_entries(stage, values, indices, n, k, j0, num_latents);
      for (int64_t j = 0; j < nj; ++j) {
        const T* row = W + stage.row[j] * d;
        float p = 0.0f;
#pragma unroll
        for (int i = 0; i < kColsPerThread; ++i) {
          const int64_t c = tile_column(first, i, t, nt);
          if (c < d) p += acc[i] * to_float(row[c]);
        }
        p = warp_sum(p);
        if (lane == 0) warp_dot[warp][j] = p;
      }
      __syncthreads();
      for (int64_t j = t; j < nj; j += nt) {
        float total = 0.0f;
        for (int w = 0; w < nt / 32; ++w) total += warp_dot[w][j];
        float* out = dots + n * k + j0 + j;
        *out = tile == 0 ? total : *out + total;
      }
    }
  }
}

TiltArrays arrays(void* workspace, const TiltPlan& p) {
  char* base = static_cast<char*>(workspace);
  return TiltArrays{reinterpret_cast<double*>(base + p.anchor), reinterpret_cast<double*>(base + p.s),
                    reinterpret_cast<int64_t*>(base + p.count), reinterpret_cast<int*>(base + p.flag)};
}

}  // namespace

size_t tilted_group_stats_workspace_bytes(int64_t n, int64_t num_groups) {
  return size_t(plan_tilted_group_stats(n, num_groups).total);
}

template <typename T>
cudaError_t tilted_group_stats(const T* losses, int64_t n, double t, const int64_t* groups, int64_t num_groups,
                               double* anchor, double* log_mean, int64_t* count, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream) {
  if (n < 1 || num_groups < 1) return cudaErrorInvalidValue;
  const TiltPlan p = plan_tilted_group_stats(n, num_groups);
  if (workspace_bytes < size_t(p.total) || !grid_fits(p.pass1) || !grid_fits(p.merge)) return cudaErrorInvalidValue;
  const TiltArrays a = arrays(workspace, p);
  // With groups every (group, slot) state starts empty; without, pass 1 writes
  // each slot's state once. The flag is always read.
  cudaError_t err = groups != nullptr ? cudaMemsetAsync(workspace, 0, size_t(p.total), stream)
                                      : cudaMemsetAsync(a.bad_group, 0, sizeof(int), stream);
  if (err != cudaSuccess) return err;
  tilt_partial_kernel<T><<<unsigned(p.pass1.blocks), p.pass1.threads, 0, stream>>>(losses, n, t, groups, num_groups,
                                                                                    p.slots, a);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  tilt_merge_kernel<<<unsigned(p.merge.blocks), p.merge.threads, 0, stream>>>(t, p.slots, a, anchor, log_mean, count);
  return cudaGetLastError();
}

template <typename T>
cudaError_t row_sq_error(const T* a, const T* b, int64_t rows, int64_t d, float* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const Launch l = row_sq_error_launch(rows);
  if (!grid_fits(l) || d < 0) return cudaErrorInvalidValue;
  row_sq_error_kernel<T><<<unsigned(l.blocks), l.threads, 0, stream>>>(a, b, rows, d, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t sparse_decode_sq_error(const T* values, const int64_t* indices, const T* W, const T* bias, const T* x,
                                   int64_t rows, int64_t k, int64_t d, int64_t num_latents, float* out,
                                   cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const Launch l = decode_sq_error_launch(rows, d);
  if (!grid_fits(l) || k < 0 || d < 0) return cudaErrorInvalidValue;
  decode_sq_error_kernel<T><<<unsigned(l.blocks), l.threads, 0, stream>>>(values, indices, W, bias, x, k, d,
                                                                           num_latents, l.tiles, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t sparse_decode_residual(const T* values, const int64_t* indices, const T* W, const T* bias, const T* x,
                                   const float* scale, int64_t rows, int64_t k, int64_t d, int64_t num_latents,
                                   T* residual, float* dots, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const Launch l = decode_residual_launch(rows, d);
  if (!grid_fits(l) || k < 0 || d < 0) return cudaErrorInvalidValue;
  decode_residual_kernel<T><<<unsigned(l.blocks), l.threads, 0, stream>>>(values, indices, W, bias, x, scale, k, d,
                                                                           num_latents, l.tiles, residual, dots);
  return cudaGetLastError();
}

#define SSAE_INSTANTIATE(T)                                                                                        \
  template cudaError_t tilted_group_stats<T>(const T*, int64_t, double, const int64_t*, int64_t, double*, double*, \
                                             int64_t*, void*, size_t, cudaStream_t);                               \
  template cudaError_t row_sq_error<T>(const T*, const T*, int64_t, int64_t, float*, cudaStream_t);                \
  template cudaError_t sparse_decode_sq_error<T>(const T*, const int64_t*, const T*, const T*, const T*, int64_t,  \
                                                 int64_t, int64_t, int64_t, float*, cudaStream_t);                 \
  template cudaError_t sparse_decode_residual<T>(const T*, const int64_t*, const T*, const T*, const T*, const float*, \
                                                 int64_t, int64_t, int64_t, int64_t, T*, float*, cudaStream_t);
SSAE_INSTANTIATE(float)
SSAE_INSTANTIATE(__nv_bfloat16)
SSAE_INSTANTIATE(__half)
#undef SSAE_INSTANTIATE

}  // namespace ssae::cuda
