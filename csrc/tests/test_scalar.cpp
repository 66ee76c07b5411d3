// bfloat16 / float16 conversions of csrc/kernels/cpu/scalar.h against naive
// definitions: decode by ldexp, encode by picking the nearest representable
// value (ties to the even bit pattern) from an independently built table.
#include "../kernels/cpu/scalar.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "test_util.h"

using ssae::cpu::bf16;
using ssae::cpu::bits_to_float;
using ssae::cpu::f16;
using ssae::cpu::float_to_bits;

namespace {

bool is_nan16(uint16_t h, int exp_bits) {
  const int man_bits = 15 - exp_bits;
  const uint16_t exp_mask = uint16_t(((1u << exp_bits) - 1) << man_bits);
  return (h & exp_mask) == exp_mask && (h & ((1u << man_bits) - 1)) != 0;
}

// Value of a 16-bit float with the given exponent width (5: float16, 8: bfloat16).
double decode16(uint16_t h, int exp_bits) {
  const int man_bits = 15 - exp_bits;
  const int bias = (1 << (exp_bits - 1)) - 1;
  const int e = (h >> man_bits) & ((1 << exp_bits) - 1);
  const int m = h & ((1 << man_bits) - 1);
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (e == (1 << exp_bits) - 1) return m ? std::nan("") : sign * INFINITY;
  if (e == 0) return sign * std::ldexp(double(m), 1 - bias - man_bits);
  return sign * std::ldexp(double(m + (1 << man_bits)), e - bias - man_bits);
}

// Non-negative magnitudes of every finite pattern 0 .. max, in increasing
// order (the pattern is the position), then the value the next pattern would
// have without an exponent limit: halfway to it is where rounding reaches inf.
std::vector<double> magnitude_table(int exp_bits) {
  const int man_bits = 15 - exp_bits;
  const uint16_t inf = uint16_t(((1u << exp_bits) - 1) << man_bits);
  std::vector<double> t;
  for (uint32_t h = 0; h < inf; ++h) t.push_back(decode16(uint16_t(h), exp_bits));
  const int bias = (1 << (exp_bits - 1)) - 1;
  t.push_back(std::ldexp(1.0, bias + 1));
  return t;
}

// Round-to-nearest-even encoding of f by search in the table.
uint16_t naive_encode(float f, int exp_bits, const std::vector<double>& table) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const uint16_t inf = uint16_t(table.size() - 1);
  if (std::isnan(f)) return uint16_t(sign | inf | 1);  // any NaN; compared as "is NaN"
  const double a = std::fabs(double(f));
  if (a >= table.back()) return uint16_t(sign | inf);
  const size_t hi = size_t(std::upper_bound(table.begin(), table.end(), a) - table.begin());
  const size_t lo = hi - 1;  // table[lo] <= a < table[hi]
  const double dl = a - table[lo], dh = table[hi] - a;
  size_t pick = dl < dh ? lo : dh < dl ? hi : (lo % 2 == 0 ? lo : hi);
  (void)exp_bits;
  return uint16_t(sign | uint16_t(pick));  // pick == inf means it rounded up to infinity
}

void check_encode(float f, const std::vector<double>& bf_table, const std::vector<double>& h_table) {
  const uint16_t want_bf = naive_encode(f, 8, bf_table), got_bf = ssae::cpu::bf16_from_float(f).bits;
  const uint16_t want_h = naive_encode(f, 5, h_table), got_h = ssae::cpu::f16_from_float(f).bits;
  if (std::isnan(f)) {
    CHECK_MSG(is_nan16(got_bf, 8) && (got_bf & 0x8000) == (want_bf & 0x8000), "bf16 of NaN bits ",
              float_to_bits(f), " gave ", got_bf);
    CHECK_MSG(is_nan16(got_h, 5) && (got_h & 0x8000) == (want_h & 0x8000), "f16 of NaN bits ",
              float_to_bits(f), " gave ", got_h);
    // NaN must come out quiet (top mantissa bit set), whatever payload it had.
    CHECK_MSG(got_bf & 0x40, "bf16 NaN not quiet: ", got_bf);
    CHECK_MSG(got_h & 0x200, "f16 NaN not quiet: ", got_h);
    return;
  }
  CHECK_MSG(got_bf == want_bf, "bf16 of ", f, " (bits ", float_to_bits(f), "): got ", got_bf, " want ", want_bf);
  CHECK_MSG(got_h == want_h, "f16 of ", f, " (bits ", float_to_bits(f), "): got ", got_h, " want ", want_h);
#ifdef __FLT16_MAX__
  // A third opinion: the compiler's own float -> _Float16 conversion.
  const _Float16 c = static_cast<_Float16>(f);
  uint16_t cb;
  std::memcpy(&cb, &c, 2);
  CHECK_MSG(got_h == cb, "f16 of ", f, ": got ", got_h, ", compiler gives ", cb);
#endif
}

}  // namespace

int main() {
  const auto bf_table = magnitude_table(8);
  const auto h_table = magnitude_table(5);

  ssae_test::context("decode every 16-bit pattern");
  for (uint32_t h = 0; h < 65536; ++h) {
    const double want_h = decode16(uint16_t(h), 5), want_bf = decode16(uint16_t(h), 8);
    const float got_h = ssae::cpu::to_float(f16{uint16_t(h)}), got_bf = ssae::cpu::to_float(bf16{uint16_t(h)});
    if (std::isnan(want_h)) CHECK_MSG(std::isnan(got_h), "f16 pattern ", h);
    else CHECK_MSG(double(got_h) == want_h && std::signbit(got_h) == bool(h & 0x8000), "f16 pattern ", h, " got ", got_h);
    if (std::isnan(want_bf)) CHECK_MSG(std::isnan(got_bf), "bf16 pattern ", h);
    else CHECK_MSG(double(got_bf) == want_bf && std::signbit(got_bf) == bool(h & 0x8000), "bf16 pattern ", h);
  }

  ssae_test::context("every representable value round-trips");
  for (uint32_t h = 0; h < 65536; ++h) {
    if (!is_nan16(uint16_t(h), 5))
      CHECK_MSG(ssae::cpu::f16_from_float(ssae::cpu::to_float(f16{uint16_t(h)})).bits == h, "f16 ", h);
    if (!is_nan16(uint16_t(h), 8))
      CHECK_MSG(ssae::cpu::bf16_from_float(ssae::cpu::to_float(bf16{uint16_t(h)})).bits == h, "bf16 ", h);
  }

  ssae_test::context("midpoints and their float neighbours (ties to even, carries, overflow)");
  for (const auto* table : {&bf_table, &h_table}) {
    for (size_t i = 0; i + 1 < table->size(); ++i) {
      const float a = float((*table)[i]), b = float((*table)[i + 1]);
      const float mid = float(((*table)[i] + (*table)[i + 1]) / 2);  // exact: one more bit than a or b
      for (float f : {a, b, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY),
                      std::nextafter(a, INFINITY), std::nextafter(b, 0.0f)}) {
        check_encode(f, bf_table, h_table);
        check_encode(-f, bf_table, h_table);
      }
    }
  }

  ssae_test::context("special values");
  for (uint32_t u : {0x00000000u, 0x80000000u, 0x00000001u, 0x007fffffu, 0x00800000u,  // zeros, float subnormals
                     0x7f800000u, 0xff800000u, 0x7f7fffffu, 0xff7fffffu,              // inf, float max
                     0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fbfffffu, 0x7fffffffu,  // NaNs
                     0x33000000u, 0x33000001u, 0x33400000u, 0x32ffffffu,              // around half the smallest f16 subnormal
                     0x38800000u, 0x387fffffu, 0x477fe000u, 0x477ff000u, 0x477fefffu, 0x477fffffu})  // f16 normal min / max
    check_encode(bits_to_float(u), bf_table, h_table);

  ssae_test::context("random bit patterns");
  std::mt19937 rng(1234);
  for (int i = 0; i < 1000000; ++i) check_encode(bits_to_float(uint32_t(rng())), bf_table, h_table);
  std::uniform_real_distribution<float> unit(-4.0f, 4.0f);
  for (int i = 0; i < 200000; ++i) check_encode(unit(rng), bf_table, h_table);

  ssae_test::context("load / store helpers");
  CHECK(ssae::cpu::load<float>(bf16{0x3f80}) == 1.0f);
  CHECK(ssae::cpu::load<double>(f16{0x3c00}) == 1.0);
  CHECK((ssae::cpu::store<bf16, float>(1.0f).bits == 0x3f80));
  CHECK((ssae::cpu::store<f16, float>(-2.0f).bits == 0xc000));
  CHECK((ssae::cpu::store<double, double>(0.1) == 0.1));

  return ssae_test::finish("test_scalar");
}
