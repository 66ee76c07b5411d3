// The CUDA encode's selection (csrc/kernels/cuda/topk_select.h) run on the
// host: the block algorithms are executed by an emulated block (each phase
// runs every thread id, in forward, reverse or shuffled order, then "syncs"),
// driven by the same encode_schedule() as the ATen binding, with a naive
// GEMM. Results must equal a stable descending sort of each full row (NaN
// first, ties to the lower index). Also checks the key encoding itself.
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

// One thread block, emulated: `each` runs f for every thread id in `order`.
// Within a phase the algorithms must not depend on the order (no thread reads
// what another writes in the same phase); running several orders checks that.
struct HostExec {
  std::vector<int> order;
  explicit HostExec(int mode) : order(kSelectThreads) {
    std::iota(order.begin(), order.end(), 0);
    if (mode == 1) std::reverse(order.begin(), order.end());
    if (mode == 2) std::shuffle(order.begin(), order.end(), rng);
  }
  int threads() const { return int(order.size()); }
  template <class F>
  void each(F&& f) {
    for (int t : order) f(t);
  }
  uint32_t append(uint32_t* counter, bool keep) { return keep ? (*counter)++ : 0u; }
  void atomic_add(uint32_t* p, uint32_t v) { *p += v; }
  void atomic_min(topk_key* p, topk_key v) { *p = std::min(*p, v); }
};

enum class Fill { kNormal, kSmallInts, kNegative, kAscending, kEqual, kAdjacent };

struct Problem {
  int64_t N, M, k;
  std::vector<float> hi, lo, bias;  // "GEMM outputs" [N, M] (lo empty unless split) and b_enc [M]
};

Problem make_problem(int64_t N, int64_t M, int64_t k, Fill fill, bool split, double nan_rate, double inf_rate) {
  Problem p{N, M, k, std::vector<float>(size_t(N * M)), {}, std::vector<float>(size_t(M))};
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
    p.hi[size_t(i)] = v;
  }
  if (split) {
    p.lo.resize(size_t(N * M));
    for (auto& v : p.lo) v = (fill == Fill::kNormal) ? 1e-3f * normal(rng) : 0.0f;
  }
  for (auto& b : p.bias) b = (fill == Fill::kNormal) ? 0.25f * float(uniform_int(-2, 2)) : 0.0f;
  return p;
}

float pre_activation(const Problem& p, int64_t n, int64_t m) {
  float s = p.hi[size_t(n * p.M + m)];  // the same float operations, in the same order, as chunk_key
  if (!p.lo.empty()) s += p.lo[size_t(n * p.M + m)];
  return s + p.bias[size_t(m)];
}

// Emulates the binding's topk_encode loop with a chosen plan; returns values (float) and indices.
void emulate(const Problem& p, TopkEncodePlan plan, int exec_mode, std::vector<float>& values,
             std::vector<int64_t>& indices) {
  const int64_t R = plan.row_block, C = plan.latent_chunk, S = plan.state_stride;
  const topk_key garbage = 0xdeadbeefcafef00dULL;  // uninitialised scratch must never matter
  std::vector<topk_key> state[2] = {std::vector<topk_key>(size_t(R * S), garbage), std::vector<topk_key>(size_t(R * S), garbage)};
  std::vector<topk_key> row_min(size_t(R), garbage);
  std::vector<uint32_t> cand(size_t(R * C), 0xabababab);
  std::vector<float> scores(size_t(R * C)), scores_lo(size_t(R * C));
  values.assign(size_t(p.N * p.k), -1.0f);
  indices.assign(size_t(p.N * p.k), -1);
  HostExec ex(exec_mode);

  encode_schedule(
      plan, p.N, p.M,
      [&](int64_t n0, int64_t rows, int64_t m0, int64_t cols, int parity) {
        // The "GEMM" writes a [rows, cols] tile (ld = cols) like at::mm_out into a contiguous view.
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) {
            scores[size_t(r * cols + c)] = p.hi[size_t((n0 + r) * p.M + m0 + c)];
            if (!p.lo.empty()) scores_lo[size_t(r * cols + c)] = p.lo[size_t((n0 + r) * p.M + m0 + c)];
          }
        for (int64_t r = 0; r < rows; ++r) {
          SelectShared sh;
          std::memset(&sh, 0x5a, sizeof(sh));
          const SelectRow row{scores.data() + r * cols,
                              p.lo.empty() ? nullptr : scores_lo.data() + r * cols,
                              p.bias.data() + m0,
                              cols,
                              m0,
                              p.k,
                              state[parity].data() + r * S,
                              state[parity ^ 1].data() + r * S,
                              row_min.data() + r,
                              cand.data() + r * C};
          select_chunk(ex, sh, row);
        }
      },
      [&](int64_t n0, int64_t rows, int parity) {
        for (int64_t r = 0; r < rows; ++r) {
          std::vector<topk_key> shared_buf(size_t(kSortSharedKeys), garbage);
          topk_key* srow = state[parity].data() + r * S;
          topk_key* buf = sort_in_shared(S) ? shared_buf.data() : srow;
          finish_row(ex, buf, srow, p.k, S, [&](int64_t j, float s, int64_t latent) {
            values[size_t((n0 + r) * p.k + j)] = s < 0.0f ? 0.0f : s;
            indices[size_t((n0 + r) * p.k + j)] = latent;
          });
        }
      });
}

void run_case(int64_t N, int64_t M, int64_t k, Fill fill, bool split, double nan_rate, double inf_rate,
              int64_t row_block, int64_t chunk) {
  for (int mode = 0; mode < 3; ++mode) {
    ssae_test::context(ssae_test::str("N=", N, " M=", M, " k=", k, " fill=", int(fill), " split=", split,
                                      " nan=", nan_rate, " inf=", inf_rate, " R=", row_block, " C=", chunk,
                                      " thread order=", mode));
    const Problem p = make_problem(N, M, k, fill, split, nan_rate, inf_rate);
    TopkEncodePlan plan = plan_topk_encode(N, M, 16, k, split, 4);
    plan.row_block = row_block;  // any chunking must give the same answer
    plan.latent_chunk = chunk;
    std::vector<float> values;
    std::vector<int64_t> indices;
    emulate(p, plan, mode, values, indices);

    int64_t bad_rows = 0;
    for (int64_t n = 0; n < N; ++n) {
      std::vector<int64_t> rank(static_cast<size_t>(M));
      std::iota(rank.begin(), rank.end(), 0);
      std::vector<float> pre(static_cast<size_t>(M));
      for (int64_t m = 0; m < M; ++m) pre[size_t(m)] = pre_activation(p, n, m);
      std::stable_sort(rank.begin(), rank.end(), [&](int64_t a, int64_t b) {
        const bool an = std::isnan(pre[size_t(a)]), bn = std::isnan(pre[size_t(b)]);
        if (an || bn) return an && !bn;
        return pre[size_t(a)] > pre[size_t(b)];
      });
      for (int64_t j = 0; j < k; ++j) {
        const float want = pre[size_t(rank[size_t(j)])];
        const float want_v = want < 0.0f ? 0.0f : want;
        const float got_v = values[size_t(n * k + j)];
        const bool v_ok = std::isnan(want_v) ? std::isnan(got_v) : got_v == want_v;
        if (indices[size_t(n * k + j)] != rank[size_t(j)] || !v_ok) {
          CHECK_MSG(false, "row ", n, " slot ", j, ": got ", indices[size_t(n * k + j)], " (", got_v, "), want ",
                    rank[size_t(j)], " (", want_v, ")");
          ++bad_rows;
          break;
        }
      }
    }
    CHECK_MSG(bad_rows == 0, bad_rows, " rows wrong");
  }
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
}

}  // namespace

int main() {
  check_keys();

  // k = 1, k = M, k above and below the block width, chunks smaller than k,
  // chunks of one column, row blocks of one row.
  for (int64_t k : {1, 5, 64, 257, 300})
    run_case(9, 300, k, Fill::kNormal, false, 0.0, 0.0, 4, 128);
  run_case(5, 300, 37, Fill::kNormal, false, 0.0, 0.0, 5, 7);
  run_case(3, 60, 10, Fill::kNormal, false, 0.0, 0.0, 1, 1);
  run_case(7, 1000, 32, Fill::kNormal, false, 0.0, 0.0, 7, 256);  // the planned chunk width

  // Exact ties across chunks, signed zeros, all-equal rows (every radix pass
  // down to the latent bits), fewer positive scores than k.
  for (int64_t k : {1, 9, 50})
    run_case(6, 130, k, Fill::kSmallInts, false, 0.0, 0.0, 3, 29);
  run_case(4, 100, 20, Fill::kEqual, false, 0.0, 0.0, 4, 33);
  for (int64_t k : {3, 40})
    run_case(6, 200, k, Fill::kAdjacent, false, 0.0, 0.0, 3, 37);  // scores one float ulp apart
  run_case(5, 90, 12, Fill::kNegative, false, 0.0, 0.0, 2, 16);
  run_case(3, 600, 40, Fill::kAscending, false, 0.0, 0.0, 3, 64);

  // NaN ranks first, ties among NaN to the lower latent; infinities.
  for (double nan_rate : {0.01, 0.4, 1.0})
    run_case(6, 150, 11, Fill::kNormal, false, nan_rate, 0.05, 3, 40);

  // x - b_dec split into hi + lo score halves.
  run_case(6, 400, 17, Fill::kNormal, true, 0.0, 0.0, 6, 128);

  // k beyond the shared-memory sort: the final sort runs in the state rows.
  run_case(2, 2500, 2100, Fill::kNormal, false, 0.0, 0.0, 2, 1024);
  run_case(2, 2100, 2100, Fill::kSmallInts, false, 0.01, 0.0, 1, 700);

  return ssae_test::finish("test_cuda_topk_select");
}
