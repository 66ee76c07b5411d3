#include "cpu_ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <type_traits>

#include "arg_checks.h"
#include "../kernels/cpu/dot_tile.h"
#include "../kernels/cpu/project_subspace.h"
#include "../kernels/cpu/sparse_adam.h"
#include "../kernels/cpu/sparse_backward.h"
#include "../kernels/cpu/sparse_decode.h"
#include "../kernels/cpu/tilted_loss.h"
#include "../kernels/cpu/topk_encode.h"

namespace ssae {
namespace {

using cpu::bf16;
using cpu::f16;

// Calls f with a value of the kernel storage type matching dtype.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* arg, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(bf16{}); break;
    case at::kHalf: f(f16{}); break;
    default:
      TORCH_CHECK_TYPE(false, arg, " must be float32, float64, bfloat16 or float16, got ", dtype);
  }
}

template <typename T>
T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

constexpr auto kCPU = c10::DeviceType::CPU;

void check_cpu(const at::Tensor& t, const char* arg) { checks::on_device(t, kCPU, arg); }

// Index and group tensors in the layout the kernels read: a contiguous copy of
// any other view (an expanded or strided view read as if contiguous would see
// other memory), with every entry checked against [0, bound) (a scan of N*k
// values; on the CPU path there is no sync to pay). The flat position is the
// position in the view's logical (row-major) order.
at::Tensor contiguous_indices(const at::Tensor& indices, int64_t bound, const char* arg) {
  check_cpu(indices, arg);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, arg, " must be int64, got ", indices.scalar_type());
  auto dense = indices.contiguous();
  const int64_t* p = dense.data_ptr<int64_t>();
  const int64_t bad = cpu::find_invalid_index(p, dense.numel(), bound);
  TORCH_CHECK_INDEX(bad < 0, arg, " must lie in [0, ", bound, "), got ", bad < 0 ? 0 : p[bad],
                    " at flat position ", bad);
  return dense;
}

// Work split of the fused encode. One OpenMP region per call: each thread takes
// row blocks (dynamic schedule) and runs, for its block, a single-threaded GEMM
// per latent tile into a private score tile, then the selection of those rows.
// Threads never wait on each other inside the call, so a core taken by another
// process slows only its own blocks; the earlier design (a multithreaded GEMM
// and a parallel selection per tile: ~200 parallel regions per call) measured
// 1.20x the GEMM floor for the step at load 2.5 but 3.29x at load 3.
// Tiles: kTileElems scores (2 MB) per thread, sized to stay in L2 (2 MB a core).
// Work items: at least two per thread so a slowed thread sheds work. Row blocks
// of at most kRowBlock rows (each block streams all of W_enc once); with too few
// rows for that (e.g. 20 retrieval queries), latent ranges become separate items
// with selectors of their own, merged at the end: the retrieval benchmark (20 x
// 100k latents) went from 1.25x torch.topk(mm) at 2 threads with row blocks only
// to below it.
constexpr int64_t kTileElems = int64_t(1) << 19;
constexpr int64_t kRowBlock = 1024;
constexpr int64_t kMinRowBlock = 64;
constexpr int64_t kItemsPerThread = 2;

// C[rows, cols] = A[rows, d] B[cols, d]^T (row-major, C with leading dimension
// ldc) through ATen on raw buffers. Called by every thread of the encode's
// parallel region, where the BLAS behind at::mm runs single-threaded; the
// autograd keys are skipped because the buffers alias W_enc, which may
// require grad.
template <typename A>
void gemm_abt(int64_t rows, int64_t cols, int64_t d, const A* a, const A* b, A* c, int64_t ldc) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  auto out = at::from_blob(c, {rows, cols}, {ldc, 1}, opts);
  at::mm_out(out, at::from_blob(const_cast<A*>(a), {rows, d}, opts),
             at::from_blob(const_cast<A*>(b), {cols, d}, opts).t());
}

// Scores of a row block against a latent tile, scores[r * ldc + c] = a[r] . b[c].
// float accumulation (float32, bfloat16, float16 inputs) goes through our
// AVX-512 dot_tile where the CPU has it and it wins: MKL's sgemm runs at 32
// GFLOP/s per core here (AMD EPYC) for 20 retrieval queries x 384 and 74 for
// the training encode's 2048 x 768 blocks, dot_tile at 82 and 102. Once 4
// latents' rows outgrow L1, dot_tile falls behind on large row blocks: encode
// of 2048 x 16384 latents, ours / torch.mm with dot_tile vs MKL tiles: 0.81 vs
// 0.86 at d = 2304, 0.86 vs 0.82 at 3072, 1.36 vs 0.83 at 4096; with at most
// 64 rows it stays ahead at any width (20 x 4096: 0.30 vs 0.68 of topk(mm)).
constexpr int64_t kDotTileMaxWidth = 2560;
constexpr int64_t kDotTileAnyWidthRows = 64;

// A call too small for threads (serial) runs every tile through dot_tile, even
// without AVX-512: BLAS costs microseconds per call and, called outside a
// parallel region, starts threads of its own (tiny encodes measured 1.7 ms a
// tile at 2 threads while the other core was busy, against 10 us at 1).
template <typename A>
void score_tile(int64_t rows, int64_t cols, int64_t d, const A* a, const A* b, A* c, int64_t ldc, bool serial) {
  if constexpr (std::is_same_v<A, float>) {
    if (serial || (cpu::dot_tile_fast() && (rows <= kDotTileAnyWidthRows || d <= kDotTileMaxWidth)))
      return cpu::dot_tile(rows, cols, d, a, b, c, ldc);
  }
  gemm_abt<A>(rows, cols, d, a, b, c, ldc);
}

}  // namespace

namespace {

// Whether an encode is too small to be worth a parallel region: dense
// multiply-adds are cheap next to starting one.
bool serial_encode(int64_t rows, int64_t latents, int64_t d) {
  return !cpu::parallel_worth(rows * latents * d / 16);
}

}  // namespace

std::tuple<int64_t, int64_t, int64_t> topk_encode_plan_cpu(int64_t rows, int64_t latents, int64_t d,
                                                             bool exact_dtype) {
  // A serial call is one work item: splits only pay for themselves across threads.
  const int64_t items = serial_encode(rows, latents, d) ? 1 : kItemsPerThread * std::max(1, at::get_num_threads());
  const int64_t nb = std::max<int64_t>(1, std::min({rows, kRowBlock, std::max(kMinRowBlock, (rows + items - 1) / items)}));
  // A converted W tile (bfloat16/float16 inputs) takes as much room as its scores.
  const int64_t per_latent = exact_dtype ? nb : std::max(nb, d);
  int64_t mt = std::min(latents, std::max<int64_t>(64, kTileElems / per_latent / 64 * 64));
  const int64_t blocks = (rows + nb - 1) / nb;
  int64_t ranges = 1;
  if (blocks < items) {  // latent ranges of whole tiles make up the missing items
    const int64_t want = (items + blocks - 1) / blocks;
    mt = std::min(mt, std::max<int64_t>(64, ((latents + want - 1) / want + 63) / 64 * 64));
    ranges = std::min(want, (latents + mt - 1) / mt);
  }
  return {nb, mt, ranges};
}

namespace {

std::atomic<bool> bf16_dot_enabled{true};

// rows x d bfloat16 values as vdpbf16ps reads them, rows of ld (a multiple of
// 32) zero-padded: src itself when d == ld, else a copy in buf.
const uint16_t* padded_rows(const bf16* src, int64_t rows, int64_t d, int64_t ld, std::vector<uint16_t>& buf) {
  if (d == ld) return reinterpret_cast<const uint16_t*>(src);
  buf.assign(size_t(rows * ld), 0);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(&buf[size_t(r * ld)], src + r * d, size_t(d) * sizeof(bf16));
  return buf.data();
}

// bias - W b_dec in float32 for bfloat16 W and b_dec (products exact, float32
// sums): with it, the encode of bfloat16 inputs scores x . w directly, since
// (x - b_dec) . w + bias = x . w + (bias - b_dec . w).
at::Tensor fold_b_dec(const at::Tensor& W, const at::Tensor& b_dec, const at::Tensor& bias, int64_t ld) {
  const int64_t M = W.size(0), d = W.size(1);
  auto out = at::empty({M}, bias.options());
  std::vector<uint16_t> shift_buf;
  const auto shift = b_dec.contiguous();
  const uint16_t* shift16 = padded_rows(ptr<bf16>(shift), 1, d, ld, shift_buf);
  const auto* wp = reinterpret_cast<const uint16_t*>(W.data_ptr());
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kChunk = 256;
#pragma omp parallel if (cpu::parallel_worth(M * d))
  {
    std::vector<uint16_t> panels(size_t(kChunk * ld));
    float dots[kChunk];
#pragma omp for schedule(static)
    for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
      const int64_t cols = std::min(kChunk, M - m0);
      cpu::pack_bf16_panels(cols, d, ld, wp + m0 * d, panels.data());
      cpu::dot_tile_bf16(1, cols, ld, shift16, panels.data(), dots, kChunk);
      for (int64_t c = 0; c < cols; ++c) op[m0 + c] = bp[m0 + c] - dots[c];
    }
  }
  return out;
}

// The bfloat16 screen (TopKSelector::consume_screened) runs the GEMM at twice
// the float32 rate and scores exactly only the latents that may reach a row's
// top k; its results equal the float32 encode's because rescoring repeats
// dot_tile's arithmetic, so it runs only where the float32 path would use
// dot_tile. Not for serial calls (converting and bounding costs more than it
// saves there) nor for k above 1/64 of the latents, where the exact rescoring
// of the candidates would approach a second GEMM.
constexpr int64_t kScreenLatentsPerK = 64;

}  // namespace

void set_bf16_dot(bool enabled) { bf16_dot_enabled.store(enabled); }

bool topk_encode_screens_cpu(int64_t rows, int64_t latents, int64_t d, int64_t k) {
  if (!bf16_dot_enabled.load() || !cpu::dot_tile_fast() || !cpu::dot_tile_bf16_available()) return false;
  if (serial_encode(rows, latents, d) || k * kScreenLatentsPerK > latents) return false;
  const auto [nb, mt, splits] = topk_encode_plan_cpu(rows, latents, d, false);
  // Each latent range scores its first tile exactly (see topk_encode_cpu): one tile a range leaves nothing to screen.
  const int64_t tiles = (latents + mt - 1) / mt;
  if ((tiles + splits - 1) / splits < 2) return false;
  return d <= kDotTileMaxWidth || nb <= kDotTileAnyWidthRows;  // score_tile's dot_tile cases
}

namespace {

// The fused encode of topk_encode and threshold_encode (arguments checked):
// score tiles, each handed to a running top-k per row. With `threshold` (an
// [M] tensor of the accumulation type) only pre-activations above it compete,
// counts[n] gets how many did, values are not ReLU'd and slots past a row's
// count hold -inf (the caller clears them).
std::tuple<at::Tensor, at::Tensor> fused_encode(const at::Tensor& x, const at::Tensor& W_enc,
                                                const std::optional<at::Tensor>& b_enc, int64_t k,
                                                const std::optional<at::Tensor>& b_dec, const at::Tensor& threshold,
                                                int64_t* counts) {
  const int64_t N = x.size(0), d = x.size(1), M = W_enc.size(0);
  // Latents are stored as int32 in the selection state.
  TORCH_CHECK(M < INT32_MAX, "W_enc has ", M, " latents; at most 2^31 - 2 are supported");

  const bool f64 = x.scalar_type() == at::kDouble;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  const bool exact = x.scalar_type() == acc;  // no conversion of W tiles needed
  auto values = at::empty({N, k}, x.options());
  auto indices = at::empty({N, k}, x.options().dtype(at::kLong));
  const auto xc = x.contiguous(), W = W_enc.contiguous();
  // Without b_enc the selector adds a zero bias: O(M) floats, next to the O(M d) weights.
  const auto bias_acc = b_enc ? b_enc->to(acc).contiguous() : at::zeros({M}, x.options().dtype(acc));
  // The screen prunes against a row's k-th best; a threshold encode has no use for it.
  const bool screen = x.scalar_type() == at::kFloat && !threshold.defined() && topk_encode_screens_cpu(N, M, d, k);
  // bfloat16 inputs on a CPU with AVX512_BF16 are scored by vdpbf16ps as they are, b_dec folded into the bias.
  const bool native16 = x.scalar_type() == at::kBFloat16 && bf16_dot_enabled.load() && cpu::dot_tile_bf16_available();
  // Rows as vdpbf16ps reads them: d rounded up to its 32 lanes.
  const int64_t ld16 = (d + 31) / 32 * 32;
  const auto bias = !(native16 && b_dec) ? bias_acc : fold_b_dec(W, *b_dec, bias_acc, ld16);
  const auto shift = b_dec && !native16 ? b_dec->to(acc).contiguous() : at::Tensor();
  const auto [nb, mt, splits] = topk_encode_plan_cpu(N, M, d, exact && !screen);
  const int64_t blocks = (N + nb - 1) / nb, tiles = (M + mt - 1) / mt;
  const int64_t tiles_per_split = (tiles + splits - 1) / splits;

  dispatch_dtype(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    using A = cpu::acc_t<T>;
    std::vector<cpu::TopKSelector<A>> selectors;
    for (int64_t s = 0; s < splits; ++s) selectors.emplace_back(N, k);
    const T* xp = ptr<T>(xc);
    const T* wp = ptr<T>(W);
    const A* bp = bias.data_ptr<A>();
    const A* sp = shift.defined() ? shift.data_ptr<A>() : nullptr;
    const A* tp = threshold.defined() ? threshold.data_ptr<A>() : nullptr;
    // A threshold encode counts per latent range, summed at the end.
    std::vector<std::vector<int64_t>> range_counts(tp ? splits : 0, std::vector<int64_t>(tp ? N : 0, 0));
    // Rows are copied (and centred) only when needed: float32/float64 without b_dec GEMM x in place.
    const bool copy_rows = !native16 && (!exact || sp != nullptr);
    const bool serial = serial_encode(N, M, d);
#pragma omp parallel if (!serial)
    {
      std::vector<A> scores(nb * mt), rows_buf(copy_rows ? nb * d : 0), w_buf(exact || native16 ? 0 : mt * d);
      // vdpbf16ps operands (the screen's, or padded bfloat16 inputs), the screen's bounds (ScreenTile).
      std::vector<uint16_t> rows16(screen ? nb * ld16 : 0), w16(screen || native16 ? (mt + 15) / 16 * 16 * ld16 : 0);
      std::vector<cpu::Bf16Norms> col_norms(screen ? mt : 0);
      const uint16_t* xb16 = nullptr;
      std::vector<float> row_a(screen ? nb : 0), row_b(screen ? nb : 0);
      std::vector<float> col_a(screen ? mt : 0), col_b(screen ? mt : 0), col_reach(screen ? mt : 0);
      const std::vector<A> negative_zeros(tp ? mt : 0, -A(0));
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < blocks * splits; ++item) {
        const int64_t blk = item / splits, split = item % splits;
        const int64_t n0 = blk * nb, rows = std::min(nb, N - n0);
        // Hands the score tile of latents [m0, m0 + cols) to the selection.
        const auto select = [&](int64_t m0, int64_t cols) {
          if (tp) {
            cpu::keep_above<A>(scores.data(), mt, rows, cols, bp + m0, tp + m0, range_counts[split].data() + n0);
            selectors[split].consume(scores.data(), mt, n0, rows, m0, cols, negative_zeros.data());
          } else {
            selectors[split].consume(scores.data(), mt, n0, rows, m0, cols, bp + m0);
          }
        };
        const A* xb = reinterpret_cast<const A*>(xp + n0 * d);
        if (copy_rows) {
          for (int64_t r = 0; r < rows; ++r) {
            const T* src = xp + (n0 + r) * d;
            A* dst = rows_buf.data() + r * d;
            for (int64_t c = 0; c < d; ++c) dst[c] = cpu::load<A>(src[c]) - (sp ? sp[c] : A(0));
          }
          xb = rows_buf.data();
        }
        if constexpr (std::is_same_v<T, bf16>) {
          if (native16) xb16 = padded_rows(xp + n0 * d, rows, d, ld16, rows16);
        }
        if constexpr (std::is_same_v<T, float>) {
          if (screen)
            for (int64_t r = 0; r < rows; ++r) {
              const auto bound = cpu::screen_row(cpu::to_bf16_row(d, ld16, xb + r * d, &rows16[r * ld16]), d);
              row_a[r] = bound.a, row_b[r] = bound.b;
            }
        }
        const int64_t m_end = std::min(M, (split + 1) * tiles_per_split * mt);
        const int64_t m_begin = split * tiles_per_split * mt;
        for (int64_t m0 = m_begin; m0 < m_end; m0 += mt) {
          const int64_t cols = std::min(mt, M - m0);
          if constexpr (std::is_same_v<T, bf16>) {
            if (native16) {
              cpu::pack_bf16_panels(cols, d, ld16, reinterpret_cast<const uint16_t*>(wp + m0 * d), w16.data());
              cpu::dot_tile_bf16(rows, cols, ld16, xb16, w16.data(), scores.data(), mt);
              select(m0, cols);
              continue;
            }
          }
          const A* wb = reinterpret_cast<const A*>(wp + m0 * d);
          if (!exact) {
            for (int64_t i = 0; i < cols * d; ++i) w_buf[i] = cpu::load<A>(wp[m0 * d + i]);
            wb = w_buf.data();
          }
          if constexpr (std::is_same_v<T, float>) {
            // A range's first tile is scored exactly: it sets each row's first
            // threshold, below which a screen would pass most of the tile.
            if (screen && m0 != m_begin) {
              cpu::pack_bf16_panels(cols, d, ld16, wb, w16.data(), col_norms.data());
              for (int64_t c = 0; c < cols; ++c) {
                const auto bound = cpu::screen_col(col_norms[c], bp[m0 + c], d);
                col_a[c] = bound.a, col_b[c] = bound.b, col_reach[c] = bound.reach;
              }
              cpu::dot_tile_bf16(rows, cols, ld16, rows16.data(), w16.data(), scores.data(), mt);
              const cpu::ScreenTile tile{scores.data(), mt, row_a.data(), row_b.data(), col_a.data(), col_b.data(),
                                         col_reach.data(), xb, wb, d};
              selectors[split].consume_screened(tile, n0, rows, m0, cols, bp + m0);
              continue;
            }
          }
          score_tile<A>(rows, cols, d, xb, wb, scores.data(), mt, serial);
          select(m0, cols);
        }
      }
    }
    for (int64_t s = 1; s < splits; ++s) selectors[0].merge(selectors[s]);
    selectors[0].template finish<T>(ptr<T>(values), indices.data_ptr<int64_t>(), /*relu=*/tp == nullptr);
    for (const auto& part : range_counts)
      for (int64_t n = 0; n < N; ++n) counts[n] += part[n];
  });
  return {values, indices};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                   const std::optional<at::Tensor>& b_enc, int64_t k,
                                                   const std::optional<at::Tensor>& b_dec) {
  checks::encode_args(x, W_enc, b_enc, k, b_dec, kCPU);
  return fused_encode(x, W_enc, b_enc, k, b_dec, at::Tensor(), nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                                    const std::optional<at::Tensor>& b_enc,
                                                                    const at::Tensor& threshold, int64_t max_k,
                                                                    const std::optional<at::Tensor>& b_dec) {
  checks::encode_args(x, W_enc, b_enc, max_k, b_dec, kCPU, "max_k");
  const int64_t N = x.size(0), M = W_enc.size(0);
  checks::threshold_arg(threshold, x, M);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto per_latent = threshold.to(acc).expand({M}).contiguous();
  TORCH_CHECK_VALUE(at::isfinite(per_latent).all().item<bool>(), "threshold must be finite, got ",
                    at::isfinite(per_latent).logical_not().sum().item<int64_t>(), " non-finite entries");
  auto counts = at::zeros({N}, x.options().dtype(at::kLong));
  auto [values, indices] = fused_encode(x, W_enc, b_enc, max_k, b_dec, per_latent, counts.data_ptr<int64_t>());
  // Slots past a row's count (they hold -inf): value 0, index 0.
  const auto empty = at::arange(max_k, counts.options()).unsqueeze(0) >= counts.unsqueeze(1);
  values.masked_fill_(empty, 0);
  indices.masked_fill_(empty, 0);
  return {values, indices, counts};
}

namespace {

// The decode ops' checks; returns their indices, contiguous and range-checked.
at::Tensor decode_indices(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                          const std::optional<at::Tensor>& b_dec) {
  checks::decode_args(values, indices, W_dec, b_dec, kCPU);
  return contiguous_indices(indices, W_dec.size(0), "indices");
}

}  // namespace

at::Tensor sparse_decode_cpu(const at::Tensor& values, const at::Tensor& indices,
                             const at::Tensor& W_dec, const std::optional<at::Tensor>& b_dec) {
  const auto ix = decode_indices(values, indices, W_dec, b_dec);
  const int64_t N = values.size(0), k = values.size(1), d = W_dec.size(1);
  auto out = at::empty({N, d}, values.options());
  const auto v = values.contiguous(), W = W_dec.contiguous();
  const auto b = b_dec ? b_dec->contiguous() : at::Tensor();
  dispatch_dtype(values.scalar_type(), "values", [&](auto tag) {
    using T = decltype(tag);
    cpu::sparse_decode<T>(ptr<T>(v), ix.data_ptr<int64_t>(), ptr<T>(W), b.defined() ? ptr<T>(b) : nullptr,
                          N, k, d, ptr<T>(out));
  });
  return out;
}

at::Tensor sparse_decode_sq_error_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                                      const std::optional<at::Tensor>& b_dec, const at::Tensor& x) {
  const auto ix = decode_indices(values, indices, W_dec, b_dec);
  checks::decode_target(x, values, W_dec);
  const int64_t N = values.size(0), k = values.size(1), d = W_dec.size(1);
  const auto acc = values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({N}, values.options().dtype(acc));
  const auto v = values.contiguous(), W = W_dec.contiguous(), xc = x.contiguous();
  const auto b = b_dec ? b_dec->contiguous() : at::Tensor();
  dispatch_dtype(values.scalar_type(), "values", [&](auto tag) {
    using T = decltype(tag);
    cpu::sparse_decode_sq_error<T>(ptr<T>(v), ix.data_ptr<int64_t>(), ptr<T>(W),
                                   b.defined() ? ptr<T>(b) : nullptr, ptr<T>(xc), N, k, d,
                                   ptr<cpu::acc_t<T>>(out));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_residual_cpu(const at::Tensor& values, const at::Tensor& indices,
                                                              const at::Tensor& W_dec,
                                                              const std::optional<at::Tensor>& b_dec,
                                                              const at::Tensor& x, const at::Tensor& scale) {
  const auto ix = decode_indices(values, indices, W_dec, b_dec);
  checks::decode_target(x, values, W_dec);
  checks::row_scale(scale, values, values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const int64_t N = values.size(0), k = values.size(1), d = W_dec.size(1);
  auto residual = at::empty({N, d}, values.options());
  auto grad_values = at::empty({N, k}, values.options());
  const auto v = values.contiguous(), W = W_dec.contiguous(), xc = x.contiguous();
  const auto s = scale.contiguous();
  const auto b = b_dec ? b_dec->contiguous() : at::Tensor();
  dispatch_dtype(values.scalar_type(), "values", [&](auto tag) {
    using T = decltype(tag);
    cpu::sparse_decode_residual<T>(ptr<T>(v), ix.data_ptr<int64_t>(), ptr<T>(W), b.defined() ? ptr<T>(b) : nullptr,
                                   ptr<T>(xc), ptr<cpu::acc_t<T>>(s), N, k, d, ptr<T>(residual),
                                   ptr<T>(grad_values));
  });
  return {residual, grad_values};
}

at::Tensor row_sq_error_cpu(const at::Tensor& x_hat, const at::Tensor& x) {
  checks::row_error_args(x_hat, x, kCPU);
  const auto acc = x_hat.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({x_hat.size(0)}, x_hat.options().dtype(acc));
  const auto a = x_hat.contiguous(), b = x.contiguous();
  dispatch_dtype(x_hat.scalar_type(), "x_hat", [&](auto tag) {
    using T = decltype(tag);
    cpu::row_sq_error<T>(ptr<T>(a), ptr<T>(b), a.size(0), a.size(1), ptr<cpu::acc_t<T>>(out));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tilted_group_stats_cpu(const at::Tensor& losses, double t,
                                                                      const std::optional<at::Tensor>& groups,
                                                                      int64_t num_groups) {
  check_cpu(losses, "losses");
  checks::dim(losses, 1, "losses", "[N]");
  TORCH_CHECK_VALUE(losses.size(0) > 0, "losses must not be empty");
  TORCH_CHECK_VALUE(num_groups >= 1, "num_groups must be >= 1, got ", num_groups);
  const int64_t n = losses.size(0);
  at::Tensor g;
  if (groups) {
    checks::dim(*groups, 1, "groups", "[N]");
    checks::same_size(groups->size(0), n, "groups must have one id per loss");
    g = contiguous_indices(*groups, num_groups, "groups");
  } else {
    TORCH_CHECK_VALUE(num_groups == 1, "num_groups must be 1 without groups, got ", num_groups);
  }
  auto opts = losses.options().dtype(at::kDouble);
  auto anchor = at::empty({num_groups}, opts), log_mean = at::empty({num_groups}, opts);
  auto count = at::empty({num_groups}, opts.dtype(at::kLong));
  const auto l = losses.contiguous();
  dispatch_dtype(losses.scalar_type(), "losses", [&](auto tag) {
    using T = decltype(tag);
    cpu::tilted_group_stats<T>(ptr<T>(l), n, t, g.defined() ? g.data_ptr<int64_t>() : nullptr, num_groups,
                               anchor.data_ptr<double>(), log_mean.data_ptr<double>(), count.data_ptr<int64_t>());
  });
  return {anchor, log_mean, count};
}

at::Tensor sampled_dot_cpu(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& W) {
  checks::sampled_dot_args(grad, indices, W, kCPU);
  const auto ix = contiguous_indices(indices, W.size(0), "indices");
  const int64_t N = grad.size(0), k = indices.size(1), d = grad.size(1);
  auto out = at::empty({N, k}, grad.options());
  const auto g = grad.contiguous(), Wc = W.contiguous();
  dispatch_dtype(grad.scalar_type(), "grad", [&](auto tag) {
    using T = decltype(tag);
    cpu::sampled_dot<T>(ptr<T>(g), ix.data_ptr<int64_t>(), ptr<T>(Wc), N, k, d, ptr<T>(out));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> latent_transpose_cpu(const at::Tensor& indices, int64_t num_latents) {
  TORCH_CHECK_VALUE(num_latents >= 1, "num_latents must be >= 1, got ", num_latents);
  const auto ix = contiguous_indices(indices, num_latents, "indices");
  auto offsets = at::empty({num_latents + 1}, ix.options());
  auto order = at::empty({ix.numel()}, ix.options());
  cpu::latent_transpose(ix.data_ptr<int64_t>(), ix.numel(), num_latents, offsets.data_ptr<int64_t>(),
                        order.data_ptr<int64_t>());
  return {offsets, order};
}

std::tuple<at::Tensor, at::Tensor> sparse_transpose_matmul_cpu(const at::Tensor& weights,
                                                               const at::Tensor& rows,
                                                               const at::Tensor& offsets,
                                                               const at::Tensor& order) {
  checks::transpose_matmul_args(weights, rows, offsets, order, kCPU);
  const int64_t N = weights.size(0), k = weights.size(1), d = rows.size(1), M = offsets.size(0) - 1;
  const auto off = offsets.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(o[0] == 0 && o[M] == N * k, "offsets must run from 0 to N * k = ", N * k, " (from latent_transpose)");
  // Non-decreasing, so every latent's entries lie inside order.
  TORCH_CHECK_VALUE(std::is_sorted(o, o + M + 1), "offsets must be non-decreasing (from latent_transpose)");
  const auto ord = contiguous_indices(order, N * k, "order");
  auto out = at::empty({M, d}, rows.options());
  auto colsum = at::empty({M}, rows.options());
  const auto w = weights.contiguous(), X = rows.contiguous();
  dispatch_dtype(weights.scalar_type(), "weights", [&](auto tag) {
    using T = decltype(tag);
    cpu::sparse_transpose_matmul<T>(ptr<T>(w), ptr<T>(X), k, d, o, ord.data_ptr<int64_t>(), M, ptr<T>(out),
                                    ptr<T>(colsum));
  });
  return {out, colsum};
}

namespace {

void run_project(const at::Tensor& G, const at::Tensor& U, bool complement, const at::Tensor& out) {
  const auto Uc = U.contiguous();
  const int64_t d = G.size(0), n = G.size(1), r = U.size(1);
  dispatch_dtype(G.scalar_type(), "G", [&](auto tag) {
    using T = decltype(tag);
    cpu::project_subspace<T>(ptr<T>(G), checks::row_stride(G), ptr<T>(Uc), d, r, n, complement, ptr<T>(out),
                             checks::row_stride(out));
  });
}

}  // namespace

at::Tensor project_subspace_cpu(const at::Tensor& G, const at::Tensor& U, bool complement) {
  checks::project_args(G, U, kCPU);
  return checks::project_out_of_place(G, U, complement, run_project);
}

void project_subspace__cpu(const at::Tensor& G, const at::Tensor& U, bool complement) {
  checks::project_args(G, U, kCPU);
  checks::project_in_place(G, U, complement, run_project);
}

void sparse_adam__cpu(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& rows, const std::optional<at::Tensor>& grad, const at::Tensor& catchup,
                      double lr, double beta1, double beta2, double eps, int64_t step, int64_t seed) {
  checks::adam_args(param, exp_avg, exp_avg_sq, rows, grad, catchup, lr, beta1, beta2, eps, step, kCPU);
  const auto dense_rows = rows.contiguous();
  bool duplicate = false;
  const int64_t* r = dense_rows.data_ptr<int64_t>();
  const int64_t bad = cpu::find_bad_row(r, dense_rows.numel(), param.size(0), &duplicate);
  TORCH_CHECK_VALUE(bad == dense_rows.numel() || !duplicate,
                    "rows must be distinct: a row listed twice would be updated twice (row ", r[bad],
                    " at position ", bad, ")");
  TORCH_CHECK_INDEX(bad == dense_rows.numel(), "rows must lie in [0, ", param.size(0), "), got ", r[bad],
                    " at flat position ", bad);
  if (dense_rows.numel() == 0) return;
  checks::with_rows_strided({param, exp_avg, exp_avg_sq}, [&](const std::vector<at::Tensor>& t) {
    const auto g = grad ? std::optional<at::Tensor>(checks::rows_strided(*grad) ? *grad : grad->contiguous())
                        : std::nullopt;
    const auto c = catchup.contiguous();
    const auto run = [&](auto param_tag, auto state_tag) {
      using T = decltype(param_tag);
      using S = decltype(state_tag);
      cpu::sparse_adam<T, S>({ptr<T>(t[0]), checks::row_stride(t[0]), ptr<S>(t[1]), checks::row_stride(t[1]),
                              ptr<S>(t[2]), checks::row_stride(t[2]), r, dense_rows.numel(),
                              g ? ptr<T>(*g) : nullptr, g ? checks::row_stride(*g) : 0, ptr<T>(c), param.size(1),
                              lr, beta1, beta2, eps, step, seed});
    };
    if (param.scalar_type() == at::kDouble) run(double{}, double{});
    else if (exp_avg.scalar_type() == at::kBFloat16) run(float{}, bf16{});
    else run(float{}, float{});
  });
}

}  // namespace ssae
