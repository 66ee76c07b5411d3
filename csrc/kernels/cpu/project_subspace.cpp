#include "project_subspace.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ssae::cpu {
namespace {

// Register tiles: kMR rows x kNR columns of float accumulators (8 AVX-512
// registers), fed by one row of kNR values and kMR broadcasts per step.
constexpr int64_t kMR = 4;
constexpr int64_t kNR = 32;
// A block of G (d x nb, converted to the accumulation type) plus U^T G of the
// block (r x nb) stay within half of the 2 MB per-core L2, so the second pass
// over the block (writing U C or G - U C) reads G from cache, not from memory.
constexpr int64_t kBlockBytes = int64_t(1) << 20;
constexpr int64_t kMaxBlock = 256;
constexpr int64_t kMinBlock = kNR;

// One block of `cols` columns (G and out point at its first column):
//   C = U^T G[:, block]                    [rp, nb]
//   out[:, block] = U C, or G[:, block] - U C
// Ua is U converted and zero-padded to rp = round_up(r, kMR) columns and
// dp = round_up(d, kMR) rows, so every register tile is full. The tiles read
// G through Gb: float32/float64 G directly, except a last partial column tile,
// which is copied zero-padded into Gb; bfloat16/float16 G is converted into Gb
// once (d x nb), so each element is converted once however large r is.
template <typename T>
[[gnu::always_inline]] inline void project_block(const T* G, int64_t ldg, const acc_t<T>* Ua, int64_t d, int64_t rp,
                                                 int64_t cols, int64_t nb, bool complement, T* out, int64_t ldo,
                                                 acc_t<T>* Gb, acc_t<T>* C) {
  using A = acc_t<T>;
  constexpr bool direct = std::is_same_v<T, A>;
  const int64_t full = direct ? cols / kNR * kNR : 0;  // columns read from G in place
  const int64_t cp = (cols + kNR - 1) / kNR * kNR;
  for (int64_t i = 0; i < d; ++i) {  // the columns that need a copy, zero-padded to cp
    const T* g = G + i * ldg;
    A* b = Gb + i * nb;
    for (int64_t c = full; c < cols; ++c) b[c - full] = load<A>(g[c]);
    for (int64_t c = cols; c < cp; ++c) b[c - full] = A(0);
  }
  // Column tile c0 of G in the accumulation type: pointer to its row 0, and row stride.
  auto tile = [&](int64_t c0, const A*& p, int64_t& ld) {
    if constexpr (direct) {
      if (c0 < full) {
        p = G + c0;
        ld = ldg;
        return;
      }
    }
    p = Gb + (c0 - full);
    ld = nb;
  };
  // C[a0:a0+kMR, c0:c0+kNR] = sum_i U[i, a0:a0+kMR]^T G[i, c0:c0+kNR]
  for (int64_t c0 = 0; c0 < cp; c0 += kNR) {
    const A* g;
    int64_t ld;
    tile(c0, g, ld);
    for (int64_t a0 = 0; a0 < rp; a0 += kMR) {
      A acc[kMR][kNR] = {};
      for (int64_t i = 0; i < d; ++i) {
        const A* u = Ua + i * rp + a0;
        const A* b = g + i * ld;
        for (int64_t m = 0; m < kMR; ++m)
#pragma omp simd
          for (int64_t c = 0; c < kNR; ++c) acc[m][c] += u[m] * b[c];
      }
      for (int64_t m = 0; m < kMR; ++m)
        for (int64_t c = 0; c < kNR; ++c) C[(a0 + m) * nb + c0 + c] = acc[m][c];
    }
  }
  // out[i0:i0+kMR, c0:c0+kNR] = (G or 0) -/+ sum_a U[i0:i0+kMR, a] C[a, c0:c0+kNR]
  for (int64_t c0 = 0; c0 < cp; c0 += kNR) {
    const A* g;
    int64_t ld;
    tile(c0, g, ld);
    const int64_t nc = std::min(kNR, cols - c0);
    for (int64_t i0 = 0; i0 < d; i0 += kMR) {
      A acc[kMR][kNR] = {};
      for (int64_t a = 0; a < rp; ++a) {
        const A* cr = C + a * nb + c0;
        for (int64_t m = 0; m < kMR; ++m) {
          const A w = Ua[(i0 + m) * rp + a];
#pragma omp simd
          for (int64_t c = 0; c < kNR; ++c) acc[m][c] += w * cr[c];
        }
      }
      for (int64_t m = 0; m < kMR && i0 + m < d; ++m) {
        const A* b = g + (i0 + m) * ld;
        T* o = out + (i0 + m) * ldo + c0;
        // In place (out == G), b[c] is read before o[c], the same element, is written.
        if (complement)
          for (int64_t c = 0; c < nc; ++c) o[c] = store<T, A>(b[c] - acc[m][c]);
        else
          for (int64_t c = 0; c < nc; ++c) o[c] = store<T, A>(acc[m][c]);
      }
    }
  }
}

#define SSAE_PROJECT_BLOCK(T)                                                                                   \
  SSAE_MULTIVERSION void project_block_mv(const T* G, int64_t ldg, const acc_t<T>* Ua, int64_t d, int64_t rp,  \
                                          int64_t cols, int64_t nb, bool complement, T* out, int64_t ldo,       \
                                          acc_t<T>* Gb, acc_t<T>* C) {                                          \
    project_block<T>(G, ldg, Ua, d, rp, cols, nb, complement, out, ldo, Gb, C);                                 \
  }
SSAE_PROJECT_BLOCK(float)
SSAE_PROJECT_BLOCK(double)
SSAE_PROJECT_BLOCK(bf16)
SSAE_PROJECT_BLOCK(f16)
#undef SSAE_PROJECT_BLOCK

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

int64_t project_subspace_block(int64_t d, int64_t r, int64_t n, int threads) {
  // Enough blocks for every thread, whole register tiles, within the cache budget.
  const int64_t per_thread = (n + std::max(threads, 1) - 1) / std::max(threads, 1);
  int64_t nb = std::clamp<int64_t>((per_thread + kNR - 1) / kNR * kNR, kMinBlock, kMaxBlock);
  while (nb > kMinBlock && (d + r + kMR) * nb * int64_t(sizeof(float)) > kBlockBytes) nb = (nb / 2 + kNR - 1) / kNR * kNR;
  return nb;
}

template <typename T>
void project_subspace(const T* G, int64_t ldg, const T* U, int64_t d, int64_t r, int64_t n, bool complement, T* out,
                      int64_t ldo) {
  using A = acc_t<T>;
  if (d <= 0 || n <= 0) return;
  if (r <= 0) {  // span(U) = {0}
    for (int64_t i = 0; i < d; ++i)
      for (int64_t c = 0; c < n; ++c) out[i * ldo + c] = complement ? G[i * ldg + c] : store<T, A>(A(0));
    return;
  }
  // U converted once (shared by every thread), zero-padded to whole register tiles.
  const int64_t rp = (r + kMR - 1) / kMR * kMR, dp = (d + kMR - 1) / kMR * kMR;
  std::vector<A> Ua(static_cast<size_t>(dp * rp), A(0));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t a = 0; a < r; ++a) Ua[size_t(i * rp + a)] = load<A>(U[i * r + a]);
  const int64_t nb = project_subspace_block(d, r, n, max_threads());
  const int64_t blocks = (n + nb - 1) / nb;
#pragma omp parallel if (blocks > 1)
  {
    std::vector<A> Gb(static_cast<size_t>(d * nb)), C(static_cast<size_t>(rp * nb));
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t c0 = blk * nb;
      project_block_mv(G + c0, ldg, Ua.data(), d, rp, std::min(nb, n - c0), nb, complement, out + c0, ldo,
                       Gb.data(), C.data());
    }
  }
}

#define SSAE_INSTANTIATE(T) \
  template void project_subspace<T>(const T*, int64_t, const T*, int64_t, int64_t, int64_t, bool, T*, int64_t);
SSAE_INSTANTIATE(float)
SSAE_INSTANTIATE(double)
SSAE_INSTANTIATE(bf16)
SSAE_INSTANTIATE(f16)
#undef SSAE_INSTANTIATE

}  // namespace ssae::cpu
