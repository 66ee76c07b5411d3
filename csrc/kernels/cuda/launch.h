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

// The selection kernels run one block per (row, latent split) with one thread
// per radix bin.
constexpr int kSelectThreads = 256;
constexpr int kRadixBins = 256;
// The final sort of a row's k keys runs in shared memory up to this many keys
// (16 KiB), in the row's padded state buffer in global memory beyond.
constexpr int64_t kSortSharedKeys = 2048;
// Scratch of the GEMM chunks: two float32 score buffers (the GEMM of chunk
// i + 1 fills one while the selection reads chunk i from the other) plus one
// uint32 candidate slot per score, 12 bytes per (row, latent) of a chunk. At
// 2048 rows, 64 MiB is 2560 latents per chunk (20 MiB of scores per buffer):
// the selection's re-reads of a chunk mostly hit L2 (A100 40 MB, H100 50 MB),
// and it is < 0.1% of an 80 GB device, whatever M is.
constexpr int64_t kEncodeScratchBytes = int64_t(64) << 20;
constexpr int64_t kEncodeScoreBuffers = 2;
constexpr int64_t kEncodeBytesPerScore = 4 * kEncodeScoreBuffers + 4;
// Rows per GEMM chunk: tall enough for full tensor-core tiles.
constexpr int64_t kEncodeMaxRowBlock = 2048;
// Latent chunks and split segments are multiples of this (GEMM tile width, and
// >= one radix block).
constexpr int64_t kLatentAlign = 256;
// Selection blocks a chunk should have: 16 per multiprocessor (two waves of
// 8 resident 256-thread blocks). Fewer rows than that are made up for by
// splitting each row's chunk over several blocks ("latent splits").
constexpr int64_t kSelectBlocksPerSM = 16;
constexpr int64_t kDefaultMultiprocessors = 132;  // H100 SXM, for plans made without a device
// A split covers at least this many latents in all (4 per thread: below that
// a block's fixed cost, the radix passes over its k keys, dominates), and at
// least 2 * next_pow2(k), so that its state stays a fraction of what it reads.
constexpr int64_t kMinSplitLatents = 1024;
// At most this many splits per row: the merge of a row's splits reads
// splits * next_pow2(k) keys in one block.
constexpr int64_t kMaxSplits = 256;

// What the encode does with b_dec: nothing (none given), centre the row block
// (float32 x: x - b_dec in float32, as the reference), or fold it into the
// bias (bfloat16/float16 x, where x - b_dec is not exact in the input type):
// b_dec rides as one extra row of the GEMM's left operand, so each chunk's
// GEMM also yields W_chunk @ b_dec in float32 (exact 16-bit products, float32
// sums) in its last score row, which fold_chunk_bias turns into
// b_enc - W @ b_dec in place. W is read once, by the GEMM; no second GEMM.
enum class BDec { kNone, kCentre, kFold };

struct TopkEncodePlan {
  int64_t row_block = 0;        // R: rows per GEMM chunk
  int64_t score_rows = 0;       // rows of a score buffer: R, plus the fold row with BDec::kFold
  int64_t splits = 1;           // P: selection blocks (latent splits) per row
  int64_t split_latents = 0;    // seg: latents of a chunk per split (the last chunk may be shorter)
  int64_t latent_chunk = 0;     // C = P * seg: latents per GEMM chunk (the last one may be shorter)
  int64_t state_stride = 0;     // keys per (row, split) of a selection state: next_pow2(k)
  int64_t row_blocks = 0;       // ceil(N / R)
  int64_t latent_chunks = 0;    // ceil(M / C)
  int64_t score_buffers = 0;    // 2 (double-buffered), or 1 when there is only one GEMM chunk in all
  int64_t scores_bytes = 0;     // score_buffers x float32 [score_rows, C]
  int64_t candidates_bytes = 0; // uint32 [R, C]
  int64_t state_bytes = 0;      // two uint64 [R * P, state_stride] buffers (ping-pong) + uint64 [R * P] row minima
  int64_t bias_bytes = 0;       // float32 [M]: b_enc
  int64_t x_bytes = 0;          // the GEMM's left operand when it is not a view of x: float32 [R, d]
                                // (kCentre) or [R + 1, d] of the input type (kFold)
  int64_t steps() const { return row_blocks * latent_chunks; }
  int64_t total_bytes() const { return scores_bytes + candidates_bytes + state_bytes + bias_bytes + x_bytes; }
};

// elem_bytes: bytes per element of x. multiprocessors: of the device (sets the latent splits).
inline TopkEncodePlan plan_topk_encode(int64_t N, int64_t M, int64_t d, int64_t k, BDec bdec, int64_t elem_bytes,
                                       int64_t multiprocessors = kDefaultMultiprocessors,
                                       int64_t budget = kEncodeScratchBytes) {
  TopkEncodePlan p;
  p.row_block = std::max<int64_t>(1, std::min(N, kEncodeMaxRowBlock));
  p.score_rows = p.row_block + (bdec == BDec::kFold ? 1 : 0);
  p.state_stride = next_pow2(k);
  // Latents per row of a chunk within the budget, at least one aligned tile.
  const int64_t fit =
      std::max(budget / (p.score_rows * kEncodeBytesPerScore) / kLatentAlign * kLatentAlign, kLatentAlign);

  // Splits: enough selection blocks per chunk, each split covering enough latents.
  const int64_t target = kSelectBlocksPerSM * std::max<int64_t>(1, multiprocessors);
  const int64_t min_split = round_up(std::max(kMinSplitLatents, 2 * p.state_stride), kLatentAlign);
  int64_t P = std::min({kMaxSplits, target / p.row_block, M / min_split});
  P = std::max<int64_t>(P, 1);

  int64_t seg;
  if (P == 1) {
    seg = fit;
    if (seg >= M) {
      seg = M;
    } else {  // same number of chunks, evened out (still aligned, still within budget)
      seg = std::min(M, round_up(ceil_div(M, ceil_div(M, seg)), kLatentAlign));
    }
  } else {
    seg = std::max(fit / P / kLatentAlign * kLatentAlign, kLatentAlign);
    const int64_t chunks = ceil_div(M, P * seg);
    seg = round_up(ceil_div(M, chunks * P), kLatentAlign);  // evened out, <= the seg above
    if (chunks == 1) P = ceil_div(M, seg);                  // one chunk: no split left empty
  }
  p.splits = P;
  p.split_latents = seg;
  p.latent_chunk = P * seg;
  p.row_blocks = ceil_div(N, p.row_block);
  p.latent_chunks = ceil_div(M, p.latent_chunk);
  p.score_buffers = p.steps() > 1 ? kEncodeScoreBuffers : 1;
  p.scores_bytes = p.score_buffers * p.score_rows * p.latent_chunk * 4;
  p.candidates_bytes = p.row_block * p.latent_chunk * 4;
  p.state_bytes = (2 * p.row_block * P * p.state_stride + p.row_block * P) * 8;
  p.bias_bytes = M * 4;
  p.x_bytes = bdec == BDec::kCentre ? p.row_block * d * 4 : bdec == BDec::kFold ? p.score_rows * d * elem_bytes : 0;
  return p;
}

// Latents that split s covers over the whole row, chunks of `chunk` = P * seg
// latents: seg in every full chunk (full = (M / chunk) * seg in all), and what
// is left of its segment in the last (rest = M % chunk latents in that chunk).
SSAE_HD int64_t split_latents_from(int64_t full, int64_t rest, int64_t seg, int64_t s) {
  const int64_t r = rest - s * seg;
  return full + (r < 0 ? 0 : r > seg ? seg : r);
}
SSAE_HD int64_t split_latents_total(int64_t M, int64_t chunk, int64_t seg, int64_t s) {
  return split_latents_from((M / chunk) * seg, M % chunk, seg, s);
}
// Keys the selection state of split s holds after the row's last chunk.
SSAE_HD int64_t split_keys(int64_t M, int64_t chunk, int64_t seg, int64_t s, int64_t k) {
  const int64_t n = split_latents_total(M, chunk, seg, s);
  return n < k ? n : k;
}
// Columns of split s in a chunk of `cols` latents (0 past the chunk's end).
SSAE_HD int64_t split_cols(int64_t cols, int64_t seg, int64_t s) {
  const int64_t rest = cols - s * seg;
  return rest < 0 ? 0 : rest > seg ? seg : rest;
}

// One GEMM chunk of the encode: rows [n0, n0 + rows) x latents [m0, m0 + cols).
struct EncodeStep {
  int64_t index = 0;   // position in the schedule (0, 1, ...)
  int64_t n0 = 0, rows = 0, m0 = 0, cols = 0;
  int64_t seen = 0;    // latents each split of these rows merged before: chunk index x seg
  int buffer = 0;      // score buffer the GEMM writes and the selection reads: index % score_buffers
  int parity = 0;      // selection state buffer read (written: parity ^ 1)
  bool first = false;  // first chunk of its row block
  bool last = false;   // last chunk of its row block (then the row block is finished)
};

inline EncodeStep encode_step(const TopkEncodePlan& p, int64_t N, int64_t M, int64_t index) {
  EncodeStep s;
  s.index = index;
  const int64_t rb = index / p.latent_chunks, c = index % p.latent_chunks;
  s.n0 = rb * p.row_block;
  s.rows = std::min(p.row_block, N - s.n0);
  s.m0 = c * p.latent_chunk;
  s.cols = std::min(p.latent_chunk, M - s.m0);
  s.seen = c * p.split_latents;
  s.buffer = int(index % p.score_buffers);
  s.parity = int(c & 1);
  s.first = c == 0;
  s.last = c == p.latent_chunks - 1;
  return s;
}

// The encode's order of work, shared by the ATen binding and the host tests:
// for each row block, every latent chunk in increasing order (the selection
// relies on it), then the row block's finish. The GEMM of step g + 1 is issued
// before the selection of step g, so that with two score buffers (and the GEMMs
// on a second stream) it runs while that selection does:
//   gemm(step)            fills score buffer step.buffer
//   select(step)          reads it, and selection state `parity`, writes `parity ^ 1`
//   finish(step, parity)  after the last chunk of a row block: merges its
//                         splits and sorts, from state buffer `parity`
// The binding orders gemm(g) after select(g - score_buffers) (the buffer's
// previous reader) and select(g) after gemm(g), with events.
template <class Gemm, class Select, class Finish>
void encode_pipeline(const TopkEncodePlan& p, int64_t N, int64_t M, Gemm&& gemm, Select&& select, Finish&& finish) {
  const int64_t steps = p.steps();
  if (steps < 1) return;
  gemm(encode_step(p, N, M, 0));
  for (int64_t g = 0; g < steps; ++g) {
    if (g + 1 < steps) gemm(encode_step(p, N, M, g + 1));
    const EncodeStep s = encode_step(p, N, M, g);
    select(s);
    if (s.last) finish(s, s.parity ^ 1);
  }
}

// Selection of one chunk: one block per (row, split); block b is row b / P, split b % P.
inline Launch select_launch(int64_t rows, int64_t splits = 1) { return Launch{rows * splits, kSelectThreads, 1}; }
// The merge of a row's splits and the final sort: one block per row.
inline Launch finish_launch(int64_t rows) { return Launch{rows, kSelectThreads, 1}; }

// Whether the final sort of a row runs in shared memory (else in a global state row).
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
