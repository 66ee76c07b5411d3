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
  ssae_test::check_products(
      c.data(), rows, cols, ldc, d, sentinel, [&](int64_t r, int64_t t) { return a[size_t(r * d + t)]; },
      [&](int64_t j, int64_t t) { return b[size_t(j * d + t)]; },
      [&](double magnitude, double want) { return ssae_test::sum_tolerance<float>(d, magnitude, want); });
}

}  // namespace

int main() {
  for (int64_t rows : {1, 2, 3, 4, 5, 7, 8, 9, 20})
    for (int64_t cols : {1, 2, 3, 4, 5, 6, 9, 17})
      for (int64_t d : {1, 3, 15, 16, 17, 31, 32, 33, 384, 385}) run(rows, cols, d, (rows + cols) % 3);
  run(20, 1000, 384, 5);  // the retrieval shape's block
  return ssae_test::finish("test_dot_tile");
}
