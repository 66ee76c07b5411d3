// Host-side tests of the CUDA launch arithmetic (csrc/kernels/cuda/launch.h):
// encode plans (chunk sizes, latent splits, scratch bytes, bounded memory),
// the encode's pipeline (double-buffered score chunks), the column / slot mapping of every kernel's blocks and threads,
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

void check_plan(int64_t N, int64_t M, int64_t d, int64_t k, BDec bdec, int64_t sms, int64_t budget) {
  ssae_test::context(ssae_test::str("plan N=", N, " M=", M, " d=", d, " k=", k, " bdec=", int(bdec), " SMs=", sms,
                                    " budget=", budget));
  const int64_t elem = bdec == BDec::kCentre ? 4 : 2;
  const TopkEncodePlan p = plan_topk_encode(N, M, d, k, bdec, elem, sms, budget);
  const int64_t R = p.row_block, P = p.splits, seg = p.split_latents, C = p.latent_chunk;
  CHECK(R >= 1 && R <= std::min<int64_t>(N, kEncodeMaxRowBlock));
  CHECK(p.row_blocks == ceil_div(N, R));
  CHECK((p.row_blocks - 1) * R < N && p.row_blocks * R >= N);
  // Splits: at least one, at most kMaxSplits, no more than make up the block target,
  // and each covering at least min_split latents unless there is one split.
  const int64_t min_split = round_up(std::max(kMinSplitLatents, 2 * next_pow2(k)), kLatentAlign);
  CHECK(P >= 1 && P <= kMaxSplits);
  CHECK_MSG(P == 1 || R * P <= kSelectBlocksPerSM * sms, "blocks ", R * P);
  CHECK_MSG(P == 1 || P * min_split <= M, "P ", P);
  CHECK(C == P * seg && seg >= 1);
  CHECK_MSG(P == 1 || seg % kLatentAlign == 0, "seg ", seg);
  CHECK_MSG(C <= M || P > 1, "chunk ", C);
  CHECK_MSG(std::min(C, M) == M || C % kLatentAlign == 0, "chunk ", C);
  CHECK(p.latent_chunks == ceil_div(M, C));
  CHECK((p.latent_chunks - 1) * C < M);
  // No split is empty in all: every split covers latents of the first chunk.
  CHECK_MSG((P - 1) * seg < M, "P ", P, " seg ", seg);
  int64_t covered = 0;
  for (int64_t s = 0; s < P; ++s) {
    CHECK(split_latents_total(M, C, seg, s) >= 1);
    covered += split_latents_total(M, C, seg, s);
  }
  CHECK_MSG(covered == M, "covered ", covered);
  CHECK(p.score_rows == R + (bdec == BDec::kFold ? 1 : 0));
  // Chunk scratch within budget whenever the budget holds one aligned tile per (row, split).
  const int64_t fit = budget / (p.score_rows * kEncodeBytesPerScore) / kLatentAlign * kLatentAlign;
  if (fit >= kLatentAlign * P) {
    CHECK_MSG(p.scores_bytes + p.candidates_bytes <= budget, "chunk bytes ", p.scores_bytes + p.candidates_bytes);
    if (P == 1) CHECK_MSG(p.latent_chunks == ceil_div(M, std::min(fit, M)), "chunks ", p.latent_chunks, " fit ", fit);
  }
  CHECK(p.score_buffers == (p.steps() > 1 ? 2 : 1));
  CHECK(p.scores_bytes == p.score_buffers * p.score_rows * C * 4);
  CHECK(p.candidates_bytes == R * C * 4);
  CHECK(p.state_stride >= k && p.state_stride < 2 * k + 1 && (p.state_stride & (p.state_stride - 1)) == 0);
  CHECK(p.state_bytes == (2 * R * P * p.state_stride + R * P) * 8);
  CHECK(p.bias_bytes == M * 4);
  CHECK(p.x_bytes == (bdec == BDec::kCentre ? R * d * 4 : bdec == BDec::kFold ? (R + 1) * d * 2 : 0));
  CHECK(p.total_bytes() == p.scores_bytes + p.candidates_bytes + p.state_bytes + p.bias_bytes + p.x_bytes);
  CHECK(grid_fits(select_launch(R, P)) && grid_fits(finish_launch(R)));
}

// The pipeline visits every (row block, latent chunk) once, chunks in
// increasing order within a row block, with alternating state buffers; it
// finishes each row block from the buffer its last chunk wrote; every score
// buffer is written by a GEMM, then read by its selection, then written again
// (never overwritten before it is read), and the GEMM of step g + 1 is issued
// before the selection of step g (the overlap).
void check_pipeline(int64_t N, int64_t M, int64_t k, int64_t sms, int64_t budget) {
  ssae_test::context(ssae_test::str("pipeline N=", N, " M=", M, " k=", k, " SMs=", sms, " budget=", budget));
  const TopkEncodePlan p = plan_topk_encode(N, M, 64, k, BDec::kNone, 2, sms, budget);
  std::vector<uint8_t> covered(size_t(N * M), 0);
  int64_t last_n0 = -1, expect_m0 = 0, selects = 0, gemms = 0;
  int expect_parity = 0;
  std::vector<int64_t> written(size_t(p.score_buffers), -1);  // step whose scores a buffer holds, -1: none/read
  std::vector<std::pair<int64_t, int64_t>> finished;
  encode_pipeline(
      p, N, M,
      [&](const EncodeStep& s) {
        CHECK(s.index == gemms++);
        CHECK(s.index <= selects + 1);  // at most one GEMM ahead of the selections
        CHECK(s.buffer >= 0 && s.buffer < p.score_buffers);
        CHECK_MSG(written[size_t(s.buffer)] == -1, "buffer ", s.buffer, " overwritten before step ",
                  written[size_t(s.buffer)], " read it");
        written[size_t(s.buffer)] = s.index;
      },
      [&](const EncodeStep& s) {
        CHECK(s.index == selects++);
        CHECK(gemms == std::min(s.index + 2, p.steps()));  // the next GEMM is already issued
        CHECK_MSG(written[size_t(s.buffer)] == s.index, "step ", s.index, " reads buffer ", s.buffer, " holding step ",
                  written[size_t(s.buffer)]);
        written[size_t(s.buffer)] = -1;
        if (s.n0 != last_n0) {
          CHECK_MSG(s.m0 == 0 && s.first, "row block ", s.n0, " starts at latent ", s.m0);
          last_n0 = s.n0;
          expect_m0 = 0;
          expect_parity = 0;
        }
        CHECK_MSG(s.m0 == expect_m0, "m0 ", s.m0, " expected ", expect_m0);
        CHECK(s.parity == expect_parity);
        CHECK(s.first == (s.m0 == 0) && s.last == (s.m0 + s.cols == M));
        CHECK(s.seen == (s.m0 / p.latent_chunk) * p.split_latents);
        CHECK(s.rows >= 1 && s.rows <= p.row_block && s.cols >= 1 && s.cols <= p.latent_chunk);
        for (int64_t r = s.n0; r < s.n0 + s.rows; ++r)
          for (int64_t c = s.m0; c < s.m0 + s.cols; ++c) ++covered[size_t(r * M + c)];
        // The splits of the chunk partition its columns.
        int64_t cols = 0;
        for (int64_t sp = 0; sp < p.splits; ++sp) cols += split_cols(s.cols, p.split_latents, sp);
        CHECK(cols == s.cols);
        expect_m0 = s.m0 + s.cols;
        expect_parity ^= 1;
      },
      [&](const EncodeStep& s, int parity) {
        CHECK(s.n0 == last_n0 && expect_m0 == M && s.last);
        CHECK(parity == int(p.latent_chunks % 2));
        finished.emplace_back(s.n0, s.rows);
      });
  CHECK(gemms == p.steps() && selects == p.steps());
  bool all_once = true;
  for (uint8_t c : covered) all_once &= c == 1;
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
  CHECK(select_launch(37, 5).blocks == 185 && finish_launch(37).blocks == 37);

  // The reference shape: chunk memory is fixed, whatever M; far below N x M x 4.
  {
    ssae_test::context("reference shape");
    const auto p = plan_topk_encode(2048, 24576, 768, 32, BDec::kNone, 2);
    CHECK(p.row_block == 2048 && p.splits == 1 && p.latent_chunk == 2560 && p.latent_chunks == 10);
    CHECK(p.score_buffers == 2 && p.scores_bytes + p.candidates_bytes <= kEncodeScratchBytes);
    CHECK(p.total_bytes() < 2048LL * 24576 * 4 / 2);
    const auto big = plan_topk_encode(2048, 262144, 768, 32, BDec::kNone, 2);
    CHECK(big.scores_bytes + big.candidates_bytes + big.state_bytes ==
          p.scores_bytes + p.candidates_bytes + p.state_bytes);
    CHECK(big.latent_chunks == 103);
    const auto centred = plan_topk_encode(2048, 24576, 768, 32, BDec::kCentre, 4);
    CHECK(centred.x_bytes == 2048LL * 768 * 4 && centred.score_rows == 2048);
    const auto folded = plan_topk_encode(2048, 24576, 768, 32, BDec::kFold, 2);  // b_dec: one more GEMM row
    CHECK(folded.score_rows == 2049 && folded.x_bytes == 2049LL * 768 * 2);
    CHECK(folded.scores_bytes + folded.candidates_bytes <= kEncodeScratchBytes);
  }
  // Few rows: the latents are split so that a chunk has ~16 selection blocks per SM.
  {
    ssae_test::context("small N");
    const auto one = plan_topk_encode(1, 1 << 20, 768, 32, BDec::kNone, 2, 132);
    CHECK(one.splits == kMaxSplits && one.latent_chunks == 1 && one.score_buffers == 1);
    const auto eight = plan_topk_encode(8, 65536, 768, 32, BDec::kFold, 2, 132);
    CHECK(eight.splits == 64 && eight.split_latents == 1024);
    const auto hundred = plan_topk_encode(100, 1 << 20, 768, 32, BDec::kNone, 2, 132);
    CHECK(hundred.splits == 21 && hundred.row_block * hundred.splits <= 16 * 132);
    const auto big_k = plan_topk_encode(8, 65536, 768, 2100, BDec::kNone, 2, 132);  // splits of >= 2 * 4096 latents
    CHECK(big_k.splits == 8 && big_k.split_latents == 8192);
    const auto narrow = plan_topk_encode(8, 1500, 768, 32, BDec::kNone, 2, 132);  // too few latents to split
    CHECK(narrow.splits == 1 && narrow.latent_chunk == 1500);
  }

  for (int64_t N : {1, 7, 100, 2047, 2048, 2049, 100000})
    for (int64_t M : {1, 255, 256, 257, 4096, 24577, 262144, 3000000})
      for (int64_t k : {int64_t(1), int64_t(32), std::min<int64_t>(M, 2100), M})
        for (BDec bdec : {BDec::kNone, BDec::kCentre, BDec::kFold}) {
          check_plan(N, M, 768, k, bdec, 132, kEncodeScratchBytes);
          check_plan(N, M, 33, k, bdec, 8, int64_t(1) << 20);  // small budgets: many chunks
          check_plan(N, M, 33, k, bdec, 1, 1000);              // below one aligned tile
        }

  for (int64_t N : {1, 5, 4099})
    for (int64_t M : {1, 300, 1000, 5000, 70000})
      for (int64_t sms : {1, 132}) {
        if (N * M > 30000000) continue;
        check_pipeline(N, M, std::min<int64_t>(M, 16), sms, int64_t(1) << 16);
        check_pipeline(N, M, std::min<int64_t>(M, 16), sms, kEncodeScratchBytes);
      }

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
