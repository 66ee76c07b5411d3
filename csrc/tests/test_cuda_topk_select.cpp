// The CUDA encode's selection (csrc/kernels/cuda/topk_select.h) run on the
// host: the block algorithms are executed by an emulated block, driven by the
// same encode_pipeline() as the ATen binding (double-buffered score chunks,
// latent splits, the final merge of the splits), with the "GEMM" copying
// precomputed scores. Results must equal a stable descending sort of each full
// row (NaN first, ties to the lower index); with per-latent thresholds
// (threshold_encode), of the scores above them, padded with 0 / 0, and their
// counts. Also checks the key encoding.
//
// Thread order: every case runs with the block's threads in forward order, in
// reverse, and in fresh random orders drawn for every phase (between two
// barriers) from several seeds; the blocks of a grid also run in random order.
// The answer must be the same exact one each time: the selection may not
// depend on the order in which threads (or blocks) run.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cuda/launch.h"
#include "kernels/cuda/topk_select.h"
#include "test_util.h"

using namespace ssae::cuda;

namespace {

std::mt19937 rng(2024);

int64_t uniform_int(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

// Thread (and block) orders: forward, reverse, then random with these seeds.
constexpr uint32_t kOrderSeeds[] = {1, 7, 2024, 31337};
constexpr int kOrders = 2 + int(sizeof(kOrderSeeds) / sizeof(kOrderSeeds[0]));

// One thread block, emulated: `each` runs f for every thread id, in forward or
// reverse order, or in a new random permutation each time (each call is one
// phase between two barriers). `append` hands out slots in call order, so
// a random order also scrambles where kept entries land.
struct HostExec {
  int mode;
  std::mt19937 order_rng;
  std::vector<int> order;
  int64_t phases = 0;
  explicit HostExec(int mode_) : mode(mode_), order_rng(mode_ >= 2 ? kOrderSeeds[mode_ - 2] : 0u), order(kSelectThreads) {
    std::iota(order.begin(), order.end(), 0);
    if (mode == 1) std::reverse(order.begin(), order.end());
  }
  int threads() const { return int(order.size()); }
  template <class F>
  void each(F&& f) {
    if (mode >= 2) std::shuffle(order.begin(), order.end(), order_rng);
    ++phases;
    for (int t : order) f(t);
  }
  // A counter read before any thread reset it (a missing barrier) holds the
  // poison of SelectShared: reported, and no slot handed out past the buffers.
  uint32_t append(uint32_t* counter, bool keep) {
    if (!keep) return 0u;
    if (*counter >= kMaxSlots) {
      ssae_test::fail(__FILE__, __LINE__, ssae_test::str("slot counter at ", *counter, ": read before its reset"));
      return 0u;
    }
    return (*counter)++;
  }
  static constexpr uint32_t kMaxSlots = uint32_t(1) << 24;  // more than any buffer of these tests
  void atomic_add(uint32_t* p, uint32_t v) { *p += v; }
  void atomic_min(topk_key* p, topk_key v) { *p = std::min(*p, v); }
  // The order in which the blocks of a grid run.
  std::vector<int64_t> block_order(int64_t blocks) {
    std::vector<int64_t> b(static_cast<size_t>(blocks));
    std::iota(b.begin(), b.end(), 0);
    if (mode == 1) std::reverse(b.begin(), b.end());
    if (mode >= 2) std::shuffle(b.begin(), b.end(), order_rng);
    return b;
  }
};

enum class Fill { kNormal, kSmallInts, kNegative, kAscending, kEqual, kAdjacent };

struct Problem {
  int64_t N, M, k;
  std::vector<float> gemm, bias;  // "GEMM outputs" x @ W.T [N, M] and b_enc [M]
  std::vector<float> wb;          // with b_dec folded: the GEMM's extra row W @ b_dec [M], else empty
  std::vector<float> threshold;   // threshold_encode: per-latent thresholds [M]; empty for topk_encode
};

Problem make_problem(int64_t N, int64_t M, int64_t k, Fill fill, double nan_rate, double inf_rate,
                     bool fold = false) {
  Problem p{N, M, k, std::vector<float>(size_t(N * M)), std::vector<float>(size_t(M)), {}, {}};
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<double> u01;
  for (int64_t i = 0; i < N * M; ++i) {
    float v = 0;
    switch (fill) {
      case Fill::kNormal: v = normal(rng); break;
      case Fill::kSmallInts: v = float(uniform_int(-2, 2)); break;
      case Fill::kNegative: v = -1.0f - std::fabs(normal(rng)); break;
      case Fill::kAscending: v = float(i % M); break;
      case Fill::kEqual: v = (uniform_int(0, 1) ? 0.0f : -0.0f); break;
      case Fill::kAdjacent: v = bits_float(float_bits(1.0f) + uint32_t(uniform_int(0, 6))); break;  // 1 ulp apart
    }
    const double r = u01(rng);
    if (r < nan_rate) v = std::numeric_limits<float>::quiet_NaN();
    else if (r < nan_rate + inf_rate) v = uniform_int(0, 1) ? INFINITY : -INFINITY;
    p.gemm[size_t(i)] = v;
  }
  for (auto& b : p.bias) b = (fill == Fill::kNormal) ? 0.25f * float(uniform_int(-2, 2)) : 0.0f;
  if (fold) {  // W @ b_dec: exact small values for the tie-heavy fills, so ties stay ties
    p.wb.resize(size_t(M));
    for (auto& w : p.wb) w = (fill == Fill::kNormal) ? 0.5f * normal(rng) : float(uniform_int(-1, 1));
  }
  return p;
}

// The bias the selection sees: b_enc, or b_enc - W @ b_dec folded (the kernel's folded_bias).
float bias_of(const Problem& p, int64_t m) {
  return p.wb.empty() ? p.bias[size_t(m)] : folded_bias(p.bias[size_t(m)], p.wb[size_t(m)]);
}

float pre_activation(const Problem& p, int64_t n, int64_t m) {
  return p.gemm[size_t(n * p.M + m)] + bias_of(p, m);  // the same float operations as chunk_key
}

// A plan with the given row block, splits and split width (what plan_topk_encode
// derives from the device and budget); everything else as the binding's.
TopkEncodePlan make_plan(int64_t N, int64_t M, int64_t k, int64_t row_block, int64_t splits, int64_t seg,
                         bool fold) {
  TopkEncodePlan p = plan_topk_encode(N, M, 16, k, fold ? BDec::kFold : BDec::kNone, 2);
  p.row_block = row_block;
  p.score_rows = row_block + (fold ? 1 : 0);
  p.splits = splits;
  p.split_latents = seg;
  p.latent_chunk = splits * seg;
  p.row_blocks = ceil_div(N, row_block);
  p.latent_chunks = ceil_div(M, p.latent_chunk);
  p.score_buffers = p.steps() > 1 ? kEncodeScoreBuffers : 1;
  return p;
}

// Emulates the binding's topk_encode (threshold_encode when p.threshold is set) with a chosen plan; returns
// values (float), indices and (threshold_encode) the per-row counts of scores above threshold.
void emulate(const Problem& p, const TopkEncodePlan& plan, int order_mode, std::vector<float>& values,
             std::vector<int64_t>& indices, std::vector<int64_t>& counts) {
  const int64_t R = plan.row_block, C = plan.latent_chunk, P = plan.splits, seg = plan.split_latents,
                S = plan.state_stride;
  const topk_key garbage = 0xdeadbeefcafef00dULL;  // uninitialised scratch must never matter
  std::vector<topk_key> state[2] = {std::vector<topk_key>(size_t(R * P * S), garbage),
                                    std::vector<topk_key>(size_t(R * P * S), garbage)};
  std::vector<topk_key> row_min(size_t(R * P), garbage);
  std::vector<uint32_t> cand(size_t(R * C), 0xabababab);
  const bool fold = !p.wb.empty();
  CHECK(plan.score_rows == R + (fold ? 1 : 0));
  std::vector<std::vector<float>> scores(
      size_t(plan.score_buffers), std::vector<float>(size_t(plan.score_rows * C), std::numeric_limits<float>::quiet_NaN()));
  values.assign(size_t(p.N * p.k), -1.0f);
  indices.assign(size_t(p.N * p.k), -1);
  const bool raw = !p.threshold.empty();
  std::vector<uint32_t> above(size_t(p.N * P), 0u);  // the binding zeroes it once per call
  HostExec ex(order_mode);
  int64_t expect_step = 0;

  encode_pipeline(
      plan, p.N, p.M,
      [&](const EncodeStep& s) {
        // The "GEMM" writes a [rows, cols] tile (ld = cols) like at::mm_out into a contiguous view.
        CHECK(s.buffer >= 0 && s.buffer < plan.score_buffers);
        // With the fold, the GEMM's extra last row is W_chunk @ b_dec, which
        // fold_chunk_bias then turns into the chunk's bias in place.
        std::vector<float>& out = scores[size_t(s.buffer)];
        for (int64_t r = 0; r < s.rows; ++r)
          for (int64_t c = 0; c < s.cols; ++c) out[size_t(r * s.cols + c)] = p.gemm[size_t((s.n0 + r) * p.M + s.m0 + c)];
        if (fold) {
          float* row = out.data() + s.rows * s.cols;
          for (int64_t c = 0; c < s.cols; ++c) row[c] = p.wb[size_t(s.m0 + c)];
          for (int64_t c = 0; c < s.cols; ++c) row[c] = folded_bias(p.bias[size_t(s.m0 + c)], row[c]);
        }
      },
      [&](const EncodeStep& s) {
        CHECK(s.index == expect_step++);
        const float* tile = scores[size_t(s.buffer)].data();
        const float* chunk_bias = fold ? tile + s.rows * s.cols : p.bias.data() + s.m0;
        for (int64_t b : ex.block_order(s.rows * P)) {  // the blocks of select_chunk_kernel
          const int64_t r = b / P, sp = b % P, first = sp * seg;
          SelectShared sh;
          std::memset(&sh, 0x5a, sizeof(sh));
          const SelectRow row{tile + r * s.cols + first,
                              chunk_bias + first,
                              split_cols(s.cols, seg, sp),
                              s.m0 + first,
                              s.seen,
                              p.k,
                              state[s.parity].data() + b * S,
                              state[s.parity ^ 1].data() + b * S,
                              row_min.data() + b,
                              cand.data() + r * C + first,
                              raw ? p.threshold.data() + s.m0 + first : nullptr,
                              raw ? above.data() + s.n0 * P + b : nullptr};
          select_chunk(ex, sh, row);
        }
      },
      [&](const EncodeStep& s, int parity) {
        for (int64_t r : ex.block_order(s.rows)) {  // the blocks of finish_kernel
          std::vector<topk_key> shared_buf(size_t(kSortSharedKeys), garbage);
          topk_key* buf;
          const auto store = [&](int64_t j, topk_key key) {  // as finish_kernel's
            const float v = key_score(key);
            const bool below = raw && is_below(key);
            values[size_t((s.n0 + r) * p.k + j)] = below ? 0.0f : raw ? v : v < 0.0f ? 0.0f : v;
            indices[size_t((s.n0 + r) * p.k + j)] = below ? 0 : key_latent(key);
          };
          if (P == 1) {
            topk_key* srow = state[parity].data() + r * S;
            buf = sort_in_shared(S) ? shared_buf.data() : srow;
            finish_row(ex, buf, srow, p.k, S, store);
          } else {
            SelectShared sh;
            std::memset(&sh, 0x5a, sizeof(sh));
            topk_key merged_min = garbage;
            buf = sort_in_shared(S) ? shared_buf.data() : state[parity ^ 1].data() + r * S;
            merge_splits(ex, sh, MergeRow{state[parity].data() + r * P * S, P, S, p.k, p.M, C, seg, buf, &merged_min});
            finish_row(ex, buf, buf, p.k, S, store);
          }
        }
      });
  CHECK(expect_step == plan.steps());
  CHECK(ex.phases > 0);
  counts.assign(size_t(p.N), 0);
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t sp = 0; sp < P; ++sp) counts[size_t(n)] += above[size_t(n * P + sp)];
}

void run_plan(const Problem& p, const TopkEncodePlan& plan, const std::string& what) {
  const int64_t N = p.N, M = p.M, k = p.k;
  for (int mode = 0; mode < kOrders; ++mode) {
    ssae_test::context(ssae_test::str(what, " R=", plan.row_block, " P=", plan.splits, " seg=", plan.split_latents,
                                      " chunks=", plan.latent_chunks, " order=",
                                      mode == 0 ? "forward" : mode == 1 ? "reverse" : "random seed ",
                                      mode >= 2 ? int64_t(kOrderSeeds[mode - 2]) : int64_t(-1)));
    std::vector<float> values;
    std::vector<int64_t> indices, counts;
    emulate(p, plan, mode, values, indices, counts);
    const bool raw = !p.threshold.empty();

    int64_t bad_rows = 0;
    for (int64_t n = 0; n < N; ++n) {
      std::vector<int64_t> rank(static_cast<size_t>(M));
      std::iota(rank.begin(), rank.end(), 0);
      std::vector<float> pre(static_cast<size_t>(M));
      for (int64_t m = 0; m < M; ++m) pre[size_t(m)] = pre_activation(p, n, m);
      if (raw) {  // threshold_encode: only scores above their thresholds (never NaN)
        rank.erase(std::remove_if(rank.begin(), rank.end(),
                                  [&](int64_t m) { return !(pre[size_t(m)] > p.threshold[size_t(m)]); }),
                   rank.end());
        CHECK_MSG(counts[size_t(n)] == int64_t(rank.size()), "row ", n, ": count ", counts[size_t(n)], ", want ",
                  rank.size());
      }
      std::stable_sort(rank.begin(), rank.end(), [&](int64_t a, int64_t b) {
        const bool an = std::isnan(pre[size_t(a)]), bn = std::isnan(pre[size_t(b)]);
        if (an || bn) return an && !bn;
        return pre[size_t(a)] > pre[size_t(b)];
      });
      for (int64_t j = 0; j < k; ++j) {
        const bool filled = j < int64_t(rank.size());  // always, for topk_encode
        const float want = filled ? pre[size_t(rank[size_t(j)])] : 0.0f;
        const float want_v = raw ? want : want < 0.0f ? 0.0f : want;
        const int64_t want_i = filled ? rank[size_t(j)] : 0;
        const float got_v = values[size_t(n * k + j)];
        const bool v_ok = std::isnan(want_v) ? std::isnan(got_v) : got_v == want_v;
        if (indices[size_t(n * k + j)] != want_i || !v_ok) {
          CHECK_MSG(false, "row ", n, " slot ", j, ": got ", indices[size_t(n * k + j)], " (", got_v, "), want ",
                    want_i, " (", want_v, ")");
          ++bad_rows;
          break;
        }
      }
    }
    CHECK_MSG(bad_rows == 0, bad_rows, " rows wrong");
  }
}

// A problem run under the given row block, splits and split width (fold: the
// bias comes from the GEMM's extra row, b_dec folded in).
void run_case(int64_t N, int64_t M, int64_t k, Fill fill, double nan_rate, double inf_rate, int64_t row_block,
              int64_t splits, int64_t seg, bool fold = false) {
  const Problem p = make_problem(N, M, k, fill, nan_rate, inf_rate, fold);
  run_plan(p, make_plan(N, M, k, row_block, splits, seg, fold),
           ssae_test::str("N=", N, " M=", M, " k=", k, " fill=", int(fill), " nan=", nan_rate, " inf=", inf_rate,
                          " fold=", fold));
}

// threshold_encode's problems: run_case's with per-latent thresholds drawn in [lo, hi] (lo = hi: one for all).
void run_threshold_case(int64_t N, int64_t M, int64_t k, Fill fill, double nan_rate, float lo, float hi,
                        int64_t row_block, int64_t splits, int64_t seg, bool fold = false) {
  Problem p = make_problem(N, M, k, fill, nan_rate, 0.0, fold);
  std::uniform_real_distribution<float> draw(lo, hi);
  p.threshold.resize(size_t(M));
  for (auto& t : p.threshold) t = lo == hi ? lo : draw(rng);
  run_plan(p, make_plan(N, M, k, row_block, splits, seg, fold),
           ssae_test::str("threshold N=", N, " M=", M, " max_k=", k, " fill=", int(fill), " nan=", nan_rate,
                          " thresholds in [", lo, ", ", hi, "] fold=", fold));
}

// A problem run under plan_topk_encode's own plan for a device of
// `multiprocessors` SMs and a scratch budget.
void run_planned(int64_t N, int64_t M, int64_t k, Fill fill, int64_t multiprocessors, int64_t budget,
                 bool fold = false) {
  const Problem p = make_problem(N, M, k, fill, 0.0, 0.0, fold);
  const TopkEncodePlan plan =
      plan_topk_encode(N, M, 16, k, fold ? BDec::kFold : BDec::kNone, 2, multiprocessors, budget);
  run_plan(p, plan, ssae_test::str("planned N=", N, " M=", M, " k=", k, " SMs=", multiprocessors, " budget=", budget,
                                   " fold=", fold));
}

void check_keys() {
  ssae_test::context("key encoding");
  // order_bits is monotone and maps -0 and +0 together, NaN above everything.
  std::vector<float> specials = {-INFINITY, -3.4e38f, -1.0f, -1e-45f, -0.0f, 0.0f, 1e-45f, 1e-38f, 1.0f,
                                 3.4e38f, INFINITY};
  for (size_t i = 0; i + 1 < specials.size(); ++i) {
    const bool equal = specials[i] == specials[i + 1];
    CHECK_MSG(equal ? order_bits(specials[i]) == order_bits(specials[i + 1])
                    : order_bits(specials[i]) < order_bits(specials[i + 1]),
              specials[i], " vs ", specials[i + 1]);
  }
  CHECK(order_bits(std::numeric_limits<float>::quiet_NaN()) == 0xffffffffu);
  CHECK(order_bits(-std::numeric_limits<float>::quiet_NaN()) == 0xffffffffu);
  CHECK(order_bits(bits_float(0x7f800001u)) == 0xffffffffu);  // signalling NaN
  CHECK(order_bits(-INFINITY) > 0);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {
    const float a = bits_float(bits(rng)), b = bits_float(bits(rng));
    if (std::isnan(a) || std::isnan(b)) continue;
    CHECK_MSG((a < b) == (order_bits(a) < order_bits(b)) && (a == b) == (order_bits(a) == order_bits(b)), a, " ", b);
    // round trip (-0 comes back as +0)
    CHECK_MSG(key_score(pack_key(a, 0)) == a, a);
  }
  CHECK(std::isnan(key_score(pack_key(std::numeric_limits<float>::quiet_NaN(), 3))));
  CHECK(!std::signbit(key_score(pack_key(-0.0f, 3))));
  // Latents up to 2^32 - 1 round-trip; equal scores rank the lower latent higher.
  for (int64_t l : {int64_t(0), int64_t(1), int64_t(24575), int64_t(1) << 31, (int64_t(1) << 32) - 1})
    CHECK(key_latent(pack_key(1.5f, l)) == l);
  CHECK(pack_key(1.0f, 3) > pack_key(1.0f, 4));
  CHECK(pack_key(1.0f, 4) > pack_key(0.99999994f, 0));
  CHECK(pack_key(std::numeric_limits<float>::quiet_NaN(), 9) > pack_key(INFINITY, 0));
  CHECK(pack_key(-INFINITY, (int64_t(1) << 32) - 1) > topk_key(0));  // 0 is below every real key
  // threshold_encode's below-threshold keys: under every real score's key, above 0, one per latent
  CHECK(below_key(0) < pack_key(-INFINITY, (int64_t(1) << 32) - 1) && below_key((int64_t(1) << 32) - 2) > 0);
  CHECK(is_below(below_key(7)) && !is_below(pack_key(-INFINITY, 7)) && key_latent(below_key(7)) == 7);
  CHECK(below_key(3) > below_key(4));
}

}  // namespace

int main() {
  check_keys();

  // One split per row (P = 1; seg is the chunk width).
  // k = 1, k = M, k above and below the block width, chunks smaller than k,
  // chunks of one column, row blocks of one row.
  for (int64_t k : {1, 5, 64, 257, 300})
    run_case(9, 300, k, Fill::kNormal, 0.0, 0.0, 4, 1, 128);
  run_case(5, 300, 37, Fill::kNormal, 0.0, 0.0, 5, 1, 7);
  run_case(3, 60, 10, Fill::kNormal, 0.0, 0.0, 1, 1, 1);
  run_case(7, 1000, 32, Fill::kNormal, 0.0, 0.0, 7, 1, 256);

  // Exact ties across chunks, signed zeros, all-equal rows (every radix pass
  // down to the latent bits), fewer positive scores than k.
  for (int64_t k : {1, 9, 50})
    run_case(6, 130, k, Fill::kSmallInts, 0.0, 0.0, 3, 1, 29);
  run_case(4, 100, 20, Fill::kEqual, 0.0, 0.0, 4, 1, 33);
  for (int64_t k : {3, 40})
    run_case(6, 200, k, Fill::kAdjacent, 0.0, 0.0, 3, 1, 37);  // scores one float ulp apart
  run_case(5, 90, 12, Fill::kNegative, 0.0, 0.0, 2, 1, 16);
  run_case(3, 600, 40, Fill::kAscending, 0.0, 0.0, 3, 1, 64);

  // NaN ranks first, ties among NaN to the lower latent; infinities.
  for (double nan_rate : {0.01, 0.4, 1.0})
    run_case(6, 150, 11, Fill::kNormal, nan_rate, 0.05, 3, 1, 40);

  // Latent splits (small N): each row's chunk over several blocks, merged at the end.
  run_case(3, 1000, 7, Fill::kNormal, 0.0, 0.0, 3, 4, 64);    // last chunk: the last split short
  run_case(2, 300, 9, Fill::kNormal, 0.0, 0.0, 1, 5, 50);     // last chunk: splits 1-4 empty
  run_case(2, 300, 100, Fill::kNormal, 0.0, 0.0, 2, 8, 16);   // k > seg: splits hold < k keys for a while
  run_case(2, 300, 300, Fill::kNormal, 0.0, 0.0, 2, 8, 16);   // k = M: the merge keeps everything
  run_case(2, 300, 45, Fill::kNormal, 0.0, 0.0, 2, 7, 300);   // one chunk wider than M: splits 1-6 empty
  run_case(1, 5000, 32, Fill::kNormal, 0.0, 0.0, 1, 16, 256); // one row, two chunks
  for (int64_t k : {1, 9, 50})
    run_case(5, 260, k, Fill::kSmallInts, 0.0, 0.0, 2, 3, 29);  // ties across splits and chunks
  run_case(3, 200, 20, Fill::kEqual, 0.0, 0.0, 3, 4, 16);
  run_case(3, 400, 12, Fill::kAdjacent, 0.0, 0.0, 3, 6, 32);
  for (double nan_rate : {0.01, 1.0})
    run_case(4, 333, 11, Fill::kNormal, nan_rate, 0.05, 2, 3, 40);  // NaN first across splits

  // k beyond the shared-memory sort: the final sort runs in a global state row
  // (P = 1) or in the other state buffer (after the merge, P > 1).
  run_case(2, 2500, 2100, Fill::kNormal, 0.0, 0.0, 2, 1, 1024);
  run_case(2, 2100, 2100, Fill::kSmallInts, 0.01, 0.0, 1, 1, 700);
  run_case(2, 5000, 2100, Fill::kNormal, 0.0, 0.0, 1, 3, 1024);

  // b_dec folded: each chunk's bias from the extra GEMM row of its own score
  // buffer (double-buffered with the scores), with and without splits.
  run_case(9, 300, 5, Fill::kNormal, 0.0, 0.0, 4, 1, 128, true);
  run_case(3, 1000, 7, Fill::kNormal, 0.0, 0.0, 3, 4, 64, true);
  run_case(2, 300, 9, Fill::kNormal, 0.0, 0.0, 1, 5, 50, true);
  run_case(5, 260, 9, Fill::kSmallInts, 0.0, 0.0, 2, 3, 29, true);
  run_case(4, 333, 11, Fill::kNormal, 0.05, 0.05, 2, 3, 40, true);

  // plan_topk_encode's own plans: small devices and budgets force splits and
  // several chunks (and double buffers) at test sizes.
  run_planned(3, 5000, 5, Fill::kNormal, 4, int64_t(4) * 12 * 1024);
  run_planned(3, 5000, 5, Fill::kNormal, 4, int64_t(4) * 12 * 1024, true);
  run_planned(1, 9000, 40, Fill::kSmallInts, 8, int64_t(1) << 20);
  run_planned(33, 3000, 16, Fill::kNormal, 2, int64_t(34) * 12 * 512, true);
  run_planned(5, 700, 700, Fill::kNormal, 132, kEncodeScratchBytes);

  // threshold_encode: per-latent thresholds; rows with fewer scores above them than max_k (0 / 0 padding),
  // none, all; ties at and around the thresholds; NaN never kept; splits, chunks and the fold.
  run_threshold_case(9, 300, 32, Fill::kNormal, 0.0, 0.5, 2.5, 4, 1, 128);
  run_threshold_case(9, 300, 32, Fill::kNormal, 0.0, 1e30f, 1e30f, 4, 1, 128);    // none above
  run_threshold_case(5, 300, 300, Fill::kNormal, 0.0, -1e30f, -1e30f, 5, 1, 64);  // all above, max_k = M
  run_threshold_case(6, 130, 9, Fill::kSmallInts, 0.0, 0.0, 0.0, 3, 1, 29);       // scores equal to it: not above
  run_threshold_case(6, 150, 11, Fill::kNormal, 0.3, -0.5, 0.5, 3, 1, 40);        // NaN never above
  run_threshold_case(3, 1000, 20, Fill::kNormal, 0.0, 1.0, 2.0, 3, 4, 64);        // splits
  run_threshold_case(2, 300, 100, Fill::kNormal, 0.0, -0.2, 0.8, 2, 8, 16);
  run_threshold_case(4, 333, 11, Fill::kNormal, 0.05, 0.0, 1.0, 2, 3, 40, true);  // the fold
  run_threshold_case(2, 2500, 2100, Fill::kNormal, 0.0, -0.5, 0.5, 2, 1, 1024);   // sort in global memory

  return ssae_test::finish("test_cuda_topk_select");
}
