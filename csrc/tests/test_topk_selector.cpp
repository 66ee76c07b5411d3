// TopKSelector (csrc/kernels/cpu/topk_encode.h) against a stable sort of each
// full row: tiles arriving in several pieces and row blocks interleaved, exact
// ties to the lower index, NaN ranking first, infinities, signed zeros, k = 1,
// k = M, rows with fewer positive scores than k, every output type.
#include "../kernels/cpu/topk_encode.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "../kernels/cpu/scalar.h"
#include "test_util.h"

using ssae::cpu::bf16;
using ssae::cpu::f16;

namespace {

std::mt19937 rng(42);

int64_t uniform_int(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

template <typename T>
bool is_nan_value(T v) {
  return std::isnan(double(ssae::cpu::load<double>(v)));
}

// Random split of [0, n) into consecutive pieces of length in [1, max_piece].
std::vector<int64_t> split(int64_t n, int64_t max_piece) {
  std::vector<int64_t> cuts{0};
  while (cuts.back() < n) cuts.push_back(std::min(n, cuts.back() + uniform_int(1, max_piece)));
  return cuts;
}

enum class Fill { kNormal, kSmallInts, kNegative, kAscending, kDescending, kSignedZeros };

template <typename A>
std::vector<A> make_scores(int64_t rows, int64_t ld, int64_t M, Fill fill, double nan_rate, double inf_rate) {
  std::vector<A> s(size_t(rows * ld), A(1e30));  // padding beyond M must never be read as a score
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> u01;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t m = 0; m < M; ++m) {
      A v;
      switch (fill) {
        case Fill::kNormal: v = A(normal(rng)); break;
        case Fill::kSmallInts: v = A(uniform_int(-3, 3)); break;
        case Fill::kNegative: v = A(-1 - std::fabs(normal(rng))); break;
        case Fill::kAscending: v = A(m); break;
        case Fill::kDescending: v = A(M - m); break;
        case Fill::kSignedZeros: v = (uniform_int(0, 1) ? A(0) : -A(0)); break;
      }
      const double p = u01(rng);
      if (p < nan_rate) v = std::numeric_limits<A>::quiet_NaN();
      else if (p < nan_rate + inf_rate) v = (uniform_int(0, 1) ? 1 : -1) * std::numeric_limits<A>::infinity();
      s[size_t(r * ld + m)] = v;
    }
  return s;
}

// torch.sort(descending=True, stable=True) order: NaN first, then larger first,
// equal scores (including -0 == +0, and NaN vs NaN) by lower index.
template <typename A>
std::vector<int64_t> naive_ranking(const std::vector<A>& pre) {
  std::vector<int64_t> idx(pre.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
    const bool an = std::isnan(pre[a]), bn = std::isnan(pre[b]);
    if (an || bn) return an && !bn;
    return pre[a] > pre[b];
  });
  return idx;
}

template <typename A, typename T>
void run_case(int64_t rows, int64_t M, int64_t k, Fill fill, double nan_rate, double inf_rate, bool nan_bias,
              int64_t max_tile, int64_t max_row_block, int64_t latent_splits = 1) {
  ssae_test::context(ssae_test::str("A=", sizeof(A) * 8, "-bit T=", sizeof(T) * 8, "-bit rows=", rows, " M=", M,
                                    " k=", k, " fill=", int(fill), " nan=", nan_rate, " inf=", inf_rate,
                                    " nan_bias=", nan_bias, " max_tile=", max_tile, " splits=", latent_splits));
  const int64_t ld = M + uniform_int(0, 3);
  const auto scores = make_scores<A>(rows, ld, M, fill, nan_rate, inf_rate);
  std::vector<A> bias(static_cast<size_t>(M));
  for (auto& b : bias) b = (fill == Fill::kSmallInts || fill == Fill::kSignedZeros) ? A(0) : A(0.25 * uniform_int(-4, 4));
  if (nan_bias) bias[size_t(uniform_int(0, M - 1))] = std::numeric_limits<A>::quiet_NaN();

  // Row blocks, each with its own column pieces; the blocks' tiles are
  // interleaved (a row block may be fed after another one started). With
  // latent_splits > 1, each consecutive range of latents has its own selector
  // (as the encode does for few rows), merged into the first at the end.
  std::vector<ssae::cpu::TopKSelector<A>> sels;
  for (int64_t s = 0; s < latent_splits; ++s) sels.emplace_back(rows, k);
  auto& sel = sels[0];
  CHECK(sel.k() == k);
  CHECK(sel.capacity() >= k);
  const auto row_cuts = split(rows, max_row_block);
  std::vector<std::vector<int64_t>> col_cuts, col_sel;  // piece boundaries and each piece's selector
  std::vector<size_t> next;
  for (size_t b = 0; b + 1 < row_cuts.size(); ++b) {
    std::vector<int64_t> cuts{0}, owner;
    for (int64_t s = 0; s < latent_splits; ++s) {
      const int64_t lo = M * s / latent_splits, hi = M * (s + 1) / latent_splits;
      for (const int64_t c : split(hi - lo, max_tile))
        if (c > 0) {
          cuts.push_back(lo + c);
          owner.push_back(s);
        }
    }
    col_cuts.push_back(cuts);
    col_sel.push_back(owner);
    next.push_back(0);
  }
  for (bool fed = true; fed;) {
    fed = false;
    for (size_t b = 0; b + 1 < row_cuts.size(); ++b) {
      if (next[b] + 1 >= col_cuts[b].size() || uniform_int(0, 3) == 0) continue;  // skip a turn sometimes
      const int64_t r0 = row_cuts[b], nr = row_cuts[b + 1] - r0;
      const int64_t c0 = col_cuts[b][next[b]], nc = col_cuts[b][next[b] + 1] - c0;
      sels[size_t(col_sel[b][next[b]])].consume(scores.data() + r0 * ld + c0, ld, r0, nr, c0, nc, bias.data() + c0);
      ++next[b];
      fed = true;
    }
    if (!fed)  // everything skipped this turn: feed whatever is left
      for (size_t b = 0; b + 1 < row_cuts.size(); ++b) fed |= next[b] + 1 < col_cuts[b].size();
  }

  for (int64_t s = 1; s < latent_splits; ++s) sel.merge(sels[size_t(s)]);
  std::vector<T> values(static_cast<size_t>(rows * k));
  std::vector<int64_t> indices(size_t(rows * k), -1);
  sel.template finish<T>(values.data(), indices.data());

  int64_t bad_rows = 0;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<A> pre(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) pre[size_t(m)] = scores[size_t(r * ld + m)] + bias[size_t(m)];
    const auto rank = naive_ranking(pre);
    bool row_ok = true;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t want_i = rank[size_t(j)];
      const A want_pre = pre[size_t(want_i)];
      const T want_v = ssae::cpu::store<T, A>(want_pre < A(0) ? A(0) : want_pre);
      const T got_v = values[size_t(r * k + j)];
      const bool v_ok = is_nan_value(want_v) ? is_nan_value(got_v)
                                             : ssae::cpu::load<double>(got_v) == ssae::cpu::load<double>(want_v);
      if (indices[size_t(r * k + j)] != want_i || !v_ok) {
        row_ok = false;
        CHECK_MSG(false, "row ", r, " slot ", j, ": got index ", indices[size_t(r * k + j)], " value ",
                  ssae::cpu::load<double>(got_v), ", want index ", want_i, " value ", ssae::cpu::load<double>(want_v));
        break;
      }
    }
    bad_rows += !row_ok;
  }
  CHECK_MSG(bad_rows == 0, bad_rows, " of ", rows, " rows wrong");
}

// keep_above (the threshold encode's tile pass) then consume() with a bias of
// -0.0 and finish(relu = false): the latents above threshold, largest first,
// raw values, and their count; -inf in the slots past the count.
template <typename A>
void run_threshold_case(int64_t rows, int64_t M, int64_t k, int64_t tile) {
  ssae_test::context(ssae_test::str("threshold A=", sizeof(A) * 8, "-bit rows=", rows, " M=", M, " k=", k,
                                    " tile=", tile));
  auto scores = make_scores<A>(rows, M, M, Fill::kSmallInts, 0.05, 0.05);
  const auto original = scores;
  std::vector<A> bias(static_cast<size_t>(M)), threshold(static_cast<size_t>(M)), negative_zeros(size_t(M), -A(0));
  for (auto& b : bias) b = A(0.5 * uniform_int(-2, 2));
  bias[size_t(uniform_int(0, M - 1))] = std::numeric_limits<A>::quiet_NaN();
  for (auto& t : threshold) t = A(0.5 * uniform_int(-3, 3));
  std::vector<int64_t> counts(static_cast<size_t>(rows), 0);
  ssae::cpu::TopKSelector<A> sel(rows, k);
  for (int64_t m0 = 0; m0 < M; m0 += tile) {
    const int64_t cols = std::min(tile, M - m0);
    ssae::cpu::keep_above<A>(scores.data() + m0, M, rows, cols, bias.data() + m0, threshold.data() + m0, counts.data());
    sel.consume(scores.data() + m0, M, 0, rows, m0, cols, negative_zeros.data());
  }
  std::vector<A> values(static_cast<size_t>(rows * k));
  std::vector<int64_t> indices(static_cast<size_t>(rows * k));
  sel.template finish<A>(values.data(), indices.data(), /*relu=*/false);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<A> kept(static_cast<size_t>(M), -std::numeric_limits<A>::infinity());
    int64_t want_count = 0;
    for (int64_t m = 0; m < M; ++m) {
      const A v = original[size_t(r * M + m)] + bias[size_t(m)];
      if (v > threshold[size_t(m)]) kept[size_t(m)] = v, ++want_count;
    }
    CHECK_MSG(counts[size_t(r)] == want_count, "row ", r, ": count ", counts[size_t(r)], " want ", want_count);
    const auto rank = naive_ranking(kept);
    for (int64_t j = 0; j < k; ++j) {
      const A want = kept[size_t(rank[size_t(j)])], got = values[size_t(r * k + j)];
      CHECK_MSG(got == want, "row ", r, " slot ", j, ": value ", double(got), " want ", double(want));
      if (j < want_count)
        CHECK_MSG(indices[size_t(r * k + j)] == rank[size_t(j)], "row ", r, " slot ", j, ": index ",
                  indices[size_t(r * k + j)], " want ", rank[size_t(j)]);
    }
  }
}

}  // namespace

int main() {
  for (int64_t k : {1, 4, 30, 61})
    for (int64_t tile : {7, 61}) {
      run_threshold_case<float>(9, 61, k, tile);
      run_threshold_case<double>(5, 61, k, tile);
    }

  // k = 1, small k, k around the capacity slack (16), k = M - 1, k = M.
  for (int64_t k : {1, 2, 5, 16, 17, 33, 136, 137})
    run_case<float, float>(13, 137, k, Fill::kNormal, 0.0, 0.0, false, 40, 5);

  // Exact ties everywhere: ties must go to the lower latent across tile boundaries.
  for (int64_t k : {1, 3, 20, 64, 101})
    run_case<float, float>(11, 101, k, Fill::kSmallInts, 0.0, 0.0, false, 9, 4);
  run_case<float, float>(9, 64, 10, Fill::kSignedZeros, 0.0, 0.0, false, 7, 3);

  // NaN ranks first (ties among NaN to the lower index); infinities; a NaN bias column.
  for (double nan_rate : {0.02, 0.3, 0.9})
    for (int64_t k : {1, 4, 31})
      run_case<float, float>(10, 97, k, Fill::kNormal, nan_rate, 0.05, false, 13, 4);
  run_case<float, float>(6, 50, 3, Fill::kNormal, 0.0, 0.0, true, 8, 6);
  run_case<float, float>(6, 50, 3, Fill::kSmallInts, 0.0, 0.2, false, 8, 6);

  // Fewer positive scores than k (every value is ReLU'd to 0, the order still holds).
  for (int64_t k : {1, 8, 40})
    run_case<float, float>(7, 40, k, Fill::kNegative, 0.0, 0.0, false, 11, 7);

  // Worst and best cases for the running threshold.
  run_case<float, float>(5, 700, 24, Fill::kAscending, 0.0, 0.0, false, 100, 5);
  run_case<float, float>(5, 700, 24, Fill::kDescending, 0.0, 0.0, false, 100, 5);

  // Many latents, tiles of up to a few hundred columns: the vectorised threshold scan.
  for (int64_t k : {1, 7, 64})
    run_case<float, float>(16, 5003, k, Fill::kNormal, 0.0, 0.0, false, 700, 16);
  run_case<float, float>(8, 3001, 32, Fill::kNormal, 0.001, 0.001, false, 500, 3);

  // Tiles of single columns.
  run_case<float, float>(4, 60, 6, Fill::kNormal, 0.0, 0.0, false, 1, 2);

  // float64 scores; float32 scores stored as bfloat16 / float16.
  for (int64_t k : {1, 9, 77})
    run_case<double, double>(9, 77, k, Fill::kNormal, 0.05, 0.02, false, 20, 4);
  run_case<double, double>(4, 2049, 16, Fill::kNormal, 0.0, 0.0, false, 400, 4);
  for (int64_t k : {1, 12, 89}) {
    run_case<float, bf16>(8, 89, k, Fill::kNormal, 0.05, 0.02, false, 17, 3);
    run_case<float, f16>(8, 89, k, Fill::kNormal, 0.05, 0.02, false, 17, 3);
  }

  // Latent ranges selected separately and merged: ties, NaN, k up to M, ranges smaller than k.
  for (int64_t splits : {2, 3, 7}) {
    for (int64_t k : {1, 5, 33, 97})
      run_case<float, float>(10, 97, k, Fill::kNormal, 0.05, 0.02, false, 13, 4, splits);
    run_case<float, float>(9, 101, 20, Fill::kSmallInts, 0.0, 0.0, false, 9, 4, splits);
    run_case<float, float>(7, 40, 8, Fill::kNegative, 0.0, 0.0, false, 11, 7, splits);
    run_case<double, double>(5, 300, 16, Fill::kNormal, 0.01, 0.0, true, 50, 5, splits);
    run_case<float, bf16>(6, 89, 12, Fill::kNormal, 0.05, 0.02, false, 17, 3, splits);
  }

  ssae_test::context("state_bytes");
  CHECK(ssae::cpu::TopKSelector<float>::state_bytes(1, 32) > 0);
  CHECK(ssae::cpu::TopKSelector<float>::state_bytes(1000, 32) == 1000 * ssae::cpu::TopKSelector<float>::state_bytes(1, 32));

  return ssae_test::finish("test_topk_selector");
}
