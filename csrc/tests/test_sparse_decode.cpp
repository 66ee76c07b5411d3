// sparse_decode, sparse_decode_residual and find_invalid_index (csrc/kernels/cpu/sparse_decode.h)
// against naive loops accumulating in double, for every storage type; and the CUDA gathers'
// column layout (csrc/kernels/cuda/row_decode.h: which columns a thread reads, and when with
// 16-byte loads) run by a host emulation of the decode kernel's blocks over strided,
// misaligned and odd-width W views.
#include "../kernels/cpu/sparse_decode.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "../kernels/cuda/row_decode.h"

#include "../kernels/cpu/scalar.h"
#include "test_util.h"
#include "tolerance.h"

using ssae::cpu::bf16;
using ssae::cpu::f16;

namespace {

std::mt19937 rng(7);

template <typename T>
void run_decode(int64_t rows, int64_t k, int64_t d, int64_t M, bool with_bias) {
  ssae_test::context(ssae_test::str(ssae_test::type_name<T>(), " rows=", rows, " k=", k, " d=", d, " M=", M,
                                    " bias=", with_bias));
  const auto values = ssae_test::random_values<T>(size_t(rows * k), rng);
  const auto W = ssae_test::random_values<T>(size_t(M * d), rng);
  const auto bias = ssae_test::random_values<T>(size_t(d), rng);
  std::vector<int64_t> indices(static_cast<size_t>(rows * k));
  // Duplicates within a row are allowed by the kernel; include some.
  for (auto& i : indices) i = std::uniform_int_distribution<int64_t>(0, M - 1)(rng);

  std::vector<T> out(static_cast<size_t>(rows * d));
  ssae::cpu::sparse_decode<T>(values.data(), indices.data(), W.data(), with_bias ? bias.data() : nullptr, rows, k,
                              d, out.data());

  for (int64_t n = 0; n < rows; ++n)
    for (int64_t t = 0; t < d; ++t) {
      double want = with_bias ? ssae_test::to_double(bias[size_t(t)]) : 0.0, magnitude = std::fabs(want);
      for (int64_t j = 0; j < k; ++j) {
        const double term = ssae_test::to_double(values[size_t(n * k + j)]) *
                            ssae_test::to_double(W[size_t(indices[size_t(n * k + j)] * d + t)]);
        want += term;
        magnitude += std::fabs(term);
      }
      CHECK_NEAR(ssae_test::to_double(out[size_t(n * d + t)]), want,
                 ssae_test::sum_tolerance<T>(k + 1, magnitude, want));
    }
}

// sparse_decode_residual: the residual against the exact scaled decode error, and
// grad_values against the exact dot of that exact residual, the bound adding the
// kernel's (unrounded, acc_t) residual error carried through the dot.
template <typename T>
void run_residual(int64_t rows, int64_t k, int64_t d, int64_t M, bool with_bias) {
  using A = ssae::cpu::acc_t<T>;
  ssae_test::context(ssae_test::str("residual ", ssae_test::type_name<T>(), " rows=", rows, " k=", k, " d=", d,
                                    " M=", M, " bias=", with_bias));
  const auto values = ssae_test::random_values<T>(size_t(rows * k), rng);
  const auto W = ssae_test::random_values<T>(size_t(M * d), rng);
  const auto bias = ssae_test::random_values<T>(size_t(d), rng);
  const auto x = ssae_test::random_values<T>(size_t(rows * d), rng);
  std::vector<A> scale(static_cast<size_t>(rows));
  for (auto& c : scale) c = A(std::uniform_real_distribution<double>(-3.0, 3.0)(rng));
  std::vector<int64_t> indices(static_cast<size_t>(rows * k));
  for (auto& i : indices) i = std::uniform_int_distribution<int64_t>(0, M - 1)(rng);

  std::vector<T> residual(static_cast<size_t>(rows * d)), grad(static_cast<size_t>(rows * k));
  ssae::cpu::sparse_decode_residual<T>(values.data(), indices.data(), W.data(), with_bias ? bias.data() : nullptr,
                                       x.data(), scale.data(), rows, k, d, residual.data(), grad.data());

  const double u = ssae_test::acc_unit<T>();
  std::vector<double> exact(static_cast<size_t>(d)), err(static_cast<size_t>(d));
  for (int64_t n = 0; n < rows; ++n) {
    const double s = double(scale[size_t(n)]);
    for (int64_t t = 0; t < d; ++t) {
      const double xv = ssae_test::to_double(x[size_t(n * d + t)]);
      double sum = (with_bias ? ssae_test::to_double(bias[size_t(t)]) : 0.0) - xv;
      double magnitude = std::fabs(sum) + std::fabs(xv);
      for (int64_t j = 0; j < k; ++j) {
        const double term = ssae_test::to_double(values[size_t(n * k + j)]) *
                            ssae_test::to_double(W[size_t(indices[size_t(n * k + j)] * d + t)]);
        sum += term;
        magnitude += std::fabs(term);
      }
      exact[size_t(t)] = s * sum;
      // k + 2 summed terms, then the product with scale
      err[size_t(t)] = double(k + 3) * u * std::fabs(s) * magnitude;
      CHECK_NEAR(ssae_test::to_double(residual[size_t(n * d + t)]), exact[size_t(t)],
                 ssae_test::sum_tolerance<T>(k + 3, std::fabs(s) * magnitude, exact[size_t(t)]));
    }
    for (int64_t j = 0; j < k; ++j) {
      const T* row = W.data() + indices[size_t(n * k + j)] * d;
      double want = 0, magnitude = 0, carried = 0;
      for (int64_t t = 0; t < d; ++t) {
        const double w = ssae_test::to_double(row[t]);
        want += exact[size_t(t)] * w;
        magnitude += std::fabs(exact[size_t(t)] * w);
        carried += err[size_t(t)] * std::fabs(w);
      }
      CHECK_NEAR(ssae_test::to_double(grad[size_t(n * k + j)]), want,
                 ssae_test::sum_tolerance<T>(d, magnitude + carried, want) + carried);
    }
  }
}

void run_find_invalid(int64_t count, int64_t M, std::vector<int64_t> bad_at, std::vector<int64_t> bad_values) {
  ssae_test::context(ssae_test::str("find_invalid_index count=", count, " M=", M, " bad at ", bad_at.size(),
                                    " positions"));
  std::vector<int64_t> idx(static_cast<size_t>(count));
  for (auto& i : idx) i = std::uniform_int_distribution<int64_t>(0, M - 1)(rng);
  int64_t want = -1;
  for (size_t b = 0; b < bad_at.size(); ++b) {
    idx[size_t(bad_at[b])] = bad_values[b % bad_values.size()];
    if (want < 0 || bad_at[b] < want) want = bad_at[b];
  }
  const int64_t got = ssae::cpu::find_invalid_index(idx.data(), count, M);
  CHECK_MSG(got == want, "got ", got, " want ", want);
}

// ---- the CUDA gathers' layout (row_decode.h) ------------------------------------------------

// Every column of [0, d) belongs to exactly one (tile, thread, run, element), the runs
// start at multiples of their length (so a run of an aligned row is a 16-byte vector),
// and the tiles are balanced.
void check_gather_layout(int64_t d, int elem_bytes) {
  ssae_test::context(ssae_test::str("gather layout d=", d, " elem_bytes=", elem_bytes));
  const ssae::cuda::Launch l = ssae::cuda::gather_launch(3, d);
  const int run = ssae::cuda::vec_elems(elem_bytes), runs = ssae::cuda::gather_runs(elem_bytes);
  CHECK(run * runs == ssae::cuda::kGatherCols && run * elem_bytes == ssae::cuda::kVecBytes);
  CHECK(l.threads % 32 == 0 && l.threads >= 32 && l.threads <= ssae::cuda::kGatherMaxThreads);
  CHECK(l.blocks == 3 * l.tiles);
  CHECK_MSG(l.tiles * l.threads * ssae::cuda::kGatherCols >= d, "tiles ", l.tiles, " threads ", l.threads);
  // balanced: no tile wider than needed by more than one warp's worth of columns
  CHECK_MSG((l.threads - 32) * ssae::cuda::kGatherCols < ssae::cuda::ceil_div(std::max<int64_t>(d, 1), l.tiles),
            "threads ", l.threads, " tiles ", l.tiles);
  std::vector<int> seen(static_cast<size_t>(d), 0);
  for (int64_t b = 0; b < l.tiles; ++b) {
    const int64_t first = ssae::cuda::gather_first_column(b, l.tiles, l.threads);
    CHECK(first % ssae::cuda::kGatherCols == 0);
    for (int t = 0; t < l.threads; ++t)
      for (int u = 0; u < runs; ++u) {
        const int64_t c = ssae::cuda::gather_run(first, u, t, l.threads, run);
        CHECK(c % run == 0);
        for (int i = 0; i < run; ++i)
          if (c + i < d) ++seen[size_t(c + i)];
      }
  }
  for (int64_t c = 0; c < d; ++c) CHECK_MSG(seen[size_t(c)] == 1, "column ", c, " seen ", seen[size_t(c)]);
}

template <typename T>
float as_float(T v) {
  return ssae::cpu::load<float>(v);
}

// sampled_dot's warp (row_decode.h, vector_columns): with aligned rows, lane l reads the runs
// at (s * 32 + l) * run below vector_columns(d, run), then columns vector_columns + l + 32 s;
// every column exactly once, each run within the row and aligned.
void check_dot_layout(int64_t d, int elem_bytes) {
  ssae_test::context(ssae_test::str("sampled_dot layout d=", d, " elem_bytes=", elem_bytes));
  const int run = ssae::cuda::vec_elems(elem_bytes);
  const int64_t tail = ssae::cuda::vector_columns(d, run);
  CHECK(tail % run == 0 && tail <= d && d - tail < run);
  std::vector<int> seen(static_cast<size_t>(d), 0);
  for (int lane = 0; lane < 32; ++lane) {
    for (int64_t c = int64_t(lane) * run; c < tail; c += 32 * run) {
      CHECK(ssae::cuda::vector_run(true, c, run, d) && (c * elem_bytes) % ssae::cuda::kVecBytes == 0);
      for (int i = 0; i < run; ++i) ++seen[size_t(c + i)];
    }
    for (int64_t c = tail + lane; c < d; c += 32) ++seen[size_t(c)];
  }
  for (int64_t c = 0; c < d; ++c) CHECK_MSG(seen[size_t(c)] == 1, "column ", c, " seen ", seen[size_t(c)]);
}

// A 16-byte aligned buffer of T, as cudaMalloc gives.
template <typename T>
struct Aligned {
  std::vector<unsigned char> bytes;
  T* data;
  explicit Aligned(size_t n) : bytes(n * sizeof(T) + 64) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(bytes.data());
    data = reinterpret_cast<T*>(bytes.data() + (64 - p % 64) % 64);
  }
};

// The decode kernel's blocks on the host: the layout and load choices of row_decode.h
// (gather_launch, gather_run, rows_aligned, vector_run) over W, an [M, d] view of a
// buffer at element offset `offset` with row stride ld. Checks that every 16-byte load
// is aligned and within its row, that aligned rows use them for every whole run, and the
// result against the naive decode. Out-of-range indices give NaN rows, as on the device.
template <typename T>
void run_gather_decode(int64_t rows, int64_t k, int64_t d, int64_t M, int64_t offset, int64_t ld) {
  ssae_test::context(ssae_test::str("gather decode ", ssae_test::type_name<T>(), " rows=", rows, " k=", k, " d=", d,
                                    " M=", M, " offset=", offset, " ld=", ld));
  Aligned<T> storage(size_t(offset + (M - 1) * ld + d));
  const auto fill = ssae_test::random_values<T>(size_t(offset + (M - 1) * ld + d), rng);
  std::memcpy(static_cast<void*>(storage.data), fill.data(), fill.size() * sizeof(T));
  const T* W = storage.data + offset;
  const auto values = ssae_test::random_values<T>(size_t(rows * k), rng);
  std::vector<int64_t> indices(static_cast<size_t>(rows * k));
  for (auto& i : indices) i = std::uniform_int_distribution<int64_t>(0, M - 1)(rng);
  if (rows > 1) indices[size_t(k)] = M;  // row 1: an out-of-range index, a NaN row

  constexpr int elem = int(sizeof(T));
  const int run = ssae::cuda::vec_elems(elem), runs = ssae::cuda::gather_runs(elem);
  const bool aligned = ssae::cuda::rows_aligned(uint64_t(reinterpret_cast<uintptr_t>(W)), ld, elem);
  const bool expect_aligned = (offset * elem) % 16 == 0 && (ld * elem) % 16 == 0;
  CHECK(aligned == expect_aligned);
  const ssae::cuda::Launch l = ssae::cuda::gather_launch(rows, d);
  int64_t vector_loads = 0, element_loads = 0;
  std::vector<float> out(static_cast<size_t>(rows * d), -12345.0f);
  for (int64_t b = 0; b < l.blocks; ++b) {
    const int64_t n = b / l.tiles, first = ssae::cuda::gather_first_column(b, l.tiles, l.threads);
    for (int t = 0; t < l.threads; ++t)
      for (int u = 0; u < runs; ++u) {
        const int64_t c = ssae::cuda::gather_run(first, u, t, l.threads, run);
        std::vector<float> acc(static_cast<size_t>(run), 0.0f);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t idx = indices[size_t(n * k + j)];
          const bool ok = idx >= 0 && idx < M;  // stage_entries: row 0 with a NaN weight
          const float w = ok ? as_float(values[size_t(n * k + j)]) : std::nanf("");
          const T* row = W + (ok ? idx : 0) * ld;
          if (ssae::cuda::vector_run(aligned, c, run, d)) {
            ++vector_loads;
            CHECK(reinterpret_cast<uintptr_t>(row + c) % 16 == 0);
            CHECK(c + run <= d);
            for (int i = 0; i < run; ++i) acc[size_t(i)] += w * as_float(row[c + i]);
          } else {
            for (int i = 0; i < run; ++i)
              if (c + i < d) {
                ++element_loads;
                acc[size_t(i)] += w * as_float(row[c + i]);
              }
          }
        }
        for (int i = 0; i < run; ++i)
          if (c + i < d) out[size_t(n * d + c + i)] = acc[size_t(i)];
      }
  }
  // Aligned rows read every whole run as one vector; only the last d % run columns one by one.
  if (aligned) CHECK_MSG(element_loads == rows * k * (d % run), "element loads ", element_loads);
  else CHECK(vector_loads == 0);
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t c = 0; c < d; ++c) {
      double want = 0.0, magnitude = 0.0;
      bool bad = false;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t idx = indices[size_t(n * k + j)];
        if (idx < 0 || idx >= M) {
          bad = true;
          continue;
        }
        const double term = ssae_test::to_double(values[size_t(n * k + j)]) * ssae_test::to_double(W[idx * ld + c]);
        want += term;
        magnitude += std::fabs(term);
      }
      if (bad) want = std::nan("");
      CHECK_NEAR(out[size_t(n * d + c)], want, double(k) * ssae_test::acc_unit<float>() * magnitude);
    }
}

}  // namespace

int main() {
  for (int64_t k : {1, 3, 32}) {
    for (bool bias : {false, true}) {
      run_decode<float>(17, k, 45, 33, bias);
      run_decode<double>(17, k, 45, 33, bias);
      run_decode<bf16>(17, k, 45, 33, bias);
      run_decode<f16>(17, k, 45, 33, bias);
    }
  }
  // k = M, a single row, d = 1, a single latent, a wide row.
  run_decode<float>(5, 33, 19, 33, true);
  run_decode<float>(1, 4, 7, 9, true);
  run_decode<bf16>(9, 5, 1, 6, true);
  run_decode<f16>(3, 1, 8, 1, false);
  run_decode<float>(3, 8, 1031, 50, true);
  run_decode<bf16>(2, 16, 777, 40, false);

  for (int64_t k : {1, 3, 32})
    for (bool bias : {false, true}) {
      run_residual<float>(17, k, 45, 33, bias);
      run_residual<double>(17, k, 45, 33, bias);
      run_residual<bf16>(17, k, 45, 33, bias);
      run_residual<f16>(17, k, 45, 33, bias);
    }
  run_residual<float>(5, 33, 19, 33, true);  // k = M
  run_residual<bf16>(9, 5, 1, 6, true);      // d = 1
  run_residual<float>(3, 8, 1031, 50, false);

  run_find_invalid(0, 5, {}, {-1});
  run_find_invalid(1, 1, {}, {-1});
  run_find_invalid(1000, 10, {}, {-1});
  run_find_invalid(1000, 10, {999}, {10});
  run_find_invalid(1000, 10, {0}, {-1});
  run_find_invalid(1000, 10, {512, 17, 900}, {-5, 11, INT64_MAX});
  run_find_invalid(200003, 24576, {199999, 150001}, {24576, INT64_MIN});

  // The CUDA gathers' layout: odd widths, one past a tile, balanced tiles (2304), wide rows.
  for (int64_t d : {1, 3, 7, 8, 9, 31, 64, 65, 257, 767, 768, 769, 2047, 2048, 2049, 2304, 4096, 4097, 16385})
    for (int elem : {4, 2}) {
      check_gather_layout(d, elem);
      check_dot_layout(d, elem);
    }
  // Vector loads: aligned contiguous rows, a row-strided view W[:, :d] of a wider matrix
  // (odd d, aligned rows), every other row, and misaligned views (W[:, 1:], odd row strides).
  run_gather_decode<float>(4, 5, 64, 9, 0, 64);
  run_gather_decode<float>(4, 5, 37, 9, 0, 40);     // odd d, aligned stride: vectors and a tail
  run_gather_decode<float>(4, 5, 37, 9, 0, 37);     // contiguous odd d: misaligned rows
  run_gather_decode<float>(3, 4, 64, 9, 1, 64);     // W[:, 1:]-like base
  run_gather_decode<float>(3, 4, 64, 9, 0, 128);    // every other row
  run_gather_decode<bf16>(4, 5, 768, 9, 0, 768);
  run_gather_decode<bf16>(4, 5, 101, 9, 0, 104);    // odd d, aligned stride
  run_gather_decode<bf16>(4, 5, 101, 9, 0, 101);    // misaligned rows
  run_gather_decode<bf16>(3, 4, 64, 9, 4, 64);      // base 8 bytes past alignment
  run_gather_decode<bf16>(3, 4, 64, 9, 8, 72);      // aligned base 16 bytes in, stride 144 bytes
  run_gather_decode<f16>(3, 7, 2304, 5, 0, 2304);   // two balanced tiles
  run_gather_decode<f16>(2, 3, 4100, 5, 0, 4104);   // three tiles, a tail
  run_gather_decode<f16>(2, 3, 1, 5, 0, 1);         // d = 1
  run_gather_decode<bf16>(2, 3, 9, 1, 0, 16);       // a single latent

  return ssae_test::finish("test_sparse_decode");
}
