// sparse_adam (csrc/kernels/cpu/sparse_adam.h) against the formulas evaluated in double:
// catch-up and update of the listed rows, padded (strided) rows, catch-up only, rows with zero
// moments, untouched rows left bit for bit; and find_bad_row's range and duplicate checks.
#include "../kernels/cpu/sparse_adam.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "test_util.h"
#include "tolerance.h"

namespace {

std::mt19937 rng(5);

template <typename T>
void run(int64_t M, int64_t d, int64_t R, int64_t pad, bool with_grad) {
  ssae_test::context(ssae_test::str(ssae_test::type_name<T>(), " M=", M, " d=", d, " R=", R, " pad=", pad,
                                    " grad=", with_grad));
  const int64_t ld = d + pad;
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<T> p(size_t(M * ld)), m(size_t(M * ld)), v(size_t(M * ld));
  for (size_t i = 0; i < p.size(); ++i) {
    p[i] = T(normal(rng));
    m[i] = T(1e-2 * normal(rng));
    v[i] = T(1e-4 * uniform(rng));
  }
  std::fill(m.begin(), m.begin() + ld, T(0));  // row 0: never touched, zero moments
  std::fill(v.begin(), v.begin() + ld, T(0));
  std::vector<int64_t> rows(static_cast<size_t>(M));
  std::iota(rows.begin(), rows.end(), 0);
  std::shuffle(rows.begin(), rows.end(), rng);
  rows.resize(size_t(R));
  std::vector<T> grad(size_t(R * d)), catchup(size_t(4 * R));
  for (auto& g : grad) g = T(normal(rng));
  for (int64_t r = 0; r < R; ++r) {
    const int skipped = int(r % 4);
    catchup[size_t(4 * r)] = T(1e-3 * skipped);
    catchup[size_t(4 * r + 1)] = T(std::pow(0.9, skipped));
    catchup[size_t(4 * r + 2)] = T(std::pow(0.999, skipped));
    catchup[size_t(4 * r + 3)] = r % 5 == 0 ? T(0) : T(1e-8);  // eps_skip 0 must not turn 0 / 0 into NaN
  }
  const auto p0 = p, m0 = m, v0 = v;
  const double lr = 1e-2, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  const int64_t step = 7;
  ssae::cpu::sparse_adam<T, T>({p.data(), ld, m.data(), ld, v.data(), ld, rows.data(), R,
                             with_grad ? grad.data() : nullptr, d, catchup.data(), d, lr, beta1, beta2, eps, step});
  std::vector<bool> listed(size_t(M), false);
  for (int64_t r = 0; r < R; ++r) listed[size_t(rows[size_t(r)])] = true;
  const double tol = sizeof(T) == 4 ? 2e-6 : 1e-14;
  // the kernel's betas are rounded to T (1 - beta2 then differs from the double's by 1e-5 relative)
  const double b1 = double(T(beta1)), b2 = double(T(beta2));
  for (int64_t row = 0; row < M; ++row) {
    const int64_t r = std::find(rows.begin(), rows.end(), row) - rows.begin();
    for (int64_t c = 0; c < ld; ++c) {
      const size_t at = size_t(row * ld + c);
      if (!listed[size_t(row)] || c >= d) {  // untouched rows and padding: bit for bit
        CHECK(p[at] == p0[at] && m[at] == m0[at] && v[at] == v0[at]);
        continue;
      }
      const double drift = catchup[size_t(4 * r)], d1 = catchup[size_t(4 * r + 1)],
                   d2 = catchup[size_t(4 * r + 2)], eps_skip = catchup[size_t(4 * r + 3)];
      const double mm = m0[at], vv = v0[at];
      double pp = double(p0[at]) - (mm == 0 ? 0.0 : drift * mm / (std::sqrt(vv) + eps_skip));
      double m1 = d1 * mm, v1 = d2 * vv;
      if (with_grad) {
        const double g = grad[size_t(r * d + c)];
        m1 = b1 * m1 + (1 - b1) * g;
        v1 = b2 * v1 + (1 - b2) * g * g;
        pp -= lr / (1 - std::pow(beta1, step)) * m1 / (std::sqrt(v1) / std::sqrt(1 - std::pow(beta2, step)) + eps);
      }
      CHECK_NEAR(double(p[at]), pp, tol * (1 + std::fabs(pp)));
      CHECK_NEAR(double(m[at]), m1, tol * (1e-2 + std::fabs(m1)));
      CHECK_NEAR(double(v[at]), v1, tol * (1e-4 + std::fabs(v1)));
    }
  }
}

void bad_rows() {
  ssae_test::context("find_bad_row");
  bool duplicate = true;
  const std::vector<int64_t> fine{3, 0, 7}, twice{3, 0, 3}, outside{3, 8, 1}, negative{-1};
  CHECK(ssae::cpu::find_bad_row(fine.data(), 3, 8, &duplicate) == 3);
  CHECK(ssae::cpu::find_bad_row(twice.data(), 3, 8, &duplicate) == 2 && duplicate);
  CHECK(ssae::cpu::find_bad_row(outside.data(), 3, 8, &duplicate) == 1 && !duplicate);
  CHECK(ssae::cpu::find_bad_row(negative.data(), 1, 8, &duplicate) == 0 && !duplicate);
}

}  // namespace

int main() {
  for (bool with_grad : {true, false}) {
    for (int64_t pad : {0, 3}) {
      run<float>(1, 1, 1, pad, with_grad);
      run<float>(40, 17, 13, pad, with_grad);
      run<float>(300, 576, 200, pad, with_grad);  // enough work to go parallel
      run<double>(40, 33, 40, pad, with_grad);
    }
  }
  bad_rows();
  return ssae_test::finish("test_sparse_adam");
}
