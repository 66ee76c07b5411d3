// Random inputs and error bounds shared by the kernel tests.
//
// Kernels accumulate in float32 (float64 for double) and store in the input
// type. For a sum of n terms the recursive-summation bound is
// |error| <= n * u_acc * sum |terms|; storing adds u_out * |result|. Both are
// worst-case bounds, so a kernel that drops, repeats or misplaces a term
// fails them while every legal summation order passes.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <type_traits>
#include <vector>

#include "../kernels/cpu/scalar.h"

namespace ssae_test {

template <typename T>
double to_double(T v) {
  return ssae::cpu::load<double>(v);
}

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  else if constexpr (std::is_same_v<T, double>) return "float64";
  else if constexpr (std::is_same_v<T, ssae::cpu::bf16>) return "bfloat16";
  else return "float16";
}

// Unit roundoff of the accumulation type and of the storage type.
template <typename T>
double acc_unit() {
  return std::is_same_v<T, double> ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
}
template <typename T>
double store_unit() {
  if constexpr (std::is_same_v<T, double>) return std::ldexp(1.0, -53);
  else if constexpr (std::is_same_v<T, float>) return std::ldexp(1.0, -24);
  else if constexpr (std::is_same_v<T, ssae::cpu::bf16>) return std::ldexp(1.0, -8);
  else return std::ldexp(1.0, -11);
}

// Bound on |kernel - exact| for a sum of n terms with sum |terms| = magnitude.
template <typename T>
double sum_tolerance(int64_t n, double magnitude, double exact) {
  const double acc = double(n) * acc_unit<T>() * magnitude;
  // float16 results below 2^-14 are subnormal: absolute spacing 2^-24.
  const double tiny = std::is_same_v<T, ssae::cpu::f16> ? std::ldexp(1.0, -25) : 0.0;
  return acc + store_unit<T>() * (std::fabs(exact) + acc) + tiny;
}

// Values in [-2, 2), rounded to T (the kernel and the naive loop read the same values).
template <typename T>
std::vector<T> random_values(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<T> v(n);
  for (auto& x : v) x = ssae::cpu::store<T, double>(double(dist(rng)));
  return v;
}

}  // namespace ssae_test
