// sparse_decode, sparse_decode_residual and find_invalid_index (csrc/kernels/cpu/sparse_decode.h)
// against naive loops accumulating in double, for every storage type.
#include "../kernels/cpu/sparse_decode.h"

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "../kernels/cpu/scalar.h"
#include "test_util.h"
#include "tolerance.h"

using ssae::cpu::bf16;
using ssae::cpu::f16;

namespace {

std::mt19937 rng(7);

template <typename T>
void run_decode(int64_t rows, int64_t k, int64_t d, int64_t M, bool with_bias) {
  ssae_test::context(ssae_test::str(ssae_test::type_name<T>(), " rows=", rows, " k=", k, " d=", d, " M=", M,
                                    " bias=", with_bias));
  const auto values = ssae_test::random_values<T>(size_t(rows * k), rng);
  const auto W = ssae_test::random_values<T>(size_t(M * d), rng);
  const auto bias = ssae_test::random_values<T>(size_t(d), rng);
  std::vector<int64_t> indices(static_cast<size_t>(rows * k));
  // Duplicates within a row are allowed by the kernel; include some.
  for (auto& i : indices) i = std::uniform_int_distribution<int64_t>(0, M - 1)(rng);

  std::vector<T> out(static_cast<size_t>(rows * d));
  ssae::cpu::sparse_decode<T>(values.data(), indices.data(), W.data(), with_bias ? bias.data() : nullptr, rows, k,
                              d, out.data());

  for (int64_t n = 0; n < rows; ++n)
    for (int64_t t = 0; t < d; ++t) {
      double want = with_bias ? ssae_test::to_double(bias[size_t(t)]) : 0.0, magnitude = std::fabs(want);
      for (int64_t j = 0; j < k; ++j) {
        const double term = ssae_test::to_double(values[size_t(n * k + j)]) *
                            ssae_test::to_double(W[size_t(indices[size_t(n * k + j)] * d + t)]);
        want += term;
        magnitude += std::fabs(term);
      }
      CHECK_NEAR(ssae_test::to_double(out[size_t(n * d + t)]), want,
                 ssae_test::sum_tolerance<T>(k + 1, magnitude, want));
    }
}

// sparse_decode_residual: the residual against the exact scaled decode error, and
// grad_values against the exact dot of that exact residual, the bound adding the
// kernel's (unrounded, acc_t) residual error carried through the dot.
template <typename T>
void run_residual(int64_t rows, int64_t k, int64_t d, int64_t M, bool with_bias) {
  using A = ssae::cpu::acc_t<T>;
  ssae_test::context(ssae_test::str("residual ", ssae_test::type_name<T>(), " rows=", rows, " k=", k, " d=", d,
                                    " M=", M, " bias=", with_bias));
  const auto values = ssae_test::random_values<T>(size_t(rows * k), rng);
  const auto W = ssae_test::random_values<T>(size_t(M * d), rng);
  const auto bias = ssae_test::random_values<T>(size_t(d), rng);
  const auto x = ssae_test::random_values<T>(size_t(rows * d), rng);
  std::vector<A> scale(static_cast<size_t>(rows));
  for (auto& c : scale) c = A(std::uniform_real_distribution<double>(-3.0, 3.0)(rng));
  std::vector<int64_t> indices(static_cast<size_t>(rows * k));
  for (auto& i : indices) i = std::uniform_int_distribution<int64_t>(0, M - 1)(rng);

  std::vector<T> residual(static_cast<size_t>(rows * d)), grad(static_cast<size_t>(rows * k));
  ssae::cpu::sparse_decode_residual<T>(values.data(), indices.data(), W.data(), with_bias ? bias.data() : nullptr,
                                       x.data(), scale.data(), rows, k, d, residual.data(), grad.data());

  const double u = ssae_test::acc_unit<T>();
  std::vector<double> exact(static_cast<size_t>(d)), err(static_cast<size_t>(d));
  for (int64_t n = 0; n < rows; ++n) {
    const double s = double(scale[size_t(n)]);
    for (int64_t t = 0; t < d; ++t) {
      const double xv = ssae_test::to_double(x[size_t(n * d + t)]);
      double sum = (with_bias ? ssae_test::to_double(bias[size_t(t)]) : 0.0) - xv;
      double magnitude = std::fabs(sum) + std::fabs(xv);
      for (int64_t j = 0; j < k; ++j) {
        const double term = ssae_test::to_double(values[size_t(n * k + j)]) *
                            ssae_test::to_double(W[size_t(indices[size_t(n * k + j)] * d + t)]);
        sum += term;
        magnitude += std::fabs(term);
      }
      exact[size_t(t)] = s * sum;
      // k + 2 summed terms, then the product with scale
      err[size_t(t)] = double(k + 3) * u * std::fabs(s) * magnitude;
      CHECK_NEAR(ssae_test::to_double(residual[size_t(n * d + t)]), exact[size_t(t)],
                 ssae_test::sum_tolerance<T>(k + 3, std::fabs(s) * magnitude, exact[size_t(t)]));
    }
    for (int64_t j = 0; j < k; ++j) {
      const T* row = W.data() + indices[size_t(n * k + j)] * d;
      double want = 0, magnitude = 0, carried = 0;
      for (int64_t t = 0; t < d; ++t) {
        const double w = ssae_test::to_double(row[t]);
        want += exact[size_t(t)] * w;
        magnitude += std::fabs(exact[size_t(t)] * w);
        carried += err[size_t(t)] * std::fabs(w);
      }
      CHECK_NEAR(ssae_test::to_double(grad[size_t(n * k + j)]), want,
                 ssae_test::sum_tolerance<T>(d, magnitude + carried, want) + carried);
    }
  }
}

void run_find_invalid(int64_t count, int64_t M, std::vector<int64_t> bad_at, std::vector<int64_t> bad_values) {
  ssae_test::context(ssae_test::str("find_invalid_index count=", count, " M=", M, " bad at ", bad_at.size(),
                                    " positions"));
  std::vector<int64_t> idx(static_cast<size_t>(count));
  for (auto& i : idx) i = std::uniform_int_distribution<int64_t>(0, M - 1)(rng);
  int64_t want = -1;
  for (size_t b = 0; b < bad_at.size(); ++b) {
    idx[size_t(bad_at[b])] = bad_values[b % bad_values.size()];
    if (want < 0 || bad_at[b] < want) want = bad_at[b];
  }
  const int64_t got = ssae::cpu::find_invalid_index(idx.data(), count, M);
  CHECK_MSG(got == want, "got ", got, " want ", want);
}

}  // namespace

int main() {
  for (int64_t k : {1, 3, 32}) {
    for (bool bias : {false, true}) {
      run_decode<float>(17, k, 45, 33, bias);
      run_decode<double>(17, k, 45, 33, bias);
      run_decode<bf16>(17, k, 45, 33, bias);
      run_decode<f16>(17, k, 45, 33, bias);
    }
  }
  // k = M, a single row, d = 1, a single latent, a wide row.
  run_decode<float>(5, 33, 19, 33, true);
  run_decode<float>(1, 4, 7, 9, true);
  run_decode<bf16>(9, 5, 1, 6, true);
  run_decode<f16>(3, 1, 8, 1, false);
  run_decode<float>(3, 8, 1031, 50, true);
  run_decode<bf16>(2, 16, 777, 40, false);

  for (int64_t k : {1, 3, 32})
    for (bool bias : {false, true}) {
      run_residual<float>(17, k, 45, 33, bias);
      run_residual<double>(17, k, 45, 33, bias);
      run_residual<bf16>(17, k, 45, 33, bias);
      run_residual<f16>(17, k, 45, 33, bias);
    }
  run_residual<float>(5, 33, 19, 33, true);  // k = M
  run_residual<bf16>(9, 5, 1, 6, true);      // d = 1
  run_residual<float>(3, 8, 1031, 50, false);

  run_find_invalid(0, 5, {}, {-1});
  run_find_invalid(1, 1, {}, {-1});
  run_find_invalid(1000, 10, {}, {-1});
  run_find_invalid(1000, 10, {999}, {10});
  run_find_invalid(1000, 10, {0}, {-1});
  run_find_invalid(1000, 10, {512, 17, 900}, {-5, 11, INT64_MAX});
  run_find_invalid(200003, 24576, {199999, 150001}, {24576, INT64_MIN});

  return ssae_test::finish("test_sparse_decode");
}
