// Column layout of the vectorised row gathers (sparse_decode, sampled_dot and
// sparse_transpose_matmul): which columns each thread owns, and when a run of
// them is read with one 16-byte load. Plain C++ (no CUDA headers) so that the
// host tests (csrc/tests/test_sparse_decode.cpp) check exactly the arithmetic
// the kernels run.
//
// A thread owns kGatherCols columns as runs of vec_elems(T) consecutive columns
// (4 float32 or 8 bfloat16/float16 = 16 bytes), the runs of a warp side by side,
// so one warp-wide load reads 512 contiguous bytes. A run is read with one
// 16-byte load when every gathered row starts 16-byte aligned (the matrix base
// and its row stride in bytes are multiples of 16: rows_aligned) and the run
// lies wholly within the row; otherwise element by element (odd d, a
// misaligned view such as W[:, 1:], the last partial run of a row).
#pragma once

#include <algorithm>
#include <cstdint>

#include "launch.h"

namespace ssae::cuda {

constexpr int kVecBytes = 16;
// float32 accumulators per thread: one run of 8 (16-bit types) or two of 4 (float32).
constexpr int kGatherCols = 8;
constexpr int kGatherMaxThreads = 256;
// The kernels' __launch_bounds__(kGatherMaxThreads, kGatherMinBlocks): three blocks of
// 256 threads per SM, so up to 85 registers a thread. With the thread bound alone,
// nvcc 13's ptxas aims at 64 and spilled 4-104 bytes in some instantiations of
// sparse_transpose_matmul (the loads of two unrolled entries in flight, 64-bit indexing).
constexpr int kGatherMinBlocks = 3;

// Elements of a 16-byte vector.
SSAE_HD constexpr int vec_elems(int elem_bytes) { return kVecBytes / elem_bytes; }
// Runs of a thread.
SSAE_HD constexpr int gather_runs(int elem_bytes) { return kGatherCols / vec_elems(elem_bytes); }

// One block per (row, column tile). Tiles are as wide as one block of at most 256
// threads covers, and balanced: d = 2304 is two tiles of 160 threads (1280
// columns each), not 2048 + 256.
inline Launch gather_launch(int64_t rows, int64_t d) {
  Launch l;
  const int64_t per_block = int64_t(kGatherMaxThreads) * kGatherCols;
  l.tiles = std::max<int64_t>(1, ceil_div(d, per_block));
  const int64_t cols = ceil_div(std::max<int64_t>(d, 1), l.tiles);
  l.threads = int(std::clamp<int64_t>(round_up(ceil_div(cols, kGatherCols), 32), 32, kGatherMaxThreads));
  l.blocks = rows * l.tiles;
  return l;
}

// The first column of a block's tile (a multiple of kGatherCols, hence of every run length).
SSAE_HD int64_t gather_first_column(int64_t block, int64_t tiles, int threads) {
  return (block % tiles) * int64_t(threads) * kGatherCols;
}
// The first column of thread t's u-th run (u < gather_runs): runs of one u side by side across the block.
SSAE_HD int64_t gather_run(int64_t first, int u, int t, int threads, int run) {
  return first + (int64_t(u) * threads + t) * run;
}

// Whether every row base + r * row_stride (elements of elem_bytes) starts 16-byte aligned.
SSAE_HD bool rows_aligned(uint64_t base_address, int64_t row_stride, int elem_bytes) {
  return base_address % kVecBytes == 0 && (row_stride * elem_bytes) % kVecBytes == 0;
}

// Whether the run of `run` columns at c (a multiple of run) is read with 16-byte loads:
// aligned rows, and the run wholly inside the row's d columns.
SSAE_HD bool vector_run(bool aligned, int64_t c, int run, int64_t d) { return aligned && c + run <= d; }

// sampled_dot: one warp per (row, slot); lane l reads the runs starting at
// (s * 32 + l) * run for s = 0, 1, ... below vector_columns(d, run), then the
// remaining columns one by one (lane l: vector_columns + l + 32 s).
SSAE_HD int64_t vector_columns(int64_t d, int run) { return d / run * run; }

}  // namespace ssae::cuda
