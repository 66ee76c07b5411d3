// sampled_dot, latent_transpose and sparse_transpose_matmul
// (csrc/kernels/cpu/sparse_backward.h) against naive loops.
#include "../kernels/cpu/sparse_backward.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "../kernels/cpu/scalar.h"
#include "test_util.h"
#include "tolerance.h"

using ssae::cpu::bf16;
using ssae::cpu::f16;

namespace {

std::mt19937 rng(11);

// Latent of each entry: skewed so that some latents own many entries and some none.
std::vector<int64_t> random_indices(int64_t count, int64_t M) {
  std::vector<int64_t> idx(static_cast<size_t>(count));
  std::uniform_real_distribution<double> u01;
  for (auto& i : idx) i = std::min<int64_t>(M - 1, int64_t(M * std::pow(u01(rng), 3.0)));
  return idx;
}

template <typename T>
void run_sampled_dot(int64_t rows, int64_t k, int64_t d, int64_t M) {
  ssae_test::context(ssae_test::str("sampled_dot ", ssae_test::type_name<T>(), " rows=", rows, " k=", k, " d=", d,
                                    " M=", M));
  const auto grad = ssae_test::random_values<T>(size_t(rows * d), rng);
  const auto W = ssae_test::random_values<T>(size_t(M * d), rng);
  const auto idx = random_indices(rows * k, M);
  std::vector<T> out(static_cast<size_t>(rows * k));
  ssae::cpu::sampled_dot<T>(grad.data(), idx.data(), W.data(), rows, k, d, out.data());
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t j = 0; j < k; ++j) {
      double want = 0, magnitude = 0;
      for (int64_t t = 0; t < d; ++t) {
        const double term = ssae_test::to_double(grad[size_t(n * d + t)]) *
                            ssae_test::to_double(W[size_t(idx[size_t(n * k + j)] * d + t)]);
        want += term;
        magnitude += std::fabs(term);
      }
      CHECK_NEAR(ssae_test::to_double(out[size_t(n * k + j)]), want, ssae_test::sum_tolerance<T>(d, magnitude, want));
    }
}

// The transpose by definition: for each latent, its entries in increasing order.
void naive_transpose(const std::vector<int64_t>& idx, int64_t M, std::vector<int64_t>& offsets,
                     std::vector<int64_t>& order) {
  offsets.assign(size_t(M + 1), 0);
  order.clear();
  for (int64_t m = 0; m < M; ++m) {
    for (size_t p = 0; p < idx.size(); ++p)
      if (idx[p] == m) order.push_back(int64_t(p));
    offsets[size_t(m + 1)] = int64_t(order.size());
  }
}

void run_latent_transpose(int64_t count, int64_t M) {
  ssae_test::context(ssae_test::str("latent_transpose count=", count, " M=", M));
  const auto idx = random_indices(count, M);
  std::vector<int64_t> offsets(size_t(M + 1), -7), order(size_t(count), -7), want_offsets, want_order;
  ssae::cpu::latent_transpose(idx.data(), count, M, offsets.data(), order.data());
  naive_transpose(idx, M, want_offsets, want_order);
  CHECK(offsets == want_offsets);
  CHECK(order == want_order);
}

template <typename T>
void run_transpose_matmul(int64_t rows, int64_t k, int64_t d, int64_t M, bool with_colsum) {
  ssae_test::context(ssae_test::str("sparse_transpose_matmul ", ssae_test::type_name<T>(), " rows=", rows, " k=", k,
                                    " d=", d, " M=", M, " colsum=", with_colsum));
  const auto weights = ssae_test::random_values<T>(size_t(rows * k), rng);
  const auto X = ssae_test::random_values<T>(size_t(rows * d), rng);
  const auto idx = random_indices(rows * k, M);
  std::vector<int64_t> offsets, order;
  naive_transpose(idx, M, offsets, order);

  std::vector<T> out(size_t(M * d), ssae::cpu::store<T, double>(1024.0));
  std::vector<T> colsum(size_t(M), ssae::cpu::store<T, double>(1024.0));
  ssae::cpu::sparse_transpose_matmul<T>(weights.data(), X.data(), k, d, offsets.data(), order.data(), M, out.data(),
                                        with_colsum ? colsum.data() : nullptr);

  // Naive S^T X straight from the (row, slot) -> latent map, not from the transpose.
  std::vector<double> want(size_t(M * d), 0.0), magnitude(size_t(M * d), 0.0), want_sum(size_t(M), 0.0),
      sum_mag(size_t(M), 0.0);
  std::vector<int64_t> count(size_t(M), 0);
  for (int64_t p = 0; p < rows * k; ++p) {
    const int64_t m = idx[size_t(p)];
    const double w = ssae_test::to_double(weights[size_t(p)]);
    ++count[size_t(m)];
    want_sum[size_t(m)] += w;
    sum_mag[size_t(m)] += std::fabs(w);
    for (int64_t t = 0; t < d; ++t) {
      const double term = w * ssae_test::to_double(X[size_t((p / k) * d + t)]);
      want[size_t(m * d + t)] += term;
      magnitude[size_t(m * d + t)] += std::fabs(term);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t t = 0; t < d; ++t)
      CHECK_NEAR(ssae_test::to_double(out[size_t(m * d + t)]), want[size_t(m * d + t)],
                 ssae_test::sum_tolerance<T>(count[size_t(m)], magnitude[size_t(m * d + t)], want[size_t(m * d + t)]));
    if (with_colsum)
      CHECK_NEAR(ssae_test::to_double(colsum[size_t(m)]), want_sum[size_t(m)],
                 ssae_test::sum_tolerance<T>(count[size_t(m)], sum_mag[size_t(m)], want_sum[size_t(m)]));
    else
      CHECK(ssae_test::to_double(colsum[size_t(m)]) == 1024.0);  // untouched when not asked for
  }
}

// Deterministic: the same inputs give bitwise the same outputs on every run
// (each latent's sum has one owner and a fixed order).
void run_deterministic() {
  ssae_test::context("sparse_transpose_matmul determinism");
  const int64_t rows = 300, k = 8, d = 33, M = 40;
  const auto weights = ssae_test::random_values<float>(size_t(rows * k), rng);
  const auto X = ssae_test::random_values<float>(size_t(rows * d), rng);
  const auto idx = random_indices(rows * k, M);
  std::vector<int64_t> offsets(size_t(M + 1)), order(size_t(rows * k));
  ssae::cpu::latent_transpose(idx.data(), rows * k, M, offsets.data(), order.data());
  std::vector<float> first(static_cast<size_t>(M * d)), again(first), s1(static_cast<size_t>(M)), s2(s1);
  ssae::cpu::sparse_transpose_matmul<float>(weights.data(), X.data(), k, d, offsets.data(), order.data(), M,
                                            first.data(), s1.data());
  for (int rep = 0; rep < 5; ++rep) {
    ssae::cpu::sparse_transpose_matmul<float>(weights.data(), X.data(), k, d, offsets.data(), order.data(), M,
                                              again.data(), s2.data());
    CHECK(std::memcmp(first.data(), again.data(), first.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(s1.data(), s2.data(), s1.size() * sizeof(float)) == 0);
  }
}

}  // namespace

int main() {
  for (int64_t k : {1, 4, 32}) {
    run_sampled_dot<float>(19, k, 37, 50);
    run_sampled_dot<double>(19, k, 37, 50);
    run_sampled_dot<bf16>(19, k, 37, 50);
    run_sampled_dot<f16>(19, k, 37, 50);
  }
  run_sampled_dot<float>(3, 50, 1, 50);    // k = M, d = 1
  run_sampled_dot<float>(2, 3, 1029, 7);   // wide rows
  run_sampled_dot<bf16>(1, 1, 5, 1);       // a single latent

  run_latent_transpose(0, 3);
  run_latent_transpose(1, 1);
  run_latent_transpose(7, 1);
  run_latent_transpose(113, 7);
  run_latent_transpose(3 * 37, 37);
  run_latent_transpose(5000, 1001);

  for (bool colsum : {true, false}) {
    run_transpose_matmul<float>(23, 3, 29, 17, colsum);
    run_transpose_matmul<double>(23, 3, 29, 17, colsum);
    run_transpose_matmul<bf16>(23, 3, 29, 17, colsum);
    run_transpose_matmul<f16>(23, 3, 29, 17, colsum);
  }
  run_transpose_matmul<float>(200, 16, 65, 300, true);  // many dead latents, a few hot ones
  run_transpose_matmul<float>(9, 7, 13, 7, true);       // k = M
  run_transpose_matmul<float>(1, 1, 1, 1, true);
  run_transpose_matmul<bf16>(40, 2, 1025, 5, true);     // wide rows

  run_deterministic();
  return ssae_test::finish("test_sparse_backward");
}
