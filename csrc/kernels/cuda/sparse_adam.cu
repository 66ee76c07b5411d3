#include <cmath>
#include <cstdint>

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

// kVec consecutive floats, loaded and stored as one access (16 bytes for kVec = 4).
template <int kVec>
struct alignas(4 * kVec) Pack {
  float x[kVec];
};

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

template <int kVec, bool kGrad>
__global__ void __launch_bounds__(kThreads) sparse_adam_kernel(AdamRows a, Hyper h, int row_threads) {
  const int64_t r = int64_t(blockIdx.x) * (kThreads / row_threads) + threadIdx.x / row_threads;
  if (r >= a.num_rows) return;
  const int64_t row = a.rows[r];
  if (row < 0 || row >= a.num_latents) return;  // out of range: left alone
  const float* cu = a.catchup + 4 * r;
  const Catchup c{cu[0], cu[1], cu[2], cu[3]};
  using P = Pack<kVec>;
  P* __restrict__ p = reinterpret_cast<P*>(a.param + row * a.ld_param);
  P* __restrict__ m = reinterpret_cast<P*>(a.exp_avg + row * a.ld_exp_avg);
  P* __restrict__ v = reinterpret_cast<P*>(a.exp_avg_sq + row * a.ld_exp_avg_sq);
  const P* __restrict__ g = kGrad ? reinterpret_cast<const P*>(a.grad + r * a.ld_grad) : nullptr;
  const int64_t packs = a.d / kVec;
  for (int64_t i = threadIdx.x % row_threads; i < packs; i += row_threads) {
    P pi = p[i], mi = m[i], vi = v[i], gi{};
    if constexpr (kGrad) gi = g[i];
#pragma unroll
    for (int j = 0; j < kVec; ++j) adam_element<kGrad>(pi.x[j], mi.x[j], vi.x[j], gi.x[j], c, h);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

template <int kVec>
cudaError_t launch(const AdamRows& a, const Hyper& h, cudaStream_t stream) {
  const int row_threads = int(std::min<int64_t>(next_pow2(a.d / kVec), kThreads));
  const int64_t blocks = ceil_div(a.num_rows, kThreads / row_threads);
  if (blocks > kMaxGrid) return cudaErrorInvalidValue;
  if (a.grad)
    sparse_adam_kernel<kVec, true><<<unsigned(blocks), kThreads, 0, stream>>>(a, h, row_threads);
  else
    sparse_adam_kernel<kVec, false><<<unsigned(blocks), kThreads, 0, stream>>>(a, h, row_threads);
  return cudaGetLastError();
}

// Whether every row (d floats at ptr + row * ld) starts on a 16-byte boundary and is whole packs of 4.
bool vec4_rows(const void* ptr, int64_t ld, int64_t d) {
  return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0 && ld % 4 == 0 && d % 4 == 0;
}

}  // namespace

cudaError_t sparse_adam(const AdamRows& a, cudaStream_t stream) {
  if (a.num_rows == 0 || a.d == 0) return cudaSuccess;
  if (a.num_rows < 0 || a.d < 0) return cudaErrorInvalidValue;
  // Bias corrections in double, as torch.optim.Adam computes them, then rounded once.
  const float beta1 = float(a.beta1), beta2 = float(a.beta2);
  const Hyper h{beta1, beta2, 1.0f - beta1, 1.0f - beta2,
                float(a.lr / (1.0 - std::pow(a.beta1, double(a.step)))),
                float(std::sqrt(1.0 - std::pow(a.beta2, double(a.step)))), float(a.eps)};
  const bool vec4 = vec4_rows(a.param, a.ld_param, a.d) && vec4_rows(a.exp_avg, a.ld_exp_avg, a.d) &&
                    vec4_rows(a.exp_avg_sq, a.ld_exp_avg_sq, a.d) && (!a.grad || vec4_rows(a.grad, a.ld_grad, a.d));
  return vec4 ? launch<4>(a, h, stream) : launch<1>(a, h, stream);
}

}  // namespace ssae::cuda
