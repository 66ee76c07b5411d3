#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../stochastic_round.h"
#include "launch.h"
#include "sparse_adam.cuh"

namespace ssae::cuda {
namespace {

// Each row is updated by row_threads consecutive threads of a 256-thread block (a power
// of two, <= 256: one row per block for long rows, several for short ones), which walk
// its d / kVec packs in turn, so a warp reads whole stretches of a row (coalesced).
constexpr int kThreads = 256;

// The step's constants, rounded to float once (as the CPU kernel does).
struct Hyper {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps;
};

struct Catchup {
  float drift, decay1, decay2, eps_skip;
};

// kVec consecutive elements, loaded and stored as one access (16 bytes for float and kVec = 4).
template <typename E, int kVec>
struct alignas(sizeof(E) * kVec) Pack {
  E x[kVec];
};

// A moment as held: float, or the bits of a bfloat16 (stored with stochastic rounding).
__device__ __forceinline__ float get(float s) { return s; }
__device__ __forceinline__ float get(uint16_t s) { return __uint_as_float(uint32_t(s) << 16); }
__device__ __forceinline__ void put(float& s, float x, uint32_t) { s = x; }
__device__ __forceinline__ void put(uint16_t& s, float x, uint32_t random16) {
  s = bf16_bits_stochastic(__float_as_uint(x), random16);
}

// One element's catch-up and update, in the CPU kernel's order of operations.
template <bool kGrad>
__device__ __forceinline__ void adam_element(float& p, float& m, float& v, float g, const Catchup& c,
                                             const Hyper& h) {
  // Where m is zero the skipped steps moved nothing (0 / 0 otherwise).
  const float skipped = m == 0.0f ? 0.0f : c.drift * m / (sqrtf(v) + c.eps_skip);
  if constexpr (kGrad) {
    m = h.beta1 * c.decay1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * c.decay2 * v + h.one_minus_beta2 * g * g;
    // torch.optim.Adam's order of operations: p - step_size * (m / (sqrt(v) / sqrt(bc2) + eps))
    p = p - skipped - h.step_size * (m / (sqrtf(v) / h.bc2_sqrt + h.eps));
  } else {
    p -= skipped;
    m *= c.decay1;
    v *= c.decay2;
  }
}

template <typename S, int kVec, bool kGrad>
__global__ void __launch_bounds__(kThreads) sparse_adam_kernel(AdamRows<S> a, Hyper h, int row_threads) {
  const int64_t r = int64_t(blockIdx.x) * (kThreads / row_threads) + threadIdx.x / row_threads;
  if (r >= a.num_rows) return;
  const int64_t row = a.rows[r];
  if (row < 0 || row >= a.num_latents) return;  // out of range: left alone
  const float* cu = a.catchup + 4 * r;
  const Catchup c{cu[0], cu[1], cu[2], cu[3]};
  using P = Pack<float, kVec>;
  using Q = Pack<S, kVec>;
  P* __restrict__ p = reinterpret_cast<P*>(a.param + row * a.ld_param);
  Q* __restrict__ m = reinterpret_cast<Q*>(a.exp_avg + row * a.ld_exp_avg);
  Q* __restrict__ v = reinterpret_cast<Q*>(a.exp_avg_sq + row * a.ld_exp_avg_sq);
  const P* __restrict__ g = kGrad ? reinterpret_cast<const P*>(a.grad + r * a.ld_grad) : nullptr;
  const uint32_t row_key = row_bits(call_key(a.seed, a.step), row);
  const int64_t packs = a.d / kVec;
  for (int64_t i = threadIdx.x % row_threads; i < packs; i += row_threads) {
    P pi = p[i], gi{};
    Q mi = m[i], vi = v[i];
    if constexpr (kGrad) gi = g[i];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float mj = get(mi.x[j]), vj = get(vi.x[j]);
      adam_element<kGrad>(pi.x[j], mj, vj, gi.x[j], c, h);
      const uint32_t bits = std::is_same_v<S, float> ? 0u : element_bits(row_key, i * kVec + j);
      put(mi.x[j], mj, bits & 0xffffu);
      put(vi.x[j], vj, bits >> 16);
    }
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

template <typename S, int kVec>
cudaError_t launch(const AdamRows<S>& a, const Hyper& h, cudaStream_t stream) {
  const int row_threads = int(std::min<int64_t>(next_pow2(a.d / kVec), kThreads));
  const int64_t blocks = ceil_div(a.num_rows, kThreads / row_threads);
  if (blocks > kMaxGrid) return cudaErrorInvalidValue;
  if (a.grad)
    sparse_adam_kernel<S, kVec, true><<<unsigned(blocks), kThreads, 0, stream>>>(a, h, row_threads);
  else
    sparse_adam_kernel<S, kVec, false><<<unsigned(blocks), kThreads, 0, stream>>>(a, h, row_threads);
  return cudaGetLastError();
}

// Whether every row (d elements at ptr + row * ld) starts on a 4-element boundary and is whole packs of 4.
template <typename E>
bool vec4_rows(const E* ptr, int64_t ld, int64_t d) {
  return reinterpret_cast<std::uintptr_t>(ptr) % (4 * sizeof(E)) == 0 && ld % 4 == 0 && d % 4 == 0;
}

}  // namespace

template <typename S>
cudaError_t sparse_adam(const AdamRows<S>& a, cudaStream_t stream) {
  if (a.num_rows == 0 || a.d == 0) return cudaSuccess;
  if (a.num_rows < 0 || a.d < 0) return cudaErrorInvalidValue;
  // Bias corrections in double, as torch.optim.Adam computes them, then rounded once.
  const float beta1 = float(a.beta1), beta2 = float(a.beta2);
  const Hyper h{beta1, beta2, 1.0f - beta1, 1.0f - beta2,
                float(a.lr / (1.0 - std::pow(a.beta1, double(a.step)))),
                float(std::sqrt(1.0 - std::pow(a.beta2, double(a.step)))), float(a.eps)};
  const bool vec4 = vec4_rows(a.param, a.ld_param, a.d) && vec4_rows(a.exp_avg, a.ld_exp_avg, a.d) &&
                    vec4_rows(a.exp_avg_sq, a.ld_exp_avg_sq, a.d) && (!a.grad || vec4_rows(a.grad, a.ld_grad, a.d));
  return vec4 ? launch<S, 4>(a, h, stream) : launch<S, 1>(a, h, stream);
}

template cudaError_t sparse_adam<float>(const AdamRows<float>&, cudaStream_t);
template cudaError_t sparse_adam<uint16_t>(const AdamRows<uint16_t>&, cudaStream_t);

}  // namespace ssae::cuda
