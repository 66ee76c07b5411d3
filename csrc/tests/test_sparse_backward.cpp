// sampled_dot, latent_transpose and sparse_transpose_matmul
// (csrc/kernels/cpu/sparse_backward.h) against naive loops; and the CUDA
// sparse_transpose_matmul's split of hot latents (csrc/kernels/cuda/sparse_backward.h)
// run by a host emulation of its two kernels.
#include "../kernels/cpu/sparse_backward.h"
#include "../kernels/cuda/sparse_backward.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "../kernels/cpu/scalar.h"
#include "test_util.h"
#include "tolerance.h"

using ssae::cpu::bf16;
using ssae::cpu::f16;

namespace {

std::mt19937 rng(11);

// Latent of each entry: skewed so that some latents own many entries and some none.
std::vector<int64_t> random_indices(int64_t count, int64_t M) {
  std::vector<int64_t> idx(static_cast<size_t>(count));
  std::uniform_real_distribution<double> u01;
  for (auto& i : idx) i = std::min<int64_t>(M - 1, int64_t(M * std::pow(u01(rng), 3.0)));
  return idx;
}

template <typename T>
void run_sampled_dot(int64_t rows, int64_t k, int64_t d, int64_t M) {
  ssae_test::context(ssae_test::str("sampled_dot ", ssae_test::type_name<T>(), " rows=", rows, " k=", k, " d=", d,
                                    " M=", M));
  const auto grad = ssae_test::random_values<T>(size_t(rows * d), rng);
  const auto W = ssae_test::random_values<T>(size_t(M * d), rng);
  const auto idx = random_indices(rows * k, M);
  std::vector<T> out(static_cast<size_t>(rows * k));
  ssae::cpu::sampled_dot<T>(grad.data(), idx.data(), W.data(), rows, k, d, out.data());
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t j = 0; j < k; ++j) {
      double want = 0, magnitude = 0;
      for (int64_t t = 0; t < d; ++t) {
        const double term = ssae_test::to_double(grad[size_t(n * d + t)]) *
                            ssae_test::to_double(W[size_t(idx[size_t(n * k + j)] * d + t)]);
        want += term;
        magnitude += std::fabs(term);
      }
      CHECK_NEAR(ssae_test::to_double(out[size_t(n * k + j)]), want, ssae_test::sum_tolerance<T>(d, magnitude, want));
    }
}

// The transpose by definition: for each latent, its entries in increasing order.
void naive_transpose(const std::vector<int64_t>& idx, int64_t M, std::vector<int64_t>& offsets,
                     std::vector<int64_t>& order) {
  offsets.assign(size_t(M + 1), 0);
  order.clear();
  for (int64_t m = 0; m < M; ++m) {
    for (size_t p = 0; p < idx.size(); ++p)
      if (idx[p] == m) order.push_back(int64_t(p));
    offsets[size_t(m + 1)] = int64_t(order.size());
  }
}

void run_latent_transpose(int64_t count, int64_t M) {
  ssae_test::context(ssae_test::str("latent_transpose count=", count, " M=", M));
  const auto idx = random_indices(count, M);
  std::vector<int64_t> offsets(size_t(M + 1), -7), order(size_t(count), -7), want_offsets, want_order;
  ssae::cpu::latent_transpose(idx.data(), count, M, offsets.data(), order.data());
  naive_transpose(idx, M, want_offsets, want_order);
  CHECK(offsets == want_offsets);
  CHECK(order == want_order);
}

template <typename T>
void run_transpose_matmul(int64_t rows, int64_t k, int64_t d, int64_t M, bool with_colsum) {
  ssae_test::context(ssae_test::str("sparse_transpose_matmul ", ssae_test::type_name<T>(), " rows=", rows, " k=", k,
                                    " d=", d, " M=", M, " colsum=", with_colsum));
  const auto weights = ssae_test::random_values<T>(size_t(rows * k), rng);
  const auto X = ssae_test::random_values<T>(size_t(rows * d), rng);
  const auto idx = random_indices(rows * k, M);
  std::vector<int64_t> offsets, order;
  naive_transpose(idx, M, offsets, order);

  std::vector<T> out(size_t(M * d), ssae::cpu::store<T, double>(1024.0));
  std::vector<T> colsum(size_t(M), ssae::cpu::store<T, double>(1024.0));
  ssae::cpu::sparse_transpose_matmul<T>(weights.data(), X.data(), k, d, offsets.data(), order.data(), M, out.data(),
                                        with_colsum ? colsum.data() : nullptr);

  // Naive S^T X straight from the (row, slot) -> latent map, not from the transpose.
  std::vector<double> want(size_t(M * d), 0.0), magnitude(size_t(M * d), 0.0), want_sum(size_t(M), 0.0),
      sum_mag(size_t(M), 0.0);
  std::vector<int64_t> count(size_t(M), 0);
  for (int64_t p = 0; p < rows * k; ++p) {
    const int64_t m = idx[size_t(p)];
    const double w = ssae_test::to_double(weights[size_t(p)]);
    ++count[size_t(m)];
    want_sum[size_t(m)] += w;
    sum_mag[size_t(m)] += std::fabs(w);
    for (int64_t t = 0; t < d; ++t) {
      const double term = w * ssae_test::to_double(X[size_t((p / k) * d + t)]);
      want[size_t(m * d + t)] += term;
      magnitude[size_t(m * d + t)] += std::fabs(term);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t t = 0; t < d; ++t)
      CHECK_NEAR(ssae_test::to_double(out[size_t(m * d + t)]), want[size_t(m * d + t)],
                 ssae_test::sum_tolerance<T>(count[size_t(m)], magnitude[size_t(m * d + t)], want[size_t(m * d + t)]));
    if (with_colsum)
      CHECK_NEAR(ssae_test::to_double(colsum[size_t(m)]), want_sum[size_t(m)],
                 ssae_test::sum_tolerance<T>(count[size_t(m)], sum_mag[size_t(m)], want_sum[size_t(m)]));
    else
      CHECK(ssae_test::to_double(colsum[size_t(m)]) == 1024.0);  // untouched when not asked for
  }
}

// Deterministic: the same inputs give bitwise the same outputs on every run
// (each latent's sum has one owner and a fixed order).
void run_deterministic() {
  ssae_test::context("sparse_transpose_matmul determinism");
  const int64_t rows = 300, k = 8, d = 33, M = 40;
  const auto weights = ssae_test::random_values<float>(size_t(rows * k), rng);
  const auto X = ssae_test::random_values<float>(size_t(rows * d), rng);
  const auto idx = random_indices(rows * k, M);
  std::vector<int64_t> offsets(size_t(M + 1)), order(size_t(rows * k));
  ssae::cpu::latent_transpose(idx.data(), rows * k, M, offsets.data(), order.data());
  std::vector<float> first(static_cast<size_t>(M * d)), again(first), s1(static_cast<size_t>(M)), s2(s1);
  ssae::cpu::sparse_transpose_matmul<float>(weights.data(), X.data(), k, d, offsets.data(), order.data(), M,
                                            first.data(), s1.data());
  for (int rep = 0; rep < 5; ++rep) {
    ssae::cpu::sparse_transpose_matmul<float>(weights.data(), X.data(), k, d, offsets.data(), order.data(), M,
                                              again.data(), s2.data());
    CHECK(std::memcmp(first.data(), again.data(), first.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(s1.data(), s2.data(), s1.size() * sizeof(float)) == 0);
  }
}

// ---- the CUDA split of hot latents (cuda/sparse_backward.h) ---------------------------------

// Both kernels of the CUDA sparse_transpose_matmul on the host, over `entries` sorted
// positions with the given offsets ([M + 1]; offsets[M] may stop short of entries, as
// when latent_transpose leaves out-of-range entries out). Each position p carries the
// value v[p]; a latent's result is sum v[p] over its segment, accumulated in float in
// the kernels' order, and the positions it took are recorded. Checks that every latent
// is written exactly once, from exactly its segment's positions in ascending order; that
// hot latents (and only they) go through partial sums, whose slots are in range, written
// once and read only after being written; and the value against a double sum.
void run_hot_split(const std::vector<int64_t>& offsets, int64_t entries, const char* what) {
  namespace cu = ssae::cuda;
  const int64_t M = int64_t(offsets.size()) - 1;
  ssae_test::context(ssae_test::str("hot split: ", what, " M=", M, " entries=", entries));
  std::vector<float> v(static_cast<size_t>(entries));
  for (auto& x : v) x = std::uniform_real_distribution<float>(-2.0f, 2.0f)(rng);
  const int64_t chunks = cu::stm_chunks(entries), slots = cu::stm_partials(entries);
  CHECK(slots == 2 * chunks && chunks * cu::kHotPiece >= entries && (chunks - 1) * cu::kHotPiece < entries + 1);

  std::vector<int> written(static_cast<size_t>(M), 0), slot_written(static_cast<size_t>(slots), 0);
  std::vector<std::vector<int64_t>> took(static_cast<size_t>(M)), slot_took(static_cast<size_t>(slots));
  std::vector<float> out(static_cast<size_t>(M), 0.0f), partial(static_cast<size_t>(slots), 0.0f);
  auto sum = [&](int64_t begin, int64_t end, std::vector<int64_t>& positions) {
    float acc = 0.0f;
    for (int64_t e = begin; e < end; ++e) {
      acc += v[size_t(e)];
      positions.push_back(e);
    }
    return acc;
  };
  // Kernel 1: owners, then helpers (any block order gives the same result: no block reads another's output).
  for (int64_t m = 0; m < M; ++m) {
    const cu::Segment s = cu::segment(offsets.data(), m, entries);
    if (cu::is_hot(s)) continue;
    ++written[size_t(m)];
    out[size_t(m)] = sum(s.begin, s.end, took[size_t(m)]);
  }
  for (int64_t c = 0; c < chunks; ++c) {
    cu::Piece pieces[2];
    cu::hot_pieces(offsets.data(), M, entries, c, pieces);
    for (const auto& piece : pieces) {
      if (piece.latent < 0) continue;
      CHECK(piece.latent < M);
      CHECK(piece.slot == 2 * c || piece.slot == 2 * c + 1);
      CHECK(cu::is_hot(cu::segment(offsets.data(), piece.latent, entries)));
      CHECK(c * cu::kHotPiece <= piece.begin && piece.begin < piece.end && piece.end <= (c + 1) * cu::kHotPiece);
      ++slot_written[size_t(piece.slot)];
      partial[size_t(piece.slot)] = sum(piece.begin, piece.end, slot_took[size_t(piece.slot)]);
    }
  }
  for (int64_t q = 0; q < slots; ++q) CHECK_MSG(slot_written[size_t(q)] <= 1, "slot ", q);
  // Kernel 2: each chunk finishes at most one hot latent, adding its partials in chunk order.
  for (int64_t c = 0; c < chunks; ++c) {
    const cu::HotSum h = cu::hot_sum(offsets.data(), M, entries, c);
    if (h.latent < 0) continue;
    CHECK(h.latent < M && h.last_chunk == c && h.first_chunk < c);
    CHECK(cu::is_hot(cu::segment(offsets.data(), h.latent, entries)));
    ++written[size_t(h.latent)];
    float acc = 0.0f;
    for (int64_t q = h.first_chunk; q <= h.last_chunk; ++q) {
      const int64_t slot = cu::hot_slot(h, q);
      CHECK_MSG(slot >= 0 && slot < slots && slot_written[size_t(slot)] == 1, "slot ", slot, " of chunk ", q);
      acc += partial[size_t(slot)];
      auto& positions = took[size_t(h.latent)];
      positions.insert(positions.end(), slot_took[size_t(slot)].begin(), slot_took[size_t(slot)].end());
    }
    out[size_t(h.latent)] = acc;
  }
  int64_t hot = 0, read_slots = 0;
  for (int64_t m = 0; m < M; ++m) {
    const cu::Segment s = cu::segment(offsets.data(), m, entries);
    hot += cu::is_hot(s);
    CHECK_MSG(written[size_t(m)] == 1, "latent ", m, " written ", written[size_t(m)], " times");
    std::vector<int64_t> want;
    double exact = 0.0, magnitude = 0.0;
    for (int64_t e = s.begin; e < s.end; ++e) {
      want.push_back(e);
      exact += v[size_t(e)];
      magnitude += std::fabs(v[size_t(e)]);
    }
    CHECK_MSG(took[size_t(m)] == want, "latent ", m, " summed ", took[size_t(m)].size(), " of ", want.size(),
              " positions (or out of order)");
    CHECK_NEAR(out[size_t(m)], exact, double(s.end - s.begin + 1) * ssae_test::acc_unit<float>() * magnitude);
  }
  for (int64_t q = 0; q < slots; ++q) read_slots += slot_written[size_t(q)];
  // every hot latent's partials cover it: at least ceil(length / kHotPiece) of them
  if (hot == 0) CHECK(read_slots == 0);
}

// Offsets of latents with the given entry counts.
std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> offsets(1, 0);
  for (int64_t c : counts) offsets.push_back(offsets.back() + c);
  return offsets;
}

void run_hot_splits() {
  const int64_t P = ssae::cuda::kHotPiece;
  // One latent chosen by every row: a single segment of every length around the chunk size.
  for (int64_t n : {int64_t(1), P - 1, P, P + 1, 2 * P, 2 * P + 1, 5 * P + 17, int64_t(70000)})
    run_hot_split(offsets_of({n}), n, "one latent owns every entry");
  // ... among cold latents and empty ones, at every phase relative to the chunks.
  for (int64_t lead : {int64_t(0), int64_t(1), P - 1, P, P + 3})
    for (int64_t n : {P + 1, 3 * P, 3 * P + 5}) {
      const auto offsets = offsets_of({lead, 0, n, 0, 2, 1});
      run_hot_split(offsets, offsets.back(), "a hot latent at an offset");
    }
  // Two hot latents side by side (the second starts inside the first's last chunk), one
  // ending exactly on a chunk boundary, one starting on one.
  run_hot_split(offsets_of({P + 10, P + 300, 5, 2 * P - 10, P + 1}), 5 * P + 296, "adjacent hot latents");
  run_hot_split(offsets_of({2 * P, 3 * P, 0, P + 1}), 6 * P + 1, "hot latents on chunk boundaries");
  // Entries left out of the transpose at the end (offsets[M] < entries): they belong to no latent.
  run_hot_split(offsets_of({3, P + 40, 7}), P + 50 + 300, "entries past offsets[M]");
  run_hot_split(offsets_of({0, 0, 0}), 700, "every entry left out");
  run_hot_split(offsets_of({0, 0}), 0, "no entries");
  // Skewed random counts: many empty latents, some hot ones.
  std::uniform_real_distribution<double> u01;
  for (int rep = 0; rep < 20; ++rep) {
    std::vector<int64_t> counts(size_t(1 + rep * 7));
    for (auto& c : counts) {
      const double r = u01(rng);
      c = r < 0.3 ? 0 : (r < 0.8 ? int64_t(u01(rng) * 20) : int64_t(u01(rng) * 6 * P));
    }
    const auto offsets = offsets_of(counts);
    run_hot_split(offsets, offsets.back(), "skewed counts");
  }
}

}  // namespace

int main() {
  for (int64_t k : {1, 4, 32}) {
    run_sampled_dot<float>(19, k, 37, 50);
    run_sampled_dot<double>(19, k, 37, 50);
    run_sampled_dot<bf16>(19, k, 37, 50);
    run_sampled_dot<f16>(19, k, 37, 50);
  }
  run_sampled_dot<float>(3, 50, 1, 50);    // k = M, d = 1
  run_sampled_dot<float>(2, 3, 1029, 7);   // wide rows
  run_sampled_dot<bf16>(1, 1, 5, 1);       // a single latent

  run_latent_transpose(0, 3);
  run_latent_transpose(1, 1);
  run_latent_transpose(7, 1);
  run_latent_transpose(113, 7);
  run_latent_transpose(3 * 37, 37);
  run_latent_transpose(5000, 1001);

  for (bool colsum : {true, false}) {
    run_transpose_matmul<float>(23, 3, 29, 17, colsum);
    run_transpose_matmul<double>(23, 3, 29, 17, colsum);
    run_transpose_matmul<bf16>(23, 3, 29, 17, colsum);
    run_transpose_matmul<f16>(23, 3, 29, 17, colsum);
  }
  run_transpose_matmul<float>(200, 16, 65, 300, true);  // many dead latents, a few hot ones
  run_transpose_matmul<float>(9, 7, 13, 7, true);       // k = M
  run_transpose_matmul<float>(1, 1, 1, 1, true);
  run_transpose_matmul<bf16>(40, 2, 1025, 5, true);     // wide rows

  run_deterministic();
  run_hot_splits();
  return ssae_test::finish("test_sparse_backward");
}
