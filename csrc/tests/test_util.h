// A minimal test harness for the C++ unit tests (run by ctest): CHECK macros
// that count failures with a context string, and shared helpers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <sstream>
#include <string>

namespace ssae_test {

struct State {
  int failures = 0;
  int checks = 0;
  std::string context;
};
inline State& state() {
  static State s;
  return s;
}

// Names the case being checked; printed with every failure inside it.
inline void context(const std::string& c) { state().context = c; }

inline void fail(const char* file, int line, const std::string& what) {
  // Print the first failures only: one bad kernel can fail thousands of checks.
  if (state().failures++ < 25)
    std::fprintf(stderr, "%s:%d: FAILED [%s] %s\n", file, line, state().context.c_str(), what.c_str());
}

inline int finish(const char* name) {
  if (state().failures) {
    std::fprintf(stderr, "%s: %d of %d checks failed\n", name, state().failures, state().checks);
    return 1;
  }
  std::printf("%s: all %d checks passed\n", name, state().checks);
  return 0;
}

template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  os.precision(9);
  (os << ... << args);
  return os.str();
}

}  // namespace ssae_test

#define CHECK(cond)                                                    \
  do {                                                                 \
    ++ssae_test::state().checks;                                       \
    if (!(cond)) ssae_test::fail(__FILE__, __LINE__, #cond);           \
  } while (0)

// CHECK with the listed values printed on failure.
#define CHECK_MSG(cond, ...)                                                                     \
  do {                                                                                           \
    ++ssae_test::state().checks;                                                                 \
    if (!(cond)) ssae_test::fail(__FILE__, __LINE__, std::string(#cond) + ": " + ssae_test::str(__VA_ARGS__)); \
  } while (0)

// |got - want| <= tol, and NaN only where NaN is wanted.
#define CHECK_NEAR(got, want, tol)                                                                   \
  do {                                                                                               \
    const double g_ = double(got), w_ = double(want), t_ = double(tol);                              \
    CHECK_MSG((std::isnan(g_) && std::isnan(w_)) || (g_ == w_) || std::fabs(g_ - w_) <= t_, "got ", g_, \
              " want ", w_, " tol ", t_);                                                            \
  } while (0)

namespace ssae_test {

// A [rows, ldc] tile of dot products against sums in double: out[r * ldc + c] within
// tolerance(magnitude, want) of want = sum_t a(r, t) * b(c, t) (magnitude: the sum of |terms|),
// and the padding columns [cols, ldc) of each row untouched (still `sentinel`).
template <class A, class B, class Tolerance>
void check_products(const float* out, int64_t rows, int64_t cols, int64_t ldc, int64_t d, float sentinel, A&& a,
                    B&& b, Tolerance&& tolerance) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      double want = 0, magnitude = 0;
      for (int64_t t = 0; t < d; ++t) {
        const double term = double(a(r, t)) * double(b(c, t));
        want += term;
        magnitude += std::fabs(term);
      }
      CHECK_NEAR(out[r * ldc + c], want, tolerance(magnitude, want));
    }
    for (int64_t c = cols; c < ldc; ++c) CHECK_MSG(out[r * ldc + c] == sentinel, "padding r=", r, " c=", c);
  }
}

}  // namespace ssae_test
