#include "sparse_decode.h"

#include <algorithm>
#include <vector>

namespace ssae::cpu {
namespace {

// acc[t] += sum_j values[j] * W[indices[j], t]: the decode loop every kernel here shares.
template <typename T>
[[gnu::always_inline]] inline void add_rows(const T* values, const int64_t* indices, const T* W, int64_t k,
                                            int64_t d, acc_t<T>* acc) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < k; ++j) {
    const A w = load<A>(values[j]);
    const T* row = W + indices[j] * d;
    for (int64_t t = 0; t < d; ++t) acc[t] += w * load<A>(row[t]);
  }
}

// acc = bias - x (bias may be null), then the decode added: x_hat - x.
template <typename T>
[[gnu::always_inline]] inline void decode_minus_x(const T* values, const int64_t* indices, const T* W,
                                                  const T* bias, const T* x, int64_t k, int64_t d, acc_t<T>* acc) {
  using A = acc_t<T>;
  for (int64_t t = 0; t < d; ++t) acc[t] = (bias ? load<A>(bias[t]) : A(0)) - load<A>(x[t]);
  add_rows(values, indices, W, k, d, acc);
}

template <typename T>
[[gnu::always_inline]] inline void decode_row(const T* values, const int64_t* indices, const T* W,
                                              const T* bias, int64_t k, int64_t d, acc_t<T>* acc, T* out) {
  using A = acc_t<T>;
  for (int64_t t = 0; t < d; ++t) acc[t] = bias ? load<A>(bias[t]) : A(0);
  add_rows(values, indices, W, k, d, acc);
  for (int64_t t = 0; t < d; ++t) out[t] = store<T, A>(acc[t]);
}

template <typename T>
[[gnu::always_inline]] inline acc_t<T> decode_sq_error_row(const T* values, const int64_t* indices, const T* W,
                                                           const T* bias, const T* x, int64_t k, int64_t d,
                                                           acc_t<T>* acc) {
  using A = acc_t<T>;
  decode_minus_x(values, indices, W, bias, x, k, d, acc);
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t t = 0; t < d; ++t) s += acc[t] * acc[t];
  return s;
}

// The second walk over the row's k W rows reads them from cache: at d = 768 they
// are 98 KB of float32, well inside the 2 MB L2 of a core here.
template <typename T>
[[gnu::always_inline]] inline void decode_residual_row(const T* values, const int64_t* indices, const T* W,
                                                       const T* bias, const T* x, acc_t<T> scale, int64_t k,
                                                       int64_t d, acc_t<T>* acc, T* residual, T* grad_values) {
  using A = acc_t<T>;
  decode_minus_x(values, indices, W, bias, x, k, d, acc);
  for (int64_t t = 0; t < d; ++t) {
    acc[t] *= scale;
    residual[t] = store<T, A>(acc[t]);
  }
  for (int64_t j = 0; j < k; ++j) {
    const T* row = W + indices[j] * d;
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < d; ++t) s += acc[t] * load<A>(row[t]);
    grad_values[j] = store<T, A>(s);
  }
}

#define SSAE_DECODE_ROW(T)                                                                      \
  SSAE_MULTIVERSION void decode_row_mv(const T* v, const int64_t* ix, const T* W, const T* b,   \
                                       int64_t k, int64_t d, acc_t<T>* acc, T* out) {           \
    decode_row<T>(v, ix, W, b, k, d, acc, out);                                                 \
  }                                                                                             \
  SSAE_MULTIVERSION acc_t<T> decode_sq_error_row_mv(const T* v, const int64_t* ix, const T* W,  \
                                                    const T* b, const T* x, int64_t k,         \
                                                    int64_t d, acc_t<T>* acc) {                \
    return decode_sq_error_row<T>(v, ix, W, b, x, k, d, acc);                                   \
  }                                                                                             \
  SSAE_MULTIVERSION void decode_residual_row_mv(const T* v, const int64_t* ix, const T* W,      \
                                                const T* b, const T* x, acc_t<T> scale,         \
                                                int64_t k, int64_t d, acc_t<T>* acc, T* res,    \
                                                T* gv) {                                        \
    decode_residual_row<T>(v, ix, W, b, x, scale, k, d, acc, res, gv);                          \
  }
SSAE_DECODE_ROW(float)
SSAE_DECODE_ROW(double)
SSAE_DECODE_ROW(bf16)
SSAE_DECODE_ROW(f16)
#undef SSAE_DECODE_ROW

}  // namespace

template <typename T>
void sparse_decode(const T* values, const int64_t* indices, const T* W, const T* bias,
                   int64_t rows, int64_t k, int64_t d, T* out) {
#pragma omp parallel if (parallel_worth(rows * k * d))
  {
    std::vector<acc_t<T>> acc(d);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < rows; ++n)
      decode_row_mv(values + n * k, indices + n * k, W, bias, k, d, acc.data(), out + n * d);
  }
}

template <typename T>
void sparse_decode_sq_error(const T* values, const int64_t* indices, const T* W, const T* bias,
                            const T* x, int64_t rows, int64_t k, int64_t d, acc_t<T>* out) {
#pragma omp parallel if (parallel_worth(rows * k * d))
  {
    std::vector<acc_t<T>> acc(d);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < rows; ++n)
      out[n] = decode_sq_error_row_mv(values + n * k, indices + n * k, W, bias, x + n * d, k, d, acc.data());
  }
}

template <typename T>
void sparse_decode_residual(const T* values, const int64_t* indices, const T* W, const T* bias, const T* x,
                            const acc_t<T>* scale, int64_t rows, int64_t k, int64_t d, T* residual,
                            T* grad_values) {
#pragma omp parallel if (parallel_worth(rows * k * d))
  {
    std::vector<acc_t<T>> acc(d);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < rows; ++n)
      decode_residual_row_mv(values + n * k, indices + n * k, W, bias, x + n * d, scale[n], k, d, acc.data(),
                             residual + n * d, grad_values + n * k);
  }
}

int64_t find_invalid_index(const int64_t* indices, int64_t count, int64_t num_latents) {
  int64_t first = count;
#pragma omp parallel for reduction(min : first) schedule(static) if (parallel_worth(count))
  for (int64_t p = 0; p < count; ++p)
    if (indices[p] < 0 || indices[p] >= num_latents) first = std::min(first, p);
  return first == count ? -1 : first;
}

template void sparse_decode<float>(const float*, const int64_t*, const float*, const float*, int64_t, int64_t, int64_t, float*);
template void sparse_decode<double>(const double*, const int64_t*, const double*, const double*, int64_t, int64_t, int64_t, double*);
template void sparse_decode<bf16>(const bf16*, const int64_t*, const bf16*, const bf16*, int64_t, int64_t, int64_t, bf16*);
template void sparse_decode<f16>(const f16*, const int64_t*, const f16*, const f16*, int64_t, int64_t, int64_t, f16*);
#define SSAE_INSTANTIATE(T)                                                                            \
  template void sparse_decode_sq_error<T>(const T*, const int64_t*, const T*, const T*, const T*, int64_t, \
                                          int64_t, int64_t, acc_t<T>*);                          \
  template void sparse_decode_residual<T>(const T*, const int64_t*, const T*, const T*, const T*,       \
                                          const acc_t<T>*, int64_t, int64_t, int64_t, T*, T*);
SSAE_INSTANTIATE(float)
SSAE_INSTANTIATE(double)
SSAE_INSTANTIATE(bf16)
SSAE_INSTANTIATE(f16)
#undef SSAE_INSTANTIATE

}  // namespace ssae::cpu
