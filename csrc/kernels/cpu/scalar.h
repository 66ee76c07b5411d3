// Storage types for the torch-free CPU kernels and their float conversions.
// bfloat16 and float16 are stored as raw bits; arithmetic always happens in
// the accumulation type (float, or double for float64 inputs).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

// Hot loops are compiled for AVX-512 (x86-64-v4), AVX2+FMA (x86-64-v3) and the
// baseline, and the best the CPU supports is picked when the library loads.
// OpenMP regions stay outside multiversioned functions: GCC outlines them
// before cloning, so their bodies would only get the baseline ISA.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SSAE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SSAE_MULTIVERSION
#endif

namespace ssae::cpu {

// Calls with less work than this (multiply-adds, or element visits) run on the
// calling thread: an OpenMP region costs microseconds to start, and waits for
// a thread whose core another process holds. Small calls are what the
// per-call overhead of the ops is measured on (benchmarks/bench_overhead.py).
constexpr int64_t kParallelWork = int64_t(1) << 16;
inline bool parallel_worth(int64_t work) { return work >= kParallelWork; }

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

// Accumulation type: float32 for every dtype except float64.
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };
template <typename T> using acc_t = typename acc<T>::type;

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(bf16 h) { return bits_to_float(uint32_t(h.bits) << 16); }

inline bf16 bf16_from_float(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{uint16_t(u >> 16)};
}

inline float to_float(f16 h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t man = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {  // zero or subnormal: value = man * 2^-24
    const float mag = float(man) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline f16 f16_from_float(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};   // NaN
  if (a >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (a < 0x38800000u) {  // subnormal or zero in half: round |f| * 2^24 to an integer
    const float scaled = bits_to_float(a) * 16777216.0f;
    // adding 2^23 forces float rounding (to nearest even) at integer precision
    const uint32_t m = float_to_bits(scaled + 8388608.0f) - 0x4b000000u;
    return f16{uint16_t(sign | m)};
  }
  // normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even
  uint32_t r = a - 0x38000000u;
  r += 0xfffu + ((r >> 13) & 1u);
  return f16{uint16_t(sign | (r >> 13))};
}

template <typename A> inline A load(float v) { return A(v); }
template <typename A> inline A load(double v) { return A(v); }
template <typename A> inline A load(bf16 v) { return A(to_float(v)); }
template <typename A> inline A load(f16 v) { return A(to_float(v)); }

template <typename T, typename A> inline T store(A v) {
  if constexpr (std::is_same_v<T, bf16>) return bf16_from_float(float(v));
  else if constexpr (std::is_same_v<T, f16>) return f16_from_float(float(v));
  else return T(v);
}

}  // namespace ssae::cpu
