#include "sparse_backward.h"

#include <vector>

namespace ssae::cpu {
namespace {

template <typename T>
[[gnu::always_inline]] inline void sampled_dot_row(const T* grad, const int64_t* indices, const T* W,
                                                   int64_t k, int64_t d, T* out) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < k; ++j) {
    const T* row = W + indices[j] * d;
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < d; ++t) s += load<A>(grad[t]) * load<A>(row[t]);
    out[j] = store<T, A>(s);
  }
}

template <typename T>
[[gnu::always_inline]] inline void accumulate_latent(const T* weights, const T* rows, int64_t k,
                                                     int64_t d, const int64_t* entries, int64_t count,
                                                     acc_t<T>* acc, T* out, T* colsum) {
  using A = acc_t<T>;
  for (int64_t t = 0; t < d; ++t) acc[t] = 0;
  A wsum = 0;
  for (int64_t e = 0; e < count; ++e) {
    const int64_t p = entries[e];
    const A w = load<A>(weights[p]);
    const T* row = rows + (p / k) * d;
    for (int64_t t = 0; t < d; ++t) acc[t] += w * load<A>(row[t]);
    wsum += w;
  }
  for (int64_t t = 0; t < d; ++t) out[t] = store<T, A>(acc[t]);
  if (colsum) *colsum = store<T, A>(wsum);
}

#define SSAE_SPARSE_ROWS(T)                                                                        \
  SSAE_MULTIVERSION void sampled_dot_mv(const T* g, const int64_t* ix, const T* W, int64_t k,      \
                                        int64_t d, T* out) {                                       \
    sampled_dot_row<T>(g, ix, W, k, d, out);                                                       \
  }                                                                                                \
  SSAE_MULTIVERSION void accumulate_latent_mv(const T* w, const T* rows, int64_t k, int64_t d,     \
                                              const int64_t* entries, int64_t count,               \
                                              acc_t<T>* acc, T* out, T* colsum) {                  \
    accumulate_latent<T>(w, rows, k, d, entries, count, acc, out, colsum);                         \
  }
SSAE_SPARSE_ROWS(float)
SSAE_SPARSE_ROWS(double)
SSAE_SPARSE_ROWS(bf16)
SSAE_SPARSE_ROWS(f16)
#undef SSAE_SPARSE_ROWS

}  // namespace

template <typename T>
void sampled_dot(const T* grad, const int64_t* indices, const T* W, int64_t rows, int64_t k,
                 int64_t d, T* out) {
#pragma omp parallel for schedule(static) if (parallel_worth(rows * k * d))
  for (int64_t n = 0; n < rows; ++n)
    sampled_dot_mv(grad + n * d, indices + n * k, W, k, d, out + n * k);
}

void latent_transpose(const int64_t* indices, int64_t count, int64_t num_latents,
                      int64_t* offsets, int64_t* order) {
  // Serial on purpose: O(count + num_latents) integer work, a few hundred
  // microseconds at N * k = 65536, far below the GEMM it follows.
  for (int64_t m = 0; m <= num_latents; ++m) offsets[m] = 0;
  for (int64_t p = 0; p < count; ++p) ++offsets[indices[p] + 1];
  for (int64_t m = 0; m < num_latents; ++m) offsets[m + 1] += offsets[m];
  std::vector<int64_t> cursor(offsets, offsets + num_latents);
  for (int64_t p = 0; p < count; ++p) order[cursor[indices[p]]++] = p;
}

template <typename T>
void sparse_transpose_matmul(const T* weights, const T* rows, int64_t k, int64_t d,
                             const int64_t* offsets, const int64_t* order, int64_t num_latents,
                             T* out, T* colsum) {
#pragma omp parallel if (parallel_worth(offsets[num_latents] * d + num_latents))
  {
    std::vector<acc_t<T>> acc(d);
    // Dynamic: latents fire very unevenly (dead ones own no entries at all).
#pragma omp for schedule(dynamic, 64)
    for (int64_t m = 0; m < num_latents; ++m)
      accumulate_latent_mv(weights, rows, k, d, order + offsets[m], offsets[m + 1] - offsets[m],
                           acc.data(), out + m * d, colsum ? colsum + m : nullptr);
  }
}

#define SSAE_INSTANTIATE(T)                                                                        \
  template void sampled_dot<T>(const T*, const int64_t*, const T*, int64_t, int64_t, int64_t, T*); \
  template void sparse_transpose_matmul<T>(const T*, const T*, int64_t, int64_t, const int64_t*,   \
                                           const int64_t*, int64_t, T*, T*);
SSAE_INSTANTIATE(float)
SSAE_INSTANTIATE(double)
SSAE_INSTANTIATE(bf16)
SSAE_INSTANTIATE(f16)
#undef SSAE_INSTANTIATE

}  // namespace ssae::cpu
