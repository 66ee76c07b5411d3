// Stochastic rounding of float32 to bfloat16, shared by the CPU and CUDA kernels (the Triton
// kernel and the PyTorch reference in ssae_kernels/ops/sparse_adam.py compute the same bits).
//
// A value rounds up to the next bfloat16 with probability equal to its distance from the one
// below, so a long run of small updates (a moment decaying by 0.999 a step) moves the stored
// value in expectation instead of rounding back to where it was. The 32 random bits of an
// element are a hash of (seed, step, row, column): every backend, and every rerun, rounds an
// element the same way, and no generator state has to be kept or checkpointed.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SSAE_ROUND_HD __host__ __device__ __forceinline__
#else
#define SSAE_ROUND_HD inline
#endif

namespace ssae {

// A bijective 32-bit mix with full avalanche (Wellons' "lowbias32").
SSAE_ROUND_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The bits of element (row, col) in a call: row_bits(call_key(seed, step), row) once per row, then
// element_bits per element. Two draws of 16 bits each come from one element's 32.
SSAE_ROUND_HD uint32_t call_key(int64_t seed, int64_t step) {
  return mix32(uint32_t(seed) * 0x9e3779b9u + uint32_t(step));
}
SSAE_ROUND_HD uint32_t row_bits(uint32_t key, int64_t row) { return mix32(key ^ uint32_t(row)); }
SSAE_ROUND_HD uint32_t element_bits(uint32_t row_key, int64_t col) { return mix32(row_key ^ uint32_t(col)); }

// The bfloat16 bits of the float32 with bits u, rounded up with probability (low 16 bits of u) / 2^16
// given random16 uniform in [0, 2^16). Infinities stay; NaN becomes a quiet NaN.
SSAE_ROUND_HD uint16_t bf16_bits_stochastic(uint32_t u, uint32_t random16) {
  const bool special = (u & 0x7f800000u) == 0x7f800000u;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return uint16_t(nan ? (u >> 16) | 0x40u : (special ? u : u + random16) >> 16);
}

}  // namespace ssae
