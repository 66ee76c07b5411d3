// project_subspace (csrc/kernels/cpu/project_subspace.h) against naive loops
// accumulating in double, for every storage type: projection and complement,
// strided rows, in place, shapes around the register tiles and column blocks.
#include "../kernels/cpu/project_subspace.h"

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

std::mt19937 rng(11);

// d x r with orthonormal columns (modified Gram-Schmidt in double), rounded to T.
template <typename T>
std::vector<T> orthonormal(int64_t d, int64_t r) {
  std::normal_distribution<double> normal;
  std::vector<double> q(static_cast<size_t>(d * r));
  for (auto& v : q) v = normal(rng);
  for (int64_t a = 0; a < r; ++a) {
    for (int64_t b = 0; b < a; ++b) {
      double dot = 0;
      for (int64_t i = 0; i < d; ++i) dot += q[size_t(i * r + a)] * q[size_t(i * r + b)];
      for (int64_t i = 0; i < d; ++i) q[size_t(i * r + a)] -= dot * q[size_t(i * r + b)];
    }
    double norm = 0;
    for (int64_t i = 0; i < d; ++i) norm += q[size_t(i * r + a)] * q[size_t(i * r + a)];
    for (int64_t i = 0; i < d; ++i) q[size_t(i * r + a)] /= std::sqrt(norm);
  }
  std::vector<T> out(q.size());
  for (size_t p = 0; p < q.size(); ++p) out[p] = ssae::cpu::store<T, double>(q[p]);
  return out;
}

// G is [d, n] inside a buffer with row stride ldg >= n; in_place writes the result into G.
template <typename T>
void run(int64_t d, int64_t r, int64_t n, bool complement, int64_t pad, bool in_place) {
  ssae_test::context(ssae_test::str(ssae_test::type_name<T>(), " d=", d, " r=", r, " n=", n, " complement=",
                                    complement, " pad=", pad, " in_place=", in_place));
  const int64_t ldg = n + pad;
  const auto U = orthonormal<T>(d, r);
  auto G = ssae_test::random_values<T>(size_t(d * ldg), rng);
  const auto G0 = G;
  // Output rows padded differently from G's, with a sentinel in the padding.
  const int64_t ldo = in_place ? ldg : n + 3;
  std::vector<T> out_buf(static_cast<size_t>(d * ldo), ssae::cpu::store<T, double>(7.0));
  T* out = in_place ? G.data() : out_buf.data();
  ssae::cpu::project_subspace<T>(G.data(), ldg, U.data(), d, r, n, complement, out, ldo);

  auto u = [&](int64_t i, int64_t a) { return ssae_test::to_double(U[size_t(i * r + a)]); };
  auto g = [&](int64_t i, int64_t c) { return ssae_test::to_double(G0[size_t(i * ldg + c)]); };
  for (int64_t c = 0; c < n; ++c) {
    // C[a] = sum_i U[i, a] G[i, c] and the magnitudes of its terms.
    std::vector<double> C(static_cast<size_t>(r)), Cmag(static_cast<size_t>(r));
    for (int64_t a = 0; a < r; ++a)
      for (int64_t i = 0; i < d; ++i) {
        C[size_t(a)] += u(i, a) * g(i, c);
        Cmag[size_t(a)] += std::fabs(u(i, a) * g(i, c));
      }
    for (int64_t i = 0; i < d; ++i) {
      double p = 0, magnitude = 0;
      for (int64_t a = 0; a < r; ++a) {
        p += u(i, a) * C[size_t(a)];
        magnitude += std::fabs(u(i, a)) * Cmag[size_t(a)];
      }
      const double want = complement ? g(i, c) - p : p;
      if (complement) magnitude += std::fabs(g(i, c));
      // Two chained sums (d terms, then r terms): d + r + 1 roundings of the accumulator.
      CHECK_NEAR(ssae_test::to_double(out[size_t(i * ldo + c)]), want,
                 ssae_test::sum_tolerance<T>(d + r + 1, magnitude, want));
    }
  }
  // Nothing outside the [d, n] window is written.
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t c = n; c < ldo; ++c) {
      const double want = in_place ? g(i, c) : 7.0;
      CHECK_MSG(ssae_test::to_double(out[size_t(i * ldo + c)]) == want, "padding (", i, ", ", c, ") overwritten");
    }
  }
}

// P G = G for G in span(U) (to rounding), and the complement of such a G is ~0.
void run_span_fixed_point(int64_t d, int64_t r, int64_t n) {
  ssae_test::context(ssae_test::str("span fixed point d=", d, " r=", r, " n=", n));
  const auto U = orthonormal<double>(d, r);
  std::vector<double> coef(static_cast<size_t>(r * n)), G(static_cast<size_t>(d * n), 0.0);
  std::normal_distribution<double> normal;
  for (auto& v : coef) v = normal(rng);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t c = 0; c < n; ++c)
      for (int64_t a = 0; a < r; ++a) G[size_t(i * n + c)] += U[size_t(i * r + a)] * coef[size_t(a * n + c)];
  std::vector<double> P(G.size()), Q(G.size());
  ssae::cpu::project_subspace<double>(G.data(), n, U.data(), d, r, n, false, P.data(), n);
  ssae::cpu::project_subspace<double>(G.data(), n, U.data(), d, r, n, true, Q.data(), n);
  for (size_t p = 0; p < G.size(); ++p) {
    CHECK_NEAR(P[p], G[p], 1e-12);
    CHECK_NEAR(Q[p], 0.0, 1e-12);
  }
}

template <typename T>
void run_all_modes(int64_t d, int64_t r, int64_t n) {
  for (bool complement : {false, true}) {
    run<T>(d, r, n, complement, 0, false);
    run<T>(d, r, n, complement, 5, false);
    run<T>(d, r, n, complement, 0, true);
    run<T>(d, r, n, complement, 3, true);
  }
}

}  // namespace

int main() {
  // Around the 4 x 32 register tiles: r and d not multiples of 4, n not a multiple of 32.
  const int64_t shapes[][3] = {{13, 5, 37}, {1, 1, 1}, {8, 8, 32}, {9, 1, 70}};
  for (const auto& s : shapes) {
    const int64_t d = s[0], r = s[1], n = s[2];
    run_all_modes<float>(d, r, n);
    run_all_modes<double>(d, r, n);
    run_all_modes<bf16>(d, r, n);
    run_all_modes<f16>(d, r, n);
  }
  // Several column blocks per thread and a wide, tall problem.
  run_all_modes<float>(40, 12, 600);
  run<bf16>(100, 33, 300, true, 1, true);
  run<f16>(64, 64, 50, false, 0, false);  // r = d: the identity
  run_span_fixed_point(30, 7, 45);
  return ssae_test::finish("test_project_subspace");
}
