#include "cuda_ops.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "arg_checks.h"
#include "../kernels/cuda/launch.h"
#include "../kernels/cuda/project_subspace.cuh"
#include "../kernels/cuda/sparse_adam.cuh"
#include "../kernels/cuda/sparse_backward.cuh"
#include "../kernels/cuda/sparse_decode.cuh"
#include "../kernels/cuda/tilted_loss.cuh"
#include "../kernels/cuda/topk_encode.cuh"

namespace ssae {
namespace {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f with Tag<storage type of dtype> (the CUDA kernels' bfloat16/float16 types).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* arg, F&& f) {
  switch (dtype) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    default:
      TORCH_CHECK_TYPE(false, arg, " must be float32, bfloat16 or float16 on the cuda backend, got ", dtype,
                       " (float64 runs on the reference backend)");
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Index ranges are not checked on this backend: that needs a device-to-host copy
// (a sync) per call. The kernels never dereference an out-of-range index; they
// make the affected outputs NaN instead (see sparse_decode.cuh, sparse_backward.cuh).
constexpr auto kCUDA = c10::DeviceType::CUDA;

void check_cuda(const at::Tensor& t, const char* arg) { checks::on_device(t, kCUDA, arg); }


}  // namespace

namespace {

// A CUDA event for ordering two streams (no timing), created on first use.
// Raw CUDA rather than ATen's CUDAEvent, whose header pulls in cuBLAS and
// cuSPARSE headers (absent from the toolkit of the compile check) and whose
// location differs between torch versions.
class StreamEvent {
 public:
  StreamEvent() = default;
  StreamEvent(const StreamEvent&) = delete;
  StreamEvent& operator=(const StreamEvent&) = delete;
  ~StreamEvent() {
    if (event_) C10_CUDA_CHECK_WARN(cudaEventDestroy(event_));
  }
  void record(cudaStream_t stream) {
    if (!event_) C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(event_, stream));
  }
  // Work queued on `stream` after this waits for the last record (nothing if never recorded).
  void block(cudaStream_t stream) const {
    if (event_) C10_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0));
  }

 private:
  cudaEvent_t event_ = nullptr;
};

}  // namespace

namespace {

// The fused encode of topk_encode and threshold_encode (arguments checked). With
// `threshold` (float32 [M]) only scores above their latent's threshold are
// selected (topk_select.h: below_key), values are raw, and the third result
// holds each row's count of scores above threshold; otherwise it is undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_encode(const at::Tensor& x, const at::Tensor& W_enc,
                                                            const std::optional<at::Tensor>& b_enc, int64_t k,
                                                            const std::optional<at::Tensor>& b_dec,
                                                            const at::Tensor& threshold) {
  const int64_t N = x.size(0), d = x.size(1), M = W_enc.size(0);
  // Latents are packed into 32 bits of the selection keys.
  TORCH_CHECK(M < (int64_t(1) << 32), "W_enc has ", M, " latents; the cuda backend supports at most 2^32 - 1");
  const auto dtype = x.scalar_type();
  dispatch_dtype(dtype, "x", [](auto) {});

  c10::cuda::CUDAGuard guard(x.device());
  const c10::cuda::CUDAStream main_stream = c10::cuda::getCurrentCUDAStream();
  const cudaStream_t stream = main_stream.stream();
  // b_dec: a bfloat16/float16 x - b_dec is not exact in the input type, and a
  // float32 GEMM would forgo the tensor cores, so W @ b_dec is folded into the
  // bias: b_dec rides as one extra row of the GEMM's left operand (x enters
  // the GEMM as it is; products of 16-bit numbers are exact in float32), and
  // fold_chunk_bias turns that score row into b_enc - W_chunk @ b_dec. Then
  // pre = x @ W.T + (b_enc - W @ b_dec): one GEMM, W read once.
  // float32 x is centred in float32 (what the reference computes).
  const auto bdec = !b_dec ? cuda::BDec::kNone : dtype == at::kFloat ? cuda::BDec::kCentre : cuda::BDec::kFold;
  const bool fold = bdec == cuda::BDec::kFold;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  const auto plan = cuda::plan_topk_encode(N, M, d, k, bdec, x.element_size(), sms);
  const int64_t R = plan.row_block, C = plan.latent_chunk;

  auto values = at::empty({N, k}, x.options());
  auto indices = at::empty({N, k}, x.options().dtype(at::kLong));
  const auto f32 = x.options().dtype(at::kFloat);
  // float32 b_enc [M] (only read). W_enc is read where it lies, any strides:
  // each GEMM chunk is a view that cuBLAS takes as it is; no copy of W.
  const auto bias = b_enc ? b_enc->to(at::kFloat).contiguous() : fold ? at::Tensor() : at::zeros({M}, f32);
  const float* bias_ptr = bias.defined() ? bias.data_ptr<float>() : nullptr;
  auto scores = at::empty({plan.score_buffers, plan.score_rows * C}, f32);
  auto cand = at::empty({R * C}, x.options().dtype(at::kInt));
  auto state = at::empty({2, R * plan.splits * plan.state_stride}, x.options().dtype(at::kLong));
  auto row_min = at::empty({R * plan.splits}, x.options().dtype(at::kLong));
  auto state_ptr = [&](int parity) { return reinterpret_cast<cuda::topk_key*>(state[parity].data_ptr()); };
  const bool raw = threshold.defined();
  // threshold_encode: per (row, split) counts of scores above threshold (each < 2^31: a split holds fewer latents)
  auto above = raw ? at::zeros({N * plan.splits}, x.options().dtype(at::kInt)) : at::Tensor();
  const float* threshold_ptr = raw ? threshold.data_ptr<float>() : nullptr;

  // Overlap (docs/cuda.md): with more than one GEMM chunk, the GEMMs run on a
  // second stream into two score buffers, so that the GEMM of chunk g + 1 runs
  // while chunk g is selected. Events order GEMM g after the inputs and after
  // the selection that last read its buffer (g - 2), and selection g after
  // GEMM g (and its fold); the last selection waits for the last GEMM, so the
  // current stream is joined with the GEMM stream when this returns. Tensors
  // the GEMM stream allocates (the centred or extended row block) come from
  // its own pool.
  const bool overlap = plan.score_buffers > 1;
  const c10::cuda::CUDAStream gemm_stream =
      overlap ? c10::cuda::getStreamFromPool(/*isHighPriority=*/false, x.device().index()) : main_stream;
  StreamEvent inputs_ready, gemm_done[2], select_done[2];
  if (overlap) {
    inputs_ready.record(stream);
    inputs_ready.block(gemm_stream.stream());
  }

  at::Tensor lhs;  // the GEMM's left operand for the current row block
  cuda::encode_pipeline(
      plan, N, M,
      [&](const cuda::EncodeStep& s) {
        c10::cuda::CUDAStreamGuard on_gemm_stream(gemm_stream);
        if (overlap && s.index >= plan.score_buffers) select_done[s.buffer].block(gemm_stream.stream());
        if (s.first) {
          const auto xb = x.narrow(0, s.n0, s.rows);
          lhs = bdec == cuda::BDec::kCentre ? xb - *b_dec : fold ? at::cat({xb, b_dec->unsqueeze(0)}, 0) : xb;
        }
        const int64_t gemm_rows = lhs.size(0);  // rows, + 1 with the fold row
        auto tile = scores[s.buffer].narrow(0, 0, gemm_rows * s.cols).view({gemm_rows, s.cols});
        const auto w_chunk = W_enc.narrow(0, s.m0, s.cols).t();
        if (dtype == at::kFloat) at::mm_out(tile, lhs, w_chunk);
        else at::mm_out(tile, lhs, w_chunk, at::kFloat);  // float32 output of a bf16/f16 tensor-core GEMM
        if (fold)
          C10_CUDA_CHECK(cuda::fold_chunk_bias(tile.data_ptr<float>() + s.rows * s.cols,
                                               bias_ptr ? bias_ptr + s.m0 : nullptr, s.cols, gemm_stream.stream()));
        if (overlap) gemm_done[s.buffer].record(gemm_stream.stream());
      },
      [&](const cuda::EncodeStep& s) {
        if (overlap) gemm_done[s.buffer].block(stream);
        const float* tile = scores[s.buffer].data_ptr<float>();
        C10_CUDA_CHECK(cuda::topk_select_chunk(
            tile, s.cols, fold ? tile + s.rows * s.cols : bias_ptr + s.m0, s.rows, s.cols, s.m0, s.seen,
            k, plan.splits, plan.split_latents, plan.state_stride, state_ptr(s.parity), state_ptr(s.parity ^ 1),
            reinterpret_cast<cuda::topk_key*>(row_min.data_ptr()), reinterpret_cast<uint32_t*>(cand.data_ptr()), C,
            raw ? threshold_ptr + s.m0 : nullptr,
            raw ? reinterpret_cast<uint32_t*>(above.data_ptr()) + s.n0 * plan.splits : nullptr, stream));
        if (overlap) select_done[s.buffer].record(stream);
      },
      [&](const cuda::EncodeStep& s, int parity) {
        dispatch_dtype(dtype, "x", [&](auto tag) {
          using T = typename decltype(tag)::type;
          C10_CUDA_CHECK(cuda::topk_finish<T>(state_ptr(parity), state_ptr(parity ^ 1), s.rows, k, plan.splits, M, C,
                                              plan.split_latents, plan.state_stride, ptr<T>(values) + s.n0 * k,
                                              indices.data_ptr<int64_t>() + s.n0 * k, raw, stream));
        });
      });
  if (!raw) return {values, indices, at::Tensor()};
  return {values, indices, above.view({N, plan.splits}).to(at::kLong).sum(1)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_encode_cuda(const at::Tensor& x, const at::Tensor& W_enc,
                                                    const std::optional<at::Tensor>& b_enc, int64_t k,
                                                    const std::optional<at::Tensor>& b_dec) {
  checks::encode_args(x, W_enc, b_enc, k, b_dec, kCUDA);
  auto [values, indices, counts] = fused_encode(x, W_enc, b_enc, k, b_dec, at::Tensor());
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_encode_cuda(const at::Tensor& x, const at::Tensor& W_enc,
                                                                     const std::optional<at::Tensor>& b_enc,
                                                                     const at::Tensor& threshold, int64_t max_k,
                                                                     const std::optional<at::Tensor>& b_dec) {
  checks::encode_args(x, W_enc, b_enc, max_k, b_dec, kCUDA, "max_k");
  const int64_t M = W_enc.size(0);
  checks::threshold_arg(threshold, x, M);
  // compared with the float32 scores, as on the other backends
  const auto per_latent = threshold.to(at::kFloat).expand({M}).contiguous();
  TORCH_CHECK_VALUE(at::isfinite(per_latent).all().item<bool>(), "threshold must be finite, got ",
                    at::isfinite(per_latent).logical_not().sum().item<int64_t>(), " non-finite entries");
  return fused_encode(x, W_enc, b_enc, max_k, b_dec, per_latent);
}

namespace {

// Weights ([M, d]: W_dec, W) are read in place through their row stride, never
// copied: a copy of a view costs O(M * d) per call (8 GB at M = 2^20, d = 4096 in
// float16). A layout without unit column stride (a transposed view) is rejected;
// the op declarations state the same limit for the router (ops/sparse_backward.py:
// strided_weight_problem), with the same words.
int64_t weight_row_stride(const at::Tensor& W, const char* arg) {
  TORCH_CHECK_VALUE(W.size(1) <= 1 || W.stride(1) == 1, arg,
                    " must have unit stride in its last dimension on the cuda backend (weights are read in place, "
                    "never copied), got strides ", W.strides(), "; call .contiguous() once outside the training loop");
  return W.size(0) <= 1 ? 0 : W.stride(0);  // one row: its stride is never used
}

// Activations and gradients ([N, d]: grad, rows) are read through their row stride too;
// only a layout without unit column stride is copied, which costs O(N * d), the size of
// the call's own output or input.
at::Tensor unit_column_stride(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }
int64_t activation_row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? 0 : t.stride(0); }

}  // namespace

at::Tensor sparse_decode_cuda(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                              const std::optional<at::Tensor>& b_dec) {
  checks::decode_args(values, indices, W_dec, b_dec, kCUDA);
  const int64_t N = values.size(0), k = values.size(1), d = W_dec.size(1), M = W_dec.size(0);
  const int64_t ldw = weight_row_stride(W_dec, "W_dec");

  c10::cuda::CUDAGuard guard(values.device());
  auto out = at::empty({N, d}, values.options());
  // values, indices: O(N * k); b_dec: O(d).
  const auto v = values.contiguous(), ix = indices.contiguous();
  const auto b = b_dec ? b_dec->contiguous() : at::Tensor();
  dispatch_dtype(values.scalar_type(), "values", [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::sparse_decode<T>(ptr<T>(v), ix.data_ptr<int64_t>(), ptr<T>(W_dec), ldw,
                                          b.defined() ? ptr<T>(b) : nullptr, N, k, d, M, ptr<T>(out),
                                          c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

at::Tensor sampled_dot_cuda(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& W) {
  checks::sampled_dot_args(grad, indices, W, kCUDA);
  const int64_t N = grad.size(0), k = indices.size(1), d = grad.size(1);
  const int64_t ldw = weight_row_stride(W, "W");

  c10::cuda::CUDAGuard guard(grad.device());
  auto out = at::empty({N, k}, grad.options());
  const auto g = unit_column_stride(grad), ix = indices.contiguous();  // indices: O(N * k)
  dispatch_dtype(grad.scalar_type(), "grad", [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::sampled_dot<T>(ptr<T>(g), activation_row_stride(g), ix.data_ptr<int64_t>(), ptr<T>(W), ldw,
                                        N, k, d, W.size(0), ptr<T>(out), c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> latent_transpose_cuda(const at::Tensor& indices, int64_t num_latents) {
  check_cuda(indices, "indices");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(num_latents >= 1, "num_latents must be >= 1, got ", num_latents);
  TORCH_CHECK(num_latents < (int64_t(1) << 32) - 1, "num_latents must be < 2^32 - 1 on the cuda backend, got ",
              num_latents);
  const int64_t count = indices.numel();
  TORCH_CHECK(count <= cuda::kMaxTransposeEntries, "indices has ", count,
              " entries; the cuda backend's transpose supports at most 2^31 - 1");

  c10::cuda::CUDAGuard guard(indices.device());
  const auto ix = indices.contiguous();
  auto offsets = at::empty({num_latents + 1}, ix.options());
  auto order = at::empty({count}, ix.options());
  const size_t bytes = cuda::latent_transpose_workspace_bytes(count, num_latents);
  TORCH_CHECK(bytes > 0, "latent_transpose: could not size the radix sort's workspace");
  auto workspace = at::empty({int64_t(bytes)}, ix.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::latent_transpose(ix.data_ptr<int64_t>(), count, num_latents, offsets.data_ptr<int64_t>(),
                                        order.data_ptr<int64_t>(), workspace.data_ptr(), bytes,
                                        c10::cuda::getCurrentCUDAStream()));
  return {offsets, order};
}

std::tuple<at::Tensor, at::Tensor> sparse_transpose_matmul_cuda(const at::Tensor& weights, const at::Tensor& rows,
                                                                const at::Tensor& offsets, const at::Tensor& order) {
  checks::transpose_matmul_args(weights, rows, offsets, order, kCUDA);
  const int64_t N = weights.size(0), k = weights.size(1), d = rows.size(1), M = offsets.size(0) - 1;

  c10::cuda::CUDAGuard guard(weights.device());
  auto out = at::empty({M, d}, rows.options());
  auto colsum = at::empty({M}, rows.options());
  if (k == 0) {  // no entries: every latent's sums are empty
    out.zero_();
    colsum.zero_();
    return {out, colsum};
  }
  // weights, order: O(N * k); offsets: O(M); rows: read through its row stride.
  const auto w = weights.contiguous(), X = unit_column_stride(rows), off = offsets.contiguous(),
             ord = order.contiguous();
  // Partial sums of hot latents (split across blocks, then added in a fixed order).
  const int64_t scratch_floats = cuda::sparse_transpose_matmul_scratch(N, k, d);
  auto scratch = at::empty({std::max<int64_t>(scratch_floats, 1)}, weights.options().dtype(at::kFloat));
  dispatch_dtype(weights.scalar_type(), "weights", [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::sparse_transpose_matmul<T>(
        ptr<T>(w), ptr<T>(X), activation_row_stride(X), N, k, d, off.data_ptr<int64_t>(), ord.data_ptr<int64_t>(), M,
        ptr<T>(out), ptr<T>(colsum), scratch.data_ptr<float>(), scratch_floats, c10::cuda::getCurrentCUDAStream()));
  });
  return {out, colsum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tilted_group_stats_cuda(const at::Tensor& losses, double t,
                                                                       const std::optional<at::Tensor>& groups,
                                                                       int64_t num_groups) {
  check_cuda(losses, "losses");
  checks::dim(losses, 1, "losses", "[N]");
  const int64_t n = losses.size(0);
  TORCH_CHECK_VALUE(n > 0, "losses must not be empty");
  TORCH_CHECK_VALUE(num_groups >= 1, "num_groups must be >= 1, got ", num_groups);
  TORCH_CHECK(num_groups <= cuda::kMaxGrid, "num_groups must be < 2^31 on the cuda backend, got ", num_groups);
  at::Tensor g;
  if (groups) {
    checks::dim(*groups, 1, "groups", "[N]");
    checks::same_size(groups->size(0), n, "groups must have one id per loss");
    checks::int64_indices(*groups, losses, "groups", "losses");
    g = groups->contiguous();
  } else {
    TORCH_CHECK_VALUE(num_groups == 1, "num_groups must be 1 without groups, got ", num_groups);
  }
  dispatch_dtype(losses.scalar_type(), "losses", [](auto) {});

  c10::cuda::CUDAGuard guard(losses.device());
  const auto opts = losses.options().dtype(at::kDouble);
  auto anchor = at::empty({num_groups}, opts), log_mean = at::empty({num_groups}, opts);
  auto count = at::empty({num_groups}, opts.dtype(at::kLong));
  const size_t bytes = cuda::tilted_group_stats_workspace_bytes(n, num_groups);
  auto workspace = at::empty({int64_t(bytes)}, losses.options().dtype(at::kByte));
  const auto l = losses.contiguous();
  dispatch_dtype(losses.scalar_type(), "losses", [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::tilted_group_stats<T>(ptr<T>(l), n, t, g.defined() ? g.data_ptr<int64_t>() : nullptr,
                                               num_groups, anchor.data_ptr<double>(), log_mean.data_ptr<double>(),
                                               count.data_ptr<int64_t>(), workspace.data_ptr(), bytes,
                                               c10::cuda::getCurrentCUDAStream()));
  });
  return {anchor, log_mean, count};
}

at::Tensor row_sq_error_cuda(const at::Tensor& x_hat, const at::Tensor& x) {
  checks::row_error_args(x_hat, x, kCUDA);
  dispatch_dtype(x_hat.scalar_type(), "x_hat", [](auto) {});

  c10::cuda::CUDAGuard guard(x_hat.device());
  auto out = at::empty({x_hat.size(0)}, x_hat.options().dtype(at::kFloat));
  const auto a = x_hat.contiguous(), b = x.contiguous();
  dispatch_dtype(x_hat.scalar_type(), "x_hat", [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::row_sq_error<T>(ptr<T>(a), ptr<T>(b), a.size(0), a.size(1), out.data_ptr<float>(),
                                         c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

at::Tensor sparse_decode_sq_error_cuda(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                                       const std::optional<at::Tensor>& b_dec, const at::Tensor& x) {
  checks::decode_args(values, indices, W_dec, b_dec, kCUDA);
  checks::decode_target(x, values, W_dec);
  const int64_t N = values.size(0), k = values.size(1), d = W_dec.size(1), M = W_dec.size(0);
  dispatch_dtype(values.scalar_type(), "values", [](auto) {});
  // The declared layout limit (a transposed W_dec is declined); a row-strided one is still
  // copied below: tilted_loss.cu's decode reads dense rows.
  weight_row_stride(W_dec, "W_dec");

  c10::cuda::CUDAGuard guard(values.device());
  auto out = at::empty({N}, values.options().dtype(at::kFloat));
  const auto v = values.contiguous(), ix = indices.contiguous(), W = W_dec.contiguous(), xc = x.contiguous();
  const auto b = b_dec ? b_dec->contiguous() : at::Tensor();
  dispatch_dtype(values.scalar_type(), "values", [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::sparse_decode_sq_error<T>(ptr<T>(v), ix.data_ptr<int64_t>(), ptr<T>(W),
                                                   b.defined() ? ptr<T>(b) : nullptr, ptr<T>(xc), N, k, d, M,
                                                   out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_residual_cuda(const at::Tensor& values, const at::Tensor& indices,
                                                               const at::Tensor& W_dec,
                                                               const std::optional<at::Tensor>& b_dec,
                                                               const at::Tensor& x, const at::Tensor& scale) {
  checks::decode_args(values, indices, W_dec, b_dec, kCUDA);
  checks::decode_target(x, values, W_dec);
  checks::row_scale(scale, values, at::kFloat);
  const int64_t N = values.size(0), k = values.size(1), d = W_dec.size(1), M = W_dec.size(0);
  dispatch_dtype(values.scalar_type(), "values", [](auto) {});
  weight_row_stride(W_dec, "W_dec");  // as in sparse_decode_sq_error_cuda

  c10::cuda::CUDAGuard guard(values.device());
  auto residual = at::empty({N, d}, values.options());
  // float32 dots: the grad_values output itself for float32 values, else rounded once at the end
  auto dots = at::empty({N, k}, values.options().dtype(at::kFloat));
  const auto v = values.contiguous(), ix = indices.contiguous(), W = W_dec.contiguous(), xc = x.contiguous();
  const auto sc = scale.contiguous();
  const auto b = b_dec ? b_dec->contiguous() : at::Tensor();
  dispatch_dtype(values.scalar_type(), "values", [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::sparse_decode_residual<T>(ptr<T>(v), ix.data_ptr<int64_t>(), ptr<T>(W),
                                                   b.defined() ? ptr<T>(b) : nullptr, ptr<T>(xc), sc.data_ptr<float>(),
                                                   N, k, d, M, ptr<T>(residual), dots.data_ptr<float>(),
                                                   c10::cuda::getCurrentCUDAStream()));
  });
  return {residual, values.scalar_type() == at::kFloat ? dots : dots.to(values.scalar_type())};
}

// ---- project_subspace ----------------------------------------------------------------------------

namespace {

void check_project_args(const at::Tensor& G, const at::Tensor& U) {
  checks::project_args(G, U, kCUDA);
  dispatch_dtype(G.scalar_type(), "G", [](auto) {});
}

void run_project(const at::Tensor& G, const at::Tensor& U, bool complement, const at::Tensor& out) {
  const int64_t d = G.size(0), n = G.size(1), r = U.size(1);
  if (n == 0) return;
  c10::cuda::CUDAGuard guard(G.device());
  const auto Uc = U.contiguous();  // the basis [d, r], r <= d: O(d * r), not a weight matrix
  auto scratch = at::empty({cuda::project_subspace_scratch(r, n)}, G.options().dtype(at::kFloat));
  dispatch_dtype(G.scalar_type(), "G", [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::project_subspace<T>(ptr<T>(G), checks::row_stride(G), ptr<T>(Uc), d, r, n, complement,
                                             ptr<T>(out), checks::row_stride(out), scratch.data_ptr<float>(),
                                             c10::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace

at::Tensor project_subspace_cuda(const at::Tensor& G, const at::Tensor& U, bool complement) {
  check_project_args(G, U);
  return checks::project_out_of_place(G, U, complement, run_project);
}

void project_subspace__cuda(const at::Tensor& G, const at::Tensor& U, bool complement) {
  check_project_args(G, U);
  checks::project_in_place(G, U, complement, run_project);
}

// ---- sparse_adam_ --------------------------------------------------------------------------------

void sparse_adam__cuda(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                       const at::Tensor& rows, const std::optional<at::Tensor>& grad, const at::Tensor& catchup,
                       double lr, double beta1, double beta2, double eps, int64_t step, int64_t seed) {
  checks::adam_args(param, exp_avg, exp_avg_sq, rows, grad, catchup, lr, beta1, beta2, eps, step, kCUDA);
  TORCH_CHECK_TYPE(param.scalar_type() == at::kFloat, "param must be float32 on the cuda backend, got ",
                   param.scalar_type(), " (float64 runs on the cpu and reference backends)");
  // rows are neither range- nor duplicate-checked here (a sync per call, as for every index on this
  // backend): the kernel skips a row out of range, and SSAE_CHECK_INDICES=1 has the router check both.
  if (rows.numel() == 0 || param.size(1) == 0) return;
  c10::cuda::CUDAGuard guard(param.device());
  const auto ix = rows.contiguous(), c = catchup.contiguous();  // O(R)
  const auto g = grad ? unit_column_stride(*grad) : at::Tensor();  // only read: any row stride
  checks::with_rows_strided({param, exp_avg, exp_avg_sq}, [&](const std::vector<at::Tensor>& t) {
    const auto run = [&](auto state_tag) {
      using S = decltype(state_tag);
      C10_CUDA_CHECK(cuda::sparse_adam<S>(
          {ptr<float>(t[0]), checks::row_stride(t[0]), ptr<S>(t[1]), checks::row_stride(t[1]), ptr<S>(t[2]),
           checks::row_stride(t[2]), ix.data_ptr<int64_t>(), ix.numel(), param.size(0),
           g.defined() ? ptr<float>(g) : nullptr, g.defined() ? activation_row_stride(g) : 0, ptr<float>(c),
           param.size(1), lr, beta1, beta2, eps, step, seed},
          c10::cuda::getCurrentCUDAStream()));
    };
    if (exp_avg.scalar_type() == at::kBFloat16) run(uint16_t{});
    else run(float{});
  });
}

}  // namespace ssae
