// The bfloat16 screen of the float32 encode (dot_tile.h, topk_encode.h):
//   - dot_tile_one and dot_tile_gather repeat dot_tile's value bit for bit;
//   - dot_tile_bf16 on packed panels sums the bfloat16 products, any shape;
//   - the screen's bound holds on every pair, for inputs built to stress it
//     (rounding midpoints, huge and tiny magnitudes, subnormals, cancellation);
//   - TopKSelector::consume_screened leaves the selection exactly as consume()
//     of the exact tiles does: ties, NaN and infinities, a first tile shorter
//     than k, latents of every magnitude.
// Needs AVX512_BF16 for the screen (AVX-512F for the exact parts): elsewhere it
// says what it skipped.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "../kernels/cpu/dot_tile.h"
#include "../kernels/cpu/topk_encode.h"
#include "test_util.h"

namespace {

using ssae::cpu::Bf16Norms;
using ssae::cpu::ScreenCol;
using ssae::cpu::ScreenRow;

std::mt19937 rng(11);
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

enum class Kind { kNormal, kMidpoints, kWideRange, kSubnormal, kCancel };

// Values of one row or latent, of a kind chosen to stress the bound.
std::vector<float> make_values(int64_t d, Kind kind) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> exponent(-40, 40), coin(0, 1);
  std::vector<float> v(static_cast<size_t>(d));
  for (int64_t t = 0; t < d; ++t) {
    float x = normal(rng);
    switch (kind) {
      case Kind::kNormal: break;
      case Kind::kMidpoints: {  // halfway between two bfloat16 values: the largest rounding
        uint32_t u;
        std::memcpy(&u, &x, 4);
        u = (u & 0xffff0000u) | 0x8000u;
        std::memcpy(&x, &u, 4);
        break;
      }
      case Kind::kWideRange: x = std::ldexp(x, exponent(rng)); break;
      case Kind::kSubnormal: x = coin(rng) ? std::ldexp(x, -135) : std::ldexp(x, -60); break;
      case Kind::kCancel: x = (t % 2 ? -1.0f : 1.0f) * (1000.0f + std::ldexp(normal(rng), -10)); break;
    }
    v[size_t(t)] = x;
  }
  return v;
}

Kind any_kind() { return Kind(std::uniform_int_distribution<int>(0, 4)(rng)); }

int64_t round32(int64_t d) { return (d + 31) / 32 * 32; }

void check_exact_dots(int64_t d) {
  ssae_test::context(ssae_test::str("dot_tile_one d=", d));
  const int64_t rows = 5, cols = 9;
  std::vector<float> a, b;
  for (int64_t r = 0; r < rows; ++r) for (float v : make_values(d, any_kind())) a.push_back(v);
  for (int64_t c = 0; c < cols; ++c) for (float v : make_values(d, any_kind())) b.push_back(v);
  std::vector<float> tile(static_cast<size_t>(rows * cols));
  ssae::cpu::dot_tile(rows, cols, d, a.data(), b.data(), tile.data(), cols);
  std::vector<int32_t> order{8, 0, 3, 3, 7, 1, 2, 5, 4, 6, 0};
  std::vector<float> gathered(order.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float one = ssae::cpu::dot_tile_one(d, &a[size_t(r * d)], &b[size_t(c * d)]);
      const float want = tile[size_t(r * cols + c)];
      CHECK_MSG(std::memcmp(&one, &want, 4) == 0, "r=", r, " c=", c, " one=", one, " tile=", want);
    }
    ssae::cpu::dot_tile_gather(d, &a[size_t(r * d)], b.data(), order.data(), int64_t(order.size()), gathered.data());
    for (size_t i = 0; i < order.size(); ++i) {
      const float want = tile[size_t(r * cols + order[i])];
      CHECK_MSG(std::memcmp(&gathered[i], &want, 4) == 0, "gather r=", r, " i=", i);
    }
  }
}

// Operands of a screened tile as the encode builds them.
struct Screened {
  std::vector<uint16_t> x16, w16;
  std::vector<float> row_a, row_b, col_a, col_b, col_reach, scores;
};

Screened screen(int64_t rows, int64_t cols, int64_t d, const std::vector<float>& x, const std::vector<float>& w,
                const std::vector<float>& bias) {
  const int64_t ld = round32(d);
  Screened s;
  s.x16.resize(size_t(rows * ld));
  s.w16.resize(size_t((cols + 15) / 16 * 16 * ld));
  for (int64_t r = 0; r < rows; ++r) {
    const ScreenRow b = ssae::cpu::screen_row(ssae::cpu::to_bf16_row(d, ld, &x[size_t(r * d)], &s.x16[size_t(r * ld)]), d);
    s.row_a.push_back(b.a);
    s.row_b.push_back(b.b);
  }
  std::vector<Bf16Norms> norms(static_cast<size_t>(cols));
  ssae::cpu::pack_bf16_panels(cols, d, ld, w.data(), s.w16.data(), norms.data());
  for (int64_t c = 0; c < cols; ++c) {
    const ScreenCol b = ssae::cpu::screen_col(norms[size_t(c)], bias[size_t(c)], d);
    s.col_a.push_back(b.a);
    s.col_b.push_back(b.b);
    s.col_reach.push_back(b.reach);
  }
  s.scores.resize(size_t(rows * cols));
  ssae::cpu::dot_tile_bf16(rows, cols, ld, s.x16.data(), s.w16.data(), s.scores.data(), cols);
  return s;
}

// dot_tile_bf16 on packed panels against sums in double of the same bfloat16
// values (to_bf16_row's rounding), and the packing of bfloat16 latents against
// that of their float32 originals.
void check_panels(int64_t rows, int64_t cols, int64_t d) {
  ssae_test::context(ssae_test::str("panels rows=", rows, " cols=", cols, " d=", d));
  const int64_t ld = round32(d), ldc = cols + 3;
  std::vector<float> x, w;
  for (int64_t r = 0; r < rows; ++r) for (float v : make_values(d, Kind::kNormal)) x.push_back(v);
  for (int64_t c = 0; c < cols; ++c) for (float v : make_values(d, Kind::kNormal)) w.push_back(v);
  std::vector<uint16_t> x16(size_t(rows * ld)), w16(size_t(cols * ld)), from_bf16(size_t(cols * d));
  std::vector<uint16_t> panels(size_t((cols + 15) / 16 * 16 * ld)), panels16(panels.size());
  std::vector<Bf16Norms> norms(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) ssae::cpu::to_bf16_row(d, ld, &x[size_t(r * d)], &x16[size_t(r * ld)]);
  for (int64_t c = 0; c < cols; ++c) {
    const Bf16Norms n = ssae::cpu::to_bf16_row(d, ld, &w[size_t(c * d)], &w16[size_t(c * ld)]);
    std::copy(&w16[size_t(c * ld)], &w16[size_t(c * ld + d)], &from_bf16[size_t(c * d)]);
    norms[size_t(c)] = n;
  }
  std::vector<Bf16Norms> packed_norms(static_cast<size_t>(cols));
  ssae::cpu::pack_bf16_panels(cols, d, ld, w.data(), panels.data(), packed_norms.data());
  ssae::cpu::pack_bf16_panels(cols, d, ld, from_bf16.data(), panels16.data());
  CHECK(panels == panels16);
  for (int64_t c = 0; c < cols; ++c) {
    CHECK_NEAR(packed_norms[size_t(c)].sum_sq, norms[size_t(c)].sum_sq, 1e-5 * norms[size_t(c)].sum_sq);
    CHECK_NEAR(packed_norms[size_t(c)].residual_sq, norms[size_t(c)].residual_sq, 1e-5 * norms[size_t(c)].residual_sq);
  }
  const float sentinel = 7.5f;
  std::vector<float> out(size_t(rows * ldc), sentinel);
  ssae::cpu::dot_tile_bf16(rows, cols, ld, x16.data(), panels.data(), out.data(), ldc);
  const auto value = [](uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return double(f); };
  ssae_test::check_products(
      out.data(), rows, cols, ldc, d, sentinel, [&](int64_t r, int64_t t) { return value(x16[size_t(r * ld + t)]); },
      [&](int64_t c, int64_t t) { return value(w16[size_t(c * ld + t)]); },
      [](double magnitude, double) { return 1e-6 * magnitude + 1e-30; });
}

void check_bound(int64_t d) {
  ssae_test::context(ssae_test::str("bound d=", d));
  const int64_t rows = 24, cols = 40;
  std::vector<float> x, w, bias(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) for (float v : make_values(d, any_kind())) x.push_back(v);
  for (int64_t c = 0; c < cols; ++c) {
    // Some latents are a row's own values (large scores, strong cancellation).
    const auto v = c < 4 ? std::vector<float>(x.begin() + c * d, x.begin() + (c + 1) * d) : make_values(d, any_kind());
    w.insert(w.end(), v.begin(), v.end());
    bias[size_t(c)] = std::normal_distribution<float>()(rng) * (c % 3 == 0 ? 1e6f : 1.0f);
  }
  const Screened s = screen(rows, cols, d, x, w, bias);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const double exact = ssae::cpu::dot_tile_one(d, &x[size_t(r * d)], &w[size_t(c * d)]);
      const double approx = s.scores[size_t(r * cols + c)];
      const double bound = double(s.row_a[size_t(r)]) * s.col_a[size_t(c)] +
                           double(s.row_b[size_t(r)]) * s.col_b[size_t(c)] + (double(s.col_reach[size_t(c)]) - bias[size_t(c)]);
      CHECK_MSG(std::fabs(approx - exact) <= bound, "r=", r, " c=", c, " screen=", approx, " exact=", exact,
                " bound=", bound);
    }
}

// consume() of exact tiles against consume_screened() of screened ones, tile by
// tile, then finish(): the same values (bits) and indices.
void check_selection(int64_t rows, int64_t M, int64_t d, int64_t k, int64_t tile, bool specials) {
  ssae_test::context(ssae_test::str("selection rows=", rows, " M=", M, " d=", d, " k=", k, " tile=", tile,
                                    " specials=", specials));
  std::vector<float> x, w, bias(static_cast<size_t>(M));
  for (int64_t r = 0; r < rows; ++r) for (float v : make_values(d, r % 3 ? Kind::kNormal : any_kind())) x.push_back(v);
  std::uniform_int_distribution<int64_t> latent(0, M - 1);
  for (int64_t m = 0; m < M; ++m) {
    // Duplicated latents (exact ties) and small-integer biases (more ties).
    const int64_t twin = latent(rng) % std::max<int64_t>(m, 1);
    const auto v = m > 0 && m % 7 == 0 ? std::vector<float>(w.begin() + twin * d, w.begin() + (twin + 1) * d)
                                       : make_values(d, m % 5 ? Kind::kNormal : any_kind());
    w.insert(w.end(), v.begin(), v.end());
    bias[size_t(m)] = float(std::uniform_int_distribution<int>(-2, 2)(rng)) * 0.5f;
  }
  if (specials) {
    w[size_t(latent(rng) * d)] = kNaN;
    w[size_t(latent(rng) * d + d - 1)] = kInf;
    w[size_t(latent(rng) * d)] = 1e30f;  // norm past the screen's limit
    bias[size_t(latent(rng))] = -kInf;
    bias[size_t(latent(rng))] = kInf;
    bias[size_t(latent(rng))] = kNaN;
    x[size_t(1 * d + 2)] = -kInf;  // a row whose every latent goes to the exact score
  }
  ssae::cpu::TopKSelector<float> plain(rows, k), screened(rows, k);
  std::vector<float> exact(static_cast<size_t>(rows * tile));
  for (int64_t m0 = 0; m0 < M; m0 += tile) {
    const int64_t cols = std::min(tile, M - m0);
    const float* wt = &w[size_t(m0 * d)];
    ssae::cpu::dot_tile(rows, cols, d, x.data(), wt, exact.data(), tile);
    plain.consume(exact.data(), tile, 0, rows, m0, cols, &bias[size_t(m0)]);
    const std::vector<float> wv(wt, wt + cols * d), bv(bias.begin() + m0, bias.begin() + m0 + cols);
    const Screened s = screen(rows, cols, d, x, wv, bv);
    const ssae::cpu::ScreenTile st{s.scores.data(), cols, s.row_a.data(), s.row_b.data(), s.col_a.data(),
                                   s.col_b.data(), s.col_reach.data(), x.data(), wt, d};
    screened.consume_screened(st, 0, rows, m0, cols, &bias[size_t(m0)]);
  }
  std::vector<float> v0(size_t(rows * k)), v1(size_t(rows * k));
  std::vector<int64_t> i0(size_t(rows * k)), i1(size_t(rows * k));
  plain.finish<float>(v0.data(), i0.data());
  screened.finish<float>(v1.data(), i1.data());
  for (int64_t e = 0; e < rows * k; ++e) {
    CHECK_MSG(i0[size_t(e)] == i1[size_t(e)], "row ", e / k, " slot ", e % k, ": index ", i1[size_t(e)], " want ",
              i0[size_t(e)]);
    CHECK_MSG(std::memcmp(&v0[size_t(e)], &v1[size_t(e)], 4) == 0, "row ", e / k, " slot ", e % k, ": value ",
              v1[size_t(e)], " want ", v0[size_t(e)]);
  }
}

}  // namespace

int main() {
  if (!ssae::cpu::dot_tile_fast()) {
    std::printf("test_bf16_screen: skipped, this CPU has no AVX-512F (the screen and its exact rescoring need it)\n");
    return 0;
  }
  for (int64_t d : {1, 15, 16, 17, 33, 64, 100, 768}) check_exact_dots(d);
  if (!ssae::cpu::dot_tile_bf16_available()) {
    std::printf("test_bf16_screen: exact dots checked; the screen skipped, this CPU has no AVX512_BF16\n");
    return ssae_test::finish("test_bf16_screen");
  }
  for (int64_t rows : {1, 5, 12, 13, 25})
    for (int64_t cols : {1, 15, 16, 17, 32, 33, 70})
      for (int64_t d : {1, 31, 32, 33, 100}) check_panels(rows, cols, d);
  for (int64_t d : {1, 2, 31, 32, 33, 95, 256, 769}) check_bound(d);
  for (const bool specials : {false, true}) {
    check_selection(9, 500, 37, 8, 64, specials);
    check_selection(6, 300, 70, 1, 50, specials);
    check_selection(5, 400, 33, 40, 25, specials);  // first tiles shorter than k: the fill phase
    check_selection(4, 130, 16, 64, 130, specials);  // k up to the candidate capacity slack
    check_selection(17, 2000, 96, 16, 333, specials);
  }
  return ssae_test::finish("test_bf16_screen");
}
