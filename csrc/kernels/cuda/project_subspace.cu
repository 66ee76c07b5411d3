#include "device.cuh"
#include "project_subspace.cuh"

namespace ssae::cuda {
namespace {

// 32 x 32 output tiles, 256 threads: thread (ty, tx) = (t / 32, t % 32) owns rows
// ty, ty + 8, ty + 16, ty + 24 of its tile in column tx. Operands are staged in
// shared memory per 32-wide step of the reduction; a warp reads one row of the
// column-indexed tile (conflict-free) and broadcasts one element of the other.
constexpr int kTile = 32;
constexpr int kThreads = 256;
constexpr int kRowsPerThread = kTile * kTile / kThreads;
constexpr int kRowStep = kThreads / kTile;

// C[a, c] = sum_i U[i, a] G[i, c]; blocks over (a tile, c tile), c tile fastest.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    utg_kernel(const T* G, int64_t ldg, const T* U, int64_t d, int64_t r, int64_t n, int64_t col_tiles, float* C) {
  __shared__ float Us[kTile][kTile + 1];  // Us[i][a] = U[i0 + i, a0 + a]
  __shared__ float Gs[kTile][kTile];      // Gs[i][c] = G[i0 + i, c0 + c]
  const int t = int(threadIdx.x), tx = t % kTile, ty = t / kTile;
  const int64_t a0 = int64_t(blockIdx.x) / col_tiles * kTile, c0 = int64_t(blockIdx.x) % col_tiles * kTile;
  float acc[kRowsPerThread] = {};
  for (int64_t i0 = 0; i0 < d; i0 += kTile) {
    __syncthreads();  // the previous step's readers are done
    for (int k = t; k < kTile * kTile; k += kThreads) {
      const int i = k / kTile, j = k % kTile;
      const bool row = i0 + i < d;
      Us[i][j] = row && a0 + j < r ? to_float(U[(i0 + i) * r + a0 + j]) : 0.0f;
      Gs[i][j] = row && c0 + j < n ? to_float(G[(i0 + i) * ldg + c0 + j]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int i = 0; i < kTile; ++i) {
      const float g = Gs[i][tx];
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) acc[q] += Us[i][ty + q * kRowStep] * g;
    }
  }
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t a = a0 + ty + q * kRowStep, c = c0 + tx;
    if (a < r && c < n) C[a * n + c] = acc[q];
  }
}

// out[i, c] = (G[i, c] or 0) -/+ sum_a U[i, a] C[a, c]; blocks over (i tile, c tile).
template <typename T, bool kComplement>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const T* G, int64_t ldg, const T* U, const float* C, int64_t d, int64_t r, int64_t n,
                 int64_t col_tiles, T* out, int64_t ldo) {
  __shared__ float Us[kTile][kTile + 1];  // Us[i][a] = U[i0 + i, a0 + a]
  __shared__ float Cs[kTile][kTile];      // Cs[a][c] = C[a0 + a, c0 + c]
  const int t = int(threadIdx.x), tx = t % kTile, ty = t / kTile;
  const int64_t i0 = int64_t(blockIdx.x) / col_tiles * kTile, c0 = int64_t(blockIdx.x) % col_tiles * kTile;
  float acc[kRowsPerThread] = {};
  for (int64_t a0 = 0; a0 < r; a0 += kTile) {
    __syncthreads();
    for (int k = t; k < kTile * kTile; k += kThreads) {
      const int i = k / kTile, j = k % kTile;
      const bool in_r = a0 + j < r;
      Us[i][j] = i0 + i < d && in_r ? to_float(U[(i0 + i) * r + a0 + j]) : 0.0f;
      Cs[i][j] = a0 + i < r && c0 + j < n ? C[(a0 + i) * n + c0 + j] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int a = 0; a < kTile; ++a) {
      const float cv = Cs[a][tx];
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) acc[q] += Us[ty + q * kRowStep][a] * cv;
    }
  }
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t i = i0 + ty + q * kRowStep, c = c0 + tx;
    if (i < d && c < n) {
      // In place (out == G) this thread reads G[i, c] before it writes the same element.
      const float v = kComplement ? to_float(G[i * ldg + c]) - acc[q] : acc[q];
      out[i * ldo + c] = from_float<T>(v);
    }
  }
}

constexpr int64_t ceil_tiles(int64_t x) { return (x + kTile - 1) / kTile; }
constexpr int64_t kMaxBlocks = (int64_t(1) << 31) - 1;

}  // namespace

template <typename T>
cudaError_t project_subspace(const T* G, int64_t ldg, const T* U, int64_t d, int64_t r, int64_t n, bool complement,
                             T* out, int64_t ldo, float* scratch, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (d < 1 || r < 1 || n < 0) return cudaErrorInvalidValue;
  const int64_t col_tiles = ceil_tiles(n);
  const int64_t utg_blocks = ceil_tiles(r) * col_tiles, apply_blocks = ceil_tiles(d) * col_tiles;
  if (utg_blocks > kMaxBlocks || apply_blocks > kMaxBlocks) return cudaErrorInvalidValue;
  utg_kernel<T><<<unsigned(utg_blocks), kThreads, 0, stream>>>(G, ldg, U, d, r, n, col_tiles, scratch);
  if (complement)
    apply_kernel<T, true><<<unsigned(apply_blocks), kThreads, 0, stream>>>(G, ldg, U, scratch, d, r, n, col_tiles,
                                                                         out, ldo);
  else
    apply_kernel<T, false><<<unsigned(apply_blocks), kThreads, 0, stream>>>(G, ldg, U, scratch, d, r, n, col_tiles,
                                                                          out, ldo);
  return cudaGetLastError();
}

#define SSAE_INSTANTIATE(T)                                                                                   \
  template cudaError_t project_subspace<T>(const T*, int64_t, const T*, int64_t, int64_t, int64_t, bool, T*, \
                                           int64_t, float*, cudaStream_t);
SSAE_INSTANTIATE(float)
SSAE_INSTANTIATE(__nv_bfloat16)
SSAE_INSTANTIATE(__half)
#undef SSAE_INSTANTIATE

}  // namespace ssae::cuda
