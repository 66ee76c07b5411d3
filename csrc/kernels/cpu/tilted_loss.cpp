#include "tilted_loss.h"

#include <cmath>
#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ssae::cpu {
namespace {

// Online state of one group: anchor a (the loss maximising t * l so far), the
// count c, and s = sum_i expm1(t (l_i - a)) (for t == 0: s = sum_i l_i).
struct TiltState {
  double anchor = 0, s = 0;
  int64_t count = 0;

  void add(double loss, double t) {
    if (t == 0) { s += loss; ++count; return; }
    if (count == 0) { anchor = loss; count = 1; s = 0; return; }
    const double delta = t * (loss - anchor);
    if (delta > 0) {  // a new anchor: rescale, sum exp = f (c + s) with f = exp(-delta)
      const double f = std::exp(-delta);
      s = f * s + double(count) * std::expm1(-delta);
      anchor = loss;
    } else {
      s += std::expm1(delta);  // NaN propagates here
    }
    ++count;
  }

  void merge(const TiltState& o, double t) {
    if (o.count == 0) return;
    if (t == 0) { s += o.s; count += o.count; return; }
    if (count == 0) { *this = o; return; }
    const double delta = t * (o.anchor - anchor);
    if (delta > 0) {  // the other anchor wins: rescale ours
      const double f = std::exp(-delta);
      s = f * s + double(count) * std::expm1(-delta) + o.s;
      anchor = o.anchor;
    } else {
      const double f = std::exp(delta);
      s += f * o.s + double(o.count) * std::expm1(delta);
    }
    count += o.count;
  }
};

}  // namespace

template <typename T>
void tilted_group_stats(const T* losses, int64_t n, double t, const int64_t* groups, int64_t num_groups,
                        double* anchor, double* log_mean, int64_t* count) {
  int threads = 1;
#ifdef _OPENMP
  // A thread per 64k losses at most: below that the merge costs more than it saves.
  threads = int(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), n / 65536)));
#endif
  std::vector<TiltState> partial(size_t(threads) * num_groups);
#pragma omp parallel num_threads(threads)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    TiltState* mine = partial.data() + size_t(tid) * num_groups;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i)
      mine[groups ? groups[i] : 0].add(load<double>(losses[i]), t);
  }
  for (int64_t g = 0; g < num_groups; ++g) {
    TiltState total;
    for (int th = 0; th < threads; ++th) total.merge(partial[size_t(th) * num_groups + g], t);
    count[g] = total.count;
    if (total.count == 0) {
      anchor[g] = 0;
      log_mean[g] = 0;
    } else if (t == 0) {
      anchor[g] = total.s / double(total.count);
      log_mean[g] = 0;
    } else {
      anchor[g] = total.anchor;
      log_mean[g] = std::log1p(total.s / double(total.count));
    }
  }
}

namespace {

template <typename T>
[[gnu::always_inline]] inline acc_t<T> sq_error_row(const T* a, const T* b, int64_t d) {
  using A = acc_t<T>;
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < d; ++j) {
    const A diff = load<A>(a[j]) - load<A>(b[j]);
    s += diff * diff;
  }
  return s;
}

#define SSAE_SQ_ERROR_ROW(T) \
  SSAE_MULTIVERSION acc_t<T> sq_error_row_mv(const T* a, const T* b, int64_t d) { return sq_error_row<T>(a, b, d); }
SSAE_SQ_ERROR_ROW(float)
SSAE_SQ_ERROR_ROW(double)
SSAE_SQ_ERROR_ROW(bf16)
SSAE_SQ_ERROR_ROW(f16)
#undef SSAE_SQ_ERROR_ROW

}  // namespace

template <typename T>
void row_sq_error(const T* a, const T* b, int64_t rows, int64_t d, acc_t<T>* out) {
#pragma omp parallel for schedule(static) if (parallel_worth(rows * d))
  for (int64_t i = 0; i < rows; ++i) out[i] = sq_error_row_mv(a + i * d, b + i * d, d);
}

#define SSAE_INSTANTIATE(T)                                                                         \
  template void tilted_group_stats<T>(const T*, int64_t, double, const int64_t*, int64_t, double*, \
                                      double*, int64_t*);                                           \
  template void row_sq_error<T>(const T*, const T*, int64_t, int64_t, acc_t<T>*);
SSAE_INSTANTIATE(float)
SSAE_INSTANTIATE(double)
SSAE_INSTANTIATE(bf16)
SSAE_INSTANTIATE(f16)
#undef SSAE_INSTANTIATE

}  // namespace ssae::cpu
