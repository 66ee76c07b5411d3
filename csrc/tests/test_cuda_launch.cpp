// Host-side tests of the CUDA launch arithmetic (csrc/kernels/cuda/launch.h):
// encode plans (chunk sizes, scratch bytes, bounded memory), the encode's
// schedule, the column / slot mapping of every kernel's blocks and threads,
// and latent_transpose's workspace layout. No GPU or CUDA toolkit needed.
#include "kernels/cuda/launch.h"
#include "kernels/cuda/tilt_state.h"

#include <cmath>
#include <cstdint>
#include <set>
#include <utility>
#include <vector>

#include "test_util.h"

using namespace ssae::cuda;

namespace {

void check_plan(int64_t N, int64_t M, int64_t d, int64_t k, bool split, int64_t elem, int64_t budget) {
  ssae_test::context(ssae_test::str("plan N=", N, " M=", M, " d=", d, " k=", k, " split=", split, " budget=", budget));
  const TopkEncodePlan p = plan_topk_encode(N, M, d, k, split, elem, budget);
  const int64_t per_elem = split ? 12 : 8;
  CHECK(p.row_block >= 1 && p.row_block <= std::min<int64_t>(N, kEncodeMaxRowBlock));
  CHECK(p.row_blocks == ceil_div(N, p.row_block));
  CHECK((p.row_blocks - 1) * p.row_block < N && p.row_blocks * p.row_block >= N);
  CHECK(p.latent_chunk >= 1 && p.latent_chunk <= M);
  CHECK_MSG(p.latent_chunk == M || p.latent_chunk % kLatentAlign == 0, "chunk ", p.latent_chunk);
  CHECK(p.latent_chunks == ceil_div(M, p.latent_chunk));
  CHECK((p.latent_chunks - 1) * p.latent_chunk < M);
  // Within budget whenever the budget holds one aligned tile per row; never
  // more chunks than the largest aligned chunk within budget would give.
  const int64_t fit = budget / (p.row_block * per_elem) / kLatentAlign * kLatentAlign;
  if (fit >= kLatentAlign) {
    CHECK_MSG(p.scores_bytes + p.candidates_bytes <= budget, "chunk bytes ", p.scores_bytes + p.candidates_bytes);
    CHECK_MSG(p.latent_chunks == ceil_div(M, std::min(fit, M)), "chunks ", p.latent_chunks, " fit ", fit);
  } else {
    CHECK(p.latent_chunk == std::min<int64_t>(M, kLatentAlign));
  }
  CHECK(p.score_rows == p.row_block * (split ? 2 : 1));
  CHECK(p.scores_bytes == p.score_rows * p.latent_chunk * 4);
  CHECK(p.candidates_bytes == p.row_block * p.latent_chunk * 4);
  CHECK(p.state_stride >= k && p.state_stride < 2 * k + 1 && (p.state_stride & (p.state_stride - 1)) == 0);
  CHECK(p.state_bytes == (2 * p.row_block * p.state_stride + p.row_block) * 8);
  CHECK(p.x_bytes == (split ? p.row_block * d * (4 + 2 * elem) : 0));
  CHECK(p.total_bytes() == p.scores_bytes + p.candidates_bytes + p.state_bytes + p.x_bytes);
}

// The schedule visits every (row block, latent chunk) once, chunks in
// increasing order within a row block, with alternating state buffers, and
// finishes each row block from the buffer its last chunk wrote.
void check_schedule(int64_t N, int64_t M, int64_t k) {
  ssae_test::context(ssae_test::str("schedule N=", N, " M=", M, " k=", k));
  TopkEncodePlan p = plan_topk_encode(N, M, 64, k, false, 4, int64_t(1) << 16);
  std::vector<int64_t> covered(size_t(N * M), 0);
  int64_t last_n0 = -1, expect_m0 = 0;
  int expect_parity = 0;
  std::vector<std::pair<int64_t, int64_t>> finished;
  encode_schedule(
      p, N, M,
      [&](int64_t n0, int64_t rows, int64_t m0, int64_t cols, int parity) {
        if (n0 != last_n0) {
          CHECK_MSG(m0 == 0, "row block ", n0, " starts at latent ", m0);
          last_n0 = n0;
          expect_m0 = 0;
          expect_parity = 0;
        }
        CHECK_MSG(m0 == expect_m0, "m0 ", m0, " expected ", expect_m0);
        CHECK(parity == expect_parity);
        CHECK(rows >= 1 && rows <= p.row_block && cols >= 1 && cols <= p.latent_chunk);
        for (int64_t r = n0; r < n0 + rows; ++r)
          for (int64_t c = m0; c < m0 + cols; ++c) ++covered[size_t(r * M + c)];
        expect_m0 = m0 + cols;
        expect_parity ^= 1;
      },
      [&](int64_t n0, int64_t rows, int parity) {
        CHECK(n0 == last_n0 && expect_m0 == M);
        CHECK(parity == int(p.latent_chunks % 2));
        finished.emplace_back(n0, rows);
      });
  bool all_once = true;
  for (int64_t c : covered) all_once &= c == 1;
  CHECK(all_once);
  int64_t rows_finished = 0;
  for (auto& f : finished) rows_finished += f.second;
  CHECK(rows_finished == N);
  CHECK(int64_t(finished.size()) == p.row_blocks);
}

// Every column of every row is owned by exactly one (block, thread, i).
void check_row_tiles(int64_t rows, int64_t d) {
  ssae_test::context(ssae_test::str("row tiles rows=", rows, " d=", d));
  const Launch l = row_tiles_launch(rows, d);
  CHECK(l.threads % 32 == 0 && l.threads >= 32 && l.threads <= kMaxRowThreads);
  CHECK(l.tiles >= 1 && l.blocks == rows * l.tiles);
  CHECK(grid_fits(l));
  if (d <= kMaxRowThreads * kColsPerThread) CHECK(l.tiles == 1);
  // no idle warp in a one-tile launch
  if (l.tiles == 1 && d > 0) CHECK(int64_t(l.threads - 32) * kColsPerThread < d);
  std::vector<int> owned(size_t(rows * d), 0);
  for (int64_t b = 0; b < l.blocks; ++b) {
    const int64_t row = tile_row(b, l.tiles), first = tile_first_column(b, l.tiles, l.threads);
    CHECK(row >= 0 && row < rows);
    for (int t = 0; t < l.threads; ++t)
      for (int i = 0; i < kColsPerThread; ++i) {
        const int64_t c = tile_column(first, i, t, l.threads);
        if (c < d) ++owned[size_t(row * d + c)];
      }
  }
  bool once = true;
  for (int o : owned) once &= o == 1;
  CHECK(once);
  // Coalescing: consecutive threads of a warp own consecutive columns.
  CHECK(tile_column(0, 1, 5, l.threads) - tile_column(0, 1, 4, l.threads) == 1);
}

void check_sampled_dot(int64_t rows, int64_t k) {
  ssae_test::context(ssae_test::str("sampled_dot rows=", rows, " k=", k));
  const Launch l = sampled_dot_launch(rows, k);
  CHECK(l.threads == 32 * kDotWarps && l.blocks == rows * l.tiles && grid_fits(l));
  std::vector<int> owned(size_t(rows * k), 0);
  for (int64_t b = 0; b < l.blocks; ++b)
    for (int w = 0; w < kDotWarps; ++w) {
      const int64_t n = tile_row(b, l.tiles), j = dot_slot(b, l.tiles, w);
      CHECK(n >= 0 && n < rows);
      if (j < k) ++owned[size_t(n * k + j)];
    }
  bool once = true;
  for (int o : owned) once &= o == 1;
  CHECK(once);
}

void check_transpose(int64_t count, int64_t M, int64_t temp) {
  ssae_test::context(ssae_test::str("transpose count=", count, " M=", M, " temp=", temp));
  const int bits = transpose_sort_bits(M);
  // Keys are latents in [0, M) and the marker M for invalid entries: all must fit.
  CHECK(bits >= 1 && bits <= 32);
  CHECK((uint64_t(1) << bits) > uint64_t(M));
  CHECK(M == 0 || (uint64_t(1) << (bits - 1)) <= uint64_t(M));
  const TransposeWorkspace w = transpose_workspace(count, temp);
  // Regions in order, aligned, large enough, not overlapping.
  for (int64_t off : {w.keys_in, w.keys_out, w.ids, w.sort_temp, w.total}) CHECK(off % kWorkspaceAlign == 0);
  CHECK(w.keys_out - w.keys_in >= count * 4);
  CHECK(w.ids - w.keys_out >= count * 4);
  CHECK(w.sort_temp - w.ids >= count * 8);
  CHECK(w.total - w.sort_temp >= temp);
  CHECK(w.total < count * 16 + temp + 4 * kWorkspaceAlign);
  const Launch e = elementwise_launch(M + 1);
  CHECK(e.blocks * e.threads >= M + 1 && (e.blocks - 1) * e.threads < M + 1);
}


void check_tilt_plan(int64_t n, int64_t G, int64_t budget) {
  ssae_test::context(ssae_test::str("tilt plan n=", n, " G=", G, " budget=", budget));
  const TiltPlan p = plan_tilted_group_stats(n, G, budget);
  CHECK(p.slots >= 32 && p.slots % 32 == 0 && p.slots <= kTiltMaxSlots);
  CHECK(p.pass1.threads >= 32 && p.pass1.threads <= kTiltThreads && p.pass1.threads % 32 == 0);
  CHECK(p.pass1.blocks * p.pass1.threads == p.slots && grid_fits(p.pass1));
  CHECK(p.merge.blocks == G && p.merge.threads == kTiltMergeThreads);
  // Enough losses per slot to pay for the merge, unless that is below one warp.
  CHECK_MSG(p.slots == 32 || p.slots <= ceil_div(n, kTiltMinPerSlot), "slots ", p.slots);
  // Bounded workspace: within budget, or one warp of slots per group when G alone exceeds it.
  const int64_t states = G * p.slots * kTiltStateBytes;
  CHECK_MSG(states <= budget || p.slots == 32, "states ", states);
  // Regions in order, aligned, large enough, not overlapping.
  CHECK(p.anchor == 0 && p.s % kWorkspaceAlign == 0 && p.count % kWorkspaceAlign == 0 && p.flag % kWorkspaceAlign == 0);
  CHECK(p.s >= G * p.slots * 8 && p.count - p.s >= G * p.slots * 8 && p.flag - p.count >= G * p.slots * 8);
  CHECK(p.total >= p.flag + 4);
  CHECK(tilt_entry(G - 1, p.slots - 1, p.slots) == G * p.slots - 1);
}

// The two CUDA passes of tilted_group_stats run on the host with the plan's
// slots and the merge kernel's order, against a long double evaluation.
void check_tilt_emulated(int64_t n, int64_t G, double t, uint64_t seed, bool equal_losses) {
  ssae_test::context(ssae_test::str("tilt emulated n=", n, " G=", G, " t=", t, " equal=", equal_losses));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(0.0, 3.0);
  std::vector<float> losses(size_t(n), 1.25f);
  std::vector<int64_t> groups(size_t(n), 0);
  for (int64_t i = 0; i < n; ++i) {
    if (!equal_losses) losses[size_t(i)] = float(dist(rng));
    if (G > 1) groups[size_t(i)] = int64_t(rng() % uint64_t(G));
  }
  const TiltPlan p = plan_tilted_group_stats(n, G);
  std::vector<TiltState> states(size_t(G * p.slots), tilt_empty());
  for (int64_t i = 0; i < n; ++i)
    tilt_add(states[size_t(tilt_entry(groups[size_t(i)], tilt_slot(i, p.slots), p.slots))], losses[size_t(i)], t);
  for (int64_t g = 0; g < G; ++g) {
    std::vector<TiltState> thread(kTiltMergeThreads, tilt_empty());
    for (int tid = 0; tid < kTiltMergeThreads; ++tid)
      for (int64_t j = tid; j < p.slots; j += kTiltMergeThreads)
        tilt_merge(thread[size_t(tid)], states[size_t(tilt_entry(g, j, p.slots))], t);
    for (int half = kTiltMergeThreads / 2; half > 0; half /= 2)
      for (int tid = 0; tid < half; ++tid) tilt_merge(thread[size_t(tid)], thread[size_t(tid + half)], t);
    double anchor = 0, log_mean = 0;
    int64_t count = 0;
    tilt_finish(thread[0], t, &anchor, &log_mean, &count);

    long double sum = 0, top = -INFINITY;
    double best = 0;
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i)
      if (groups[size_t(i)] == g && (long double)t * losses[size_t(i)] > top) {
        top = (long double)t * losses[size_t(i)];
        best = losses[size_t(i)];
      }
    for (int64_t i = 0; i < n; ++i) c += groups[size_t(i)] == g;
    CHECK_MSG(count == c, "count ", count, " vs ", c);
    if (c == 0) { CHECK(anchor == 0 && log_mean == 0); continue; }
    long double risk;
    if (t == 0) {
      for (int64_t i = 0; i < n; ++i) if (groups[size_t(i)] == g) sum += losses[size_t(i)];
      risk = sum / c;
      CHECK(log_mean == 0);
    } else {
      for (int64_t i = 0; i < n; ++i)
        if (groups[size_t(i)] == g) sum += std::expm1l((long double)t * losses[size_t(i)] - top);
      risk = top / t + std::log1pl(sum / c) / t;
      CHECK_MSG(anchor == best, "anchor ", anchor, " vs ", best);
    }
    const double got = t == 0 ? anchor : anchor + log_mean / t;
    CHECK_MSG(std::fabs(got - double(risk)) <= 1e-12 * std::fabs(double(risk)) + 1e-300, "risk ", got, " vs ",
              double(risk));
    if (equal_losses) CHECK_MSG(std::fabs(got - 1.25) <= 1e-14, "equal losses gave ", got);
  }
}

}  // namespace

int main() {
  ssae_test::context("helpers");
  CHECK(ceil_div(7, 2) == 4 && ceil_div(8, 2) == 4 && ceil_div(0, 3) == 0);
  CHECK(round_up(257, 256) == 512 && round_up(256, 256) == 256);
  CHECK(next_pow2(1) == 1 && next_pow2(2) == 2 && next_pow2(3) == 4 && next_pow2(2049) == 4096);
  CHECK(bit_width(0) == 0 && bit_width(1) == 1 && bit_width(255) == 8 && bit_width(256) == 9);
  CHECK(bit_width(uint64_t(1) << 40) == 41);
  CHECK(grid_fits(Launch{kMaxGrid, 256, 1}) && !grid_fits(Launch{kMaxGrid + 1, 256, 1}) && !grid_fits(Launch{0, 256, 1}));
  CHECK(sort_in_shared(kSortSharedKeys) && !sort_in_shared(2 * kSortSharedKeys));
  CHECK(select_launch(37).blocks == 37 && select_launch(37).threads == kRadixBins);

  // The reference shape: chunk memory is fixed, whatever M; far below N x M x 4.
  {
    ssae_test::context("reference shape");
    const auto p = plan_topk_encode(2048, 24576, 768, 32, false, 4);
    CHECK(p.row_block == 2048 && p.latent_chunk == 4096 && p.latent_chunks == 6);
    CHECK(p.scores_bytes + p.candidates_bytes == kEncodeScratchBytes);
    CHECK(p.total_bytes() < 2048LL * 24576 * 4 / 2);
    const auto big = plan_topk_encode(2048, 262144, 768, 32, false, 4);
    CHECK(big.total_bytes() == p.total_bytes());
    CHECK(big.latent_chunks == 64);
    const auto split = plan_topk_encode(2048, 24576, 768, 32, true, 2);
    CHECK(split.scores_bytes + split.candidates_bytes <= kEncodeScratchBytes);
    CHECK(split.score_rows == 4096 && split.x_bytes == 2048LL * 768 * 8);
  }

  for (int64_t N : {1, 7, 2047, 2048, 2049, 100000})
    for (int64_t M : {1, 255, 256, 257, 4096, 24577, 262144})
      for (int64_t k : {int64_t(1), int64_t(32), M})
        for (bool split : {false, true}) {
          check_plan(N, M, 768, k, split, split ? 2 : 4, kEncodeScratchBytes);
          check_plan(N, M, 33, k, split, 2, int64_t(1) << 20);  // small budgets: many chunks
          check_plan(N, M, 33, k, split, 2, 1000);             // below one aligned tile
        }

  for (int64_t N : {1, 5, 4099})
    for (int64_t M : {1, 300, 1000, 5000})
      check_schedule(N, M, std::min<int64_t>(M, 16));

  for (int64_t rows : {1, 3})
    for (int64_t d : {0, 1, 31, 32, 127, 128, 129, 768, 1023, 1024, 1025, 4096, 5000}) check_row_tiles(rows, d);

  for (int64_t rows : {1, 4})
    for (int64_t k : {1, 7, 8, 9, 32, 1000}) check_sampled_dot(rows, k);

  for (int64_t count : {0, 1, 65536, 1000003})
    for (int64_t M : {int64_t(1), int64_t(2), int64_t(255), int64_t(256), int64_t(24576), int64_t(262144), int64_t(1) << 31}) check_transpose(count, M, 12345);

  for (int64_t n : {int64_t(1), int64_t(31), int64_t(4097), int64_t(100003), int64_t(1) << 24})
    for (int64_t G : {int64_t(1), int64_t(2), int64_t(1000), int64_t(50000), int64_t(3000000)}) {
      check_tilt_plan(n, G, kTiltScratchBytes);
      check_tilt_plan(n, G, 1000);
    }
  for (double t : {-1e9, -10.0, -1.0, -1e-6, 0.0, 1e-6, 1.0, 500.0, 1e9})
    for (int64_t n : {1, 7, 5000, 70001})
      for (int64_t G : {1, 3, 257}) check_tilt_emulated(n, G, t, uint64_t(n * 31 + G), false);
  for (double t : {-1e9, 1e-6, 500.0}) check_tilt_emulated(9999, 1, t, 1, true);

  for (int64_t rows : {1, 8, 9, 100000}) {
    const Launch l = row_sq_error_launch(rows);
    CHECK(l.threads == 32 * kSqRowsPerBlock && l.blocks * kSqRowsPerBlock >= rows &&
          (l.blocks - 1) * kSqRowsPerBlock < rows);
    for (int64_t d : {0, 1, 1024, 1025, 5000}) {
      const Launch dl = decode_sq_error_launch(rows, d);
      const Launch tl = row_tiles_launch(1, d);
      CHECK(dl.blocks == rows && dl.threads == tl.threads && dl.tiles == tl.tiles);
      CHECK(dl.tiles * dl.threads * kColsPerThread >= d);
    }
  }

  // sparse_decode_residual: the launch of sparse_decode_sq_error, and the kernel's
  // loop (thread t takes staged slots t, t + threads, ... of each round) finishes
  // every slot j of a row in one thread, the same in every column tile.
  for (int64_t d : {1, 768, 1025, 5000}) {
    const Launch rl = decode_residual_launch(7, d), sl = decode_sq_error_launch(7, d);
    CHECK(rl.blocks == sl.blocks && rl.threads == sl.threads && rl.tiles == sl.tiles);
    for (int64_t k : {1, 32, 255, 256, 257, 1000}) {
      ssae_test::context(ssae_test::str("residual dots d=", d, " k=", k));
      std::vector<int> owner(size_t(k), -1), count(size_t(k), 0);
      for (int64_t j0 = 0; j0 < k; j0 += kStageEntries) {
        const int64_t nj = std::min<int64_t>(kStageEntries, k - j0);
        for (int t = 0; t < rl.threads; ++t)
          for (int64_t j = t; j < nj; j += rl.threads) {
            ++count[size_t(j0 + j)];
            owner[size_t(j0 + j)] = t;
          }
      }
      bool ok = true;
      for (int64_t j = 0; j < k; ++j) ok &= count[size_t(j)] == 1 && owner[size_t(j)] == residual_dot_thread(j, rl.threads);
      CHECK(ok);
    }
  }
  CHECK(kResidualSharedBytes <= 48 * 1024);

  return ssae_test::finish("test_cuda_launch");
}
