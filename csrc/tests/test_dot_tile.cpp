// dot_tile (csrc/kernels/cpu/dot_tile.h) against naive loops accumulating in
// double: row and latent counts around the 4 x 4 register block, d around the
// 16-lane vectors (masked tails), padded output rows with the padding kept.
#include "../kernels/cpu/dot_tile.h"

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "test_util.h"
#include "tolerance.h"

namespace {

std::mt19937 rng(5);

void run(int64_t rows, int64_t cols, int64_t d, int64_t pad) {
  ssae_test::context(ssae_test::str("rows=", rows, " cols=", cols, " d=", d, " pad=", pad,
                                    " fast=", ssae::cpu::dot_tile_fast()));
  const auto a = ssae_test::random_values<float>(size_t(rows * d), rng);
  const auto b = ssae_test::random_values<float>(size_t(cols * d), rng);
  const int64_t ldc = cols + pad;
  const float sentinel = 7.5f;
  std::vector<float> c(size_t(rows * ldc), sentinel);
  ssae::cpu::dot_tile(rows, cols, d, a.data(), b.data(), c.data(), ldc);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      double want = 0, magnitude = 0;
      for (int64_t t = 0; t < d; ++t) {
        const double term = double(a[size_t(r * d + t)]) * double(b[size_t(j * d + t)]);
        want += term;
        magnitude += std::fabs(term);
      }
      CHECK_NEAR(c[size_t(r * ldc + j)], want, ssae_test::sum_tolerance<float>(d, magnitude, want));
    }
    for (int64_t j = cols; j < ldc; ++j) CHECK_MSG(c[size_t(r * ldc + j)] == sentinel, "padding at r=", r, " j=", j);
  }
}

}  // namespace

int main() {
  for (int64_t rows : {1, 2, 3, 4, 5, 7, 8, 9, 20})
    for (int64_t cols : {1, 2, 3, 4, 5, 6, 9, 17})
      for (int64_t d : {1, 3, 15, 16, 17, 31, 32, 33, 384, 385}) run(rows, cols, d, (rows + cols) % 3);
  run(20, 1000, 384, 5);  // the retrieval shape's block
  return ssae_test::finish("test_dot_tile");
}
