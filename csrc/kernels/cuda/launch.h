// Launch configuration, chunking and scratch sizes of the CUDA kernels.
//
// Plain C++ (no CUDA headers) so that the host-side unit tests
// (csrc/tests/test_cuda_launch.cpp) check exactly the arithmetic the
// launchers and the ATen bindings use. Every grid is one-dimensional
// (grid.x < 2^31), so no problem size hits the 65535 limit of grid.y/z.
#pragma once

#include <algorithm>
#include <cstdint>

// Index arithmetic that the kernels also run on the device.
#if defined(__CUDACC__)
#define SSAE_HD __host__ __device__ __forceinline__
#else
#define SSAE_HD inline
#endif

namespace ssae::cuda {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
constexpr int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}
// Bits needed to write every value in [0, x].
constexpr int bit_width(uint64_t x) {
  int b = 0;
  while (x) { ++b; x >>= 1; }
  return b;
}

constexpr int64_t kMaxGrid = (int64_t(1) << 31) - 1;

struct Launch {
  int64_t blocks = 0;  // grid.x
  int threads = 0;     // block.x
  int64_t tiles = 1;   // blocks per row (or per latent), over the d columns
};

// ------------------------------------------------------------------ topk_encode

// The selection kernels run one block per row with one thread per radix bin.
constexpr int kSelectThreads = 256;
constexpr int kRadixBins = 256;
// The final sort of a row's k keys runs in shared memory up to this many keys
// (16 KiB), in the row's padded state buffer in global memory beyond.
constexpr int64_t kSortSharedKeys = 2048;
// Scores + candidate slots of one GEMM chunk. At 2048 rows, 64 MiB is 4096
// latents per chunk (32 MiB float32 scores + 32 MiB candidate slots): the
// selection's re-reads of the chunk mostly hit L2 (A100 40 MB, H100 50 MB), and
// it is < 0.1% of an 80 GB device, whatever M is.
constexpr int64_t kEncodeScratchBytes = int64_t(64) << 20;
// Rows per GEMM chunk: 2048 selection blocks per chunk fill 132 SMs with
// 8 resident blocks each about twice, and keep the GEMM tall enough for
// full tensor-core tiles.
constexpr int64_t kEncodeMaxRowBlock = 2048;
// Latent chunks are multiples of this (GEMM tile width, and >= one radix block).
constexpr int64_t kLatentAlign = 256;

struct TopkEncodePlan {
  int64_t row_block = 0;        // R: rows per GEMM chunk
  int64_t latent_chunk = 0;     // C: latents per GEMM chunk (the last one may be shorter)
  int64_t score_rows = 0;       // rows of the score buffer: R, or 2R when x - b_dec is split in hi + lo
  int64_t state_stride = 0;     // keys per row of a selection state: next_pow2(k)
  int64_t row_blocks = 0;       // ceil(N / R)
  int64_t latent_chunks = 0;    // ceil(M / C)
  int64_t scores_bytes = 0;     // float32 [score_rows, C]
  int64_t candidates_bytes = 0; // uint32 [R, C]
  int64_t state_bytes = 0;      // two uint64 [R, state_stride] buffers (ping-pong) + uint64 [R] row minima
  int64_t x_bytes = 0;          // the row block of x - b_dec: float32 [R, d] + hi/lo halves [2R, d] of the input type
  int64_t total_bytes() const { return scores_bytes + candidates_bytes + state_bytes + x_bytes; }
};

// split_x: bfloat16/float16 input with b_dec, where x - b_dec (exact in float32)
// is fed to the tensor-core GEMM as two halves hi + lo of the input type.
// elem_bytes: bytes per element of x.
inline TopkEncodePlan plan_topk_encode(int64_t N, int64_t M, int64_t d, int64_t k, bool split_x, int64_t elem_bytes,
                                       int64_t budget = kEncodeScratchBytes) {
  TopkEncodePlan p;
  const int64_t score_factor = split_x ? 2 : 1;
  const int64_t per_elem = 4 * score_factor + 4;  // float32 scores + one uint32 candidate slot
  p.row_block = std::max<int64_t>(1, std::min(N, kEncodeMaxRowBlock));
  // Latents per chunk within the budget, at least one aligned tile, at most M.
  int64_t c = budget / (p.row_block * per_elem) / kLatentAlign * kLatentAlign;
  c = std::max(c, kLatentAlign);
  if (c >= M) {
    c = M;
  } else {
    // Same number of chunks, evened out (still aligned, still within budget).
    const int64_t chunks = ceil_div(M, c);
    c = std::min(M, round_up(ceil_div(M, chunks), kLatentAlign));
  }
  p.latent_chunk = c;
  p.score_rows = p.row_block * score_factor;
  p.state_stride = next_pow2(k);
  p.row_blocks = ceil_div(N, p.row_block);
  p.latent_chunks = ceil_div(M, c);
  p.scores_bytes = p.score_rows * c * 4;
  p.candidates_bytes = p.row_block * c * 4;
  p.state_bytes = (2 * p.row_block * p.state_stride + p.row_block) * 8;
  p.x_bytes = split_x ? p.row_block * d * (4 + 2 * elem_bytes) : 0;
  return p;
}

// The encode's order of work, shared by the ATen binding and the host tests:
// for each row block, every latent chunk in increasing order (the selection
// relies on it), then the final sort. chunk(n0, rows, m0, cols, parity) reads
// selection state buffer `parity` and writes buffer `parity ^ 1`;
// finish(n0, rows, parity) reads buffer `parity`.
template <class Chunk, class Finish>
void encode_schedule(const TopkEncodePlan& p, int64_t N, int64_t M, Chunk&& chunk, Finish&& finish) {
  for (int64_t n0 = 0; n0 < N; n0 += p.row_block) {
    const int64_t rows = std::min(p.row_block, N - n0);
    int parity = 0;
    for (int64_t m0 = 0; m0 < M; m0 += p.latent_chunk) {
      chunk(n0, rows, m0, std::min(p.latent_chunk, M - m0), parity);
      parity ^= 1;
    }
    finish(n0, rows, parity);
  }
}

// Selection of one chunk (and the final sort): one block per row of the row block.
inline Launch select_launch(int64_t rows) { return Launch{rows, kSelectThreads, 1}; }

// Whether the final sort of a row runs in shared memory (else in its global state row).
constexpr bool sort_in_shared(int64_t state_stride) { return state_stride <= kSortSharedKeys; }

// ------------------------------------------------- row-wise gathers over d columns

// sparse_decode (one block per (row, column tile)) and sparse_transpose_matmul
// (one block per (latent, column tile)): each thread owns kColsPerThread
// columns, strided by the block width so that every load is coalesced.
constexpr int kColsPerThread = 4;
constexpr int kMaxRowThreads = 256;
// Entries (index + weight) staged in shared memory per round.
constexpr int kStageEntries = 256;

inline Launch row_tiles_launch(int64_t rows, int64_t d) {
  Launch l;
  // Enough threads for d columns in one tile, in whole warps, at most 256.
  l.threads = int(std::clamp<int64_t>(round_up(ceil_div(d, kColsPerThread), 32), 32, kMaxRowThreads));
  l.tiles = std::max<int64_t>(1, ceil_div(d, int64_t(l.threads) * kColsPerThread));
  l.blocks = rows * l.tiles;
  return l;
}

// Block -> (row, first column of its tile); thread t's i-th column is
// tile_column(first, i, t, threads) (skipped when >= d).
SSAE_HD int64_t tile_row(int64_t block, int64_t tiles) { return block / tiles; }
SSAE_HD int64_t tile_first_column(int64_t block, int64_t tiles, int threads) {
  return (block % tiles) * int64_t(threads) * kColsPerThread;
}
SSAE_HD int64_t tile_column(int64_t first, int i, int t, int threads) { return first + int64_t(i) * threads + t; }

// ------------------------------------------------------------------ sampled_dot

// One warp per output (row n, slot j); 8 warps per block share row n's grad.
constexpr int kDotWarps = 8;
inline Launch sampled_dot_launch(int64_t rows, int64_t k) {
  Launch l;
  l.threads = 32 * kDotWarps;
  l.tiles = ceil_div(k, kDotWarps);
  l.blocks = rows * l.tiles;
  return l;
}
// Block and warp -> the slot j of row tile_row(block, tiles) (skipped when >= k).
SSAE_HD int64_t dot_slot(int64_t block, int64_t tiles, int warp) { return (block % tiles) * kDotWarps + warp; }

// ------------------------------------------------------------- latent_transpose

// Radix sort keys: latent ids (out-of-range ids mapped to num_latents) as uint32.
inline int transpose_sort_bits(int64_t num_latents) { return std::max(1, bit_width(uint64_t(num_latents))); }
constexpr int kElementwiseThreads = 256;
inline Launch elementwise_launch(int64_t count) {
  return Launch{std::max<int64_t>(1, ceil_div(count, kElementwiseThreads)), kElementwiseThreads, 1};
}

// Byte offsets in latent_transpose's workspace: uint32 sort keys in and out,
// int64 entry ids (the sort's input values), then the radix sort's temporary
// storage; each region 256-byte aligned.
constexpr int64_t kWorkspaceAlign = 256;
struct TransposeWorkspace {
  int64_t keys_in = 0, keys_out = 0, ids = 0, sort_temp = 0, total = 0;
};
inline TransposeWorkspace transpose_workspace(int64_t count, int64_t sort_temp_bytes) {
  TransposeWorkspace w;
  w.keys_in = 0;
  w.keys_out = w.keys_in + round_up(count * 4, kWorkspaceAlign);
  w.ids = w.keys_out + round_up(count * 4, kWorkspaceAlign);
  w.sort_temp = w.ids + round_up(count * 8, kWorkspaceAlign);
  w.total = w.sort_temp + round_up(sort_temp_bytes, kWorkspaceAlign);
  return w;
}
// The sort counts entries in int (CUB's item count).
constexpr int64_t kMaxTransposeEntries = (int64_t(1) << 31) - 1;

// ------------------------------------------------------------ tilted (TERM) stats

// tilted_group_stats: pass 1 gives each thread ("slot") every slots-th loss
// (coalesced) and one TiltState per group, in registers without groups and in
// a [G, slots] global array with them (thread-private, so no atomics and a
// fixed merge order: the result is deterministic). Pass 2 merges the slots of
// each group, one block per group. The workspace is O(slots * G) with slots
// shrinking as G grows (never below one warp), never O(N * G).
constexpr int kTiltThreads = 256;
constexpr int64_t kTiltMaxSlots = int64_t(1) << 18;  // 1024 blocks of 256: fills any current GPU
constexpr int64_t kTiltMinPerSlot = 16;              // below this, merging costs more than it saves
constexpr int64_t kTiltStateBytes = 24;              // anchor (f64) + s (f64) + count (i64)
constexpr int64_t kTiltScratchBytes = int64_t(64) << 20;
constexpr int kTiltMergeThreads = 256;

struct TiltPlan {
  int64_t slots = 0;  // threads of pass 1 = blocks * threads (a multiple of 32)
  Launch pass1;       // blocks x threads over the losses
  Launch merge;       // one block per group
  // Byte offsets in the workspace: anchor [G * slots] f64, s f64, count i64,
  // then an int32 flag set when a group id is out of range; 256-byte aligned.
  int64_t anchor = 0, s = 0, count = 0, flag = 0, total = 0;
};

inline TiltPlan plan_tilted_group_stats(int64_t n, int64_t num_groups, int64_t budget = kTiltScratchBytes) {
  TiltPlan p;
  int64_t slots = std::min(kTiltMaxSlots, ceil_div(std::max<int64_t>(n, 1), kTiltMinPerSlot));
  slots = std::min(slots, budget / (num_groups * kTiltStateBytes));
  slots = std::max<int64_t>(32, slots / 32 * 32);
  p.pass1.threads = int(std::min<int64_t>(kTiltThreads, slots));
  slots = slots / p.pass1.threads * p.pass1.threads;
  p.slots = slots;
  p.pass1.blocks = slots / p.pass1.threads;
  p.merge = Launch{num_groups, kTiltMergeThreads, 1};
  const int64_t array = round_up(num_groups * slots * 8, kWorkspaceAlign);
  p.anchor = 0;
  p.s = array;
  p.count = 2 * array;
  p.flag = 3 * array;
  p.total = p.flag + kWorkspaceAlign;
  return p;
}
// Slot of the losses' i-th entry, and the entry of (group, slot) in the state arrays.
SSAE_HD int64_t tilt_slot(int64_t i, int64_t slots) { return i % slots; }
SSAE_HD int64_t tilt_entry(int64_t group, int64_t slot, int64_t slots) { return group * slots + slot; }

// ------------------------------------------------------------ per-row squared errors

// row_sq_error: one warp per row, kSqRowsPerBlock rows per block.
constexpr int kSqRowsPerBlock = 8;
inline Launch row_sq_error_launch(int64_t rows) {
  return Launch{std::max<int64_t>(1, ceil_div(rows, kSqRowsPerBlock)), 32 * kSqRowsPerBlock, 1};
}
// sparse_decode_sq_error: one block per row (the whole row's error is reduced
// in the block, so no atomics); the block walks its column tiles in turn, with
// the width and tile count of row_tiles_launch.
inline Launch decode_sq_error_launch(int64_t rows, int64_t d) {
  Launch l = row_tiles_launch(1, d);
  l.blocks = rows;
  return l;
}
// sparse_decode_residual: the same one block per row over its column tiles. The
// dot of slot j is finished in every tile by thread residual_dot_thread(j, threads),
// so a row's per-tile partial sums pass through one thread, in tile order.
inline Launch decode_residual_launch(int64_t rows, int64_t d) { return decode_sq_error_launch(rows, d); }
SSAE_HD int residual_dot_thread(int64_t j, int threads) { return int(j % kStageEntries) % threads; }
// Its static shared memory: the staged entries and one partial dot per (warp, staged slot).
constexpr int64_t kResidualSharedBytes = kStageEntries * (4 + 8) + (kMaxRowThreads / 32) * kStageEntries * 4;
static_assert(kResidualSharedBytes <= 48 * 1024, "static shared memory is limited to 48 KiB per block");

// Whether a problem fits these launch shapes (the bindings check this first).
inline bool grid_fits(const Launch& l) { return l.blocks >= 1 && l.blocks <= kMaxGrid; }

}  // namespace ssae::cuda
