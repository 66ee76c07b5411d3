#include "cuda_ops.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cstdint>

#include "../kernels/cuda/launch.h"
#include "../kernels/cuda/project_subspace.cuh"
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

void check_cuda(const at::Tensor& t, const char* arg) {
  TORCH_CHECK(t.is_cuda(), arg, " must be a CUDA tensor, got device ", t.device());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* arg, const char* ref_arg) {
  TORCH_CHECK(t.device() == ref.device(), arg, " is on ", t.device(), " but ", ref_arg, " is on ", ref.device());
}

void check_dim(const at::Tensor& t, int64_t dim, const char* arg, const char* shape) {
  TORCH_CHECK(t.dim() == dim, arg, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* arg, const char* ref_arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), arg, " has dtype ", t.scalar_type(), " but ", ref_arg,
                   " has dtype ", ref.scalar_type());
}

// Index ranges are not checked here: that needs a device-to-host copy (a sync)
// per call. The kernels never dereference an out-of-range index; they make the
// affected outputs NaN instead (see sparse_decode.cuh, sparse_backward.cuh).
void check_indices(const at::Tensor& indices, const at::Tensor& ref, const char* arg, const char* ref_arg) {
  check_same_device(indices, ref, arg, ref_arg);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, arg, " must be int64, got ", indices.scalar_type());
}

void check_optional_bias(const std::optional<at::Tensor>& b, int64_t d, const at::Tensor& ref, const char* ref_arg) {
  if (!b) return;
  check_same_device(*b, ref, "b_dec", ref_arg);
  check_dim(*b, 1, "b_dec", "[d]");
  TORCH_CHECK(b->size(0) == d, "b_dec must be [d] with d = ", d, ", got shape ", b->sizes());
  check_same_dtype(*b, ref, "b_dec", ref_arg);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_encode_cuda(const at::Tensor& x, const at::Tensor& W_enc,
                                                    const at::Tensor& b_enc, int64_t k,
                                                    const std::optional<at::Tensor>& b_dec) {
  check_cuda(x, "x");
  check_same_device(W_enc, x, "W_enc", "x");
  check_same_device(b_enc, x, "b_enc", "x");
  check_dim(x, 2, "x", "[N, d]");
  check_dim(W_enc, 2, "W_enc", "[M, d]");
  check_dim(b_enc, 1, "b_enc", "[M]");
  const int64_t N = x.size(0), d = x.size(1), M = W_enc.size(0);
  TORCH_CHECK(N > 0, "x must have at least one row, got shape ", x.sizes());
  TORCH_CHECK(W_enc.size(1) == d, "W_enc must be [M, d] with d = x.size(1) = ", d, ", got shape ", W_enc.sizes());
  TORCH_CHECK(b_enc.size(0) == M, "b_enc must be [M] with M = W_enc.size(0) = ", M, ", got shape ", b_enc.sizes());
  // Latents are packed into 32 bits of the selection keys.
  TORCH_CHECK(M < (int64_t(1) << 32), "W_enc has ", M, " latents; the cuda backend supports at most 2^32 - 1");
  TORCH_CHECK(k >= 1 && k <= M, "k must be in [1, M = ", M, "], got ", k);
  check_same_dtype(W_enc, x, "W_enc", "x");
  check_same_dtype(b_enc, x, "b_enc", "x");
  check_optional_bias(b_dec, d, x, "x");
  const auto dtype = x.scalar_type();
  dispatch_dtype(dtype, "x", [](auto) {});

  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // bfloat16/float16 with b_dec: x - b_dec is exact in float32 but not in the
  // input type, and a float32 GEMM would forgo tensor cores (A100: 19.5 vs
  // 312 TFLOP/s). It is split into hi = (x - b_dec) rounded and lo = the rest,
  // both in the input type, and one GEMM over the stacked [hi; lo] rows gives
  // both halves; the selection adds them (error ~2^-16 relative, not 2^-8).
  const bool split = b_dec.has_value() && dtype != at::kFloat;
  const auto plan = cuda::plan_topk_encode(N, M, d, k, split, x.element_size());

  auto values = at::empty({N, k}, x.options());
  auto indices = at::empty({N, k}, x.options().dtype(at::kLong));
  const auto W = W_enc.contiguous();
  const auto bias = b_enc.to(at::kFloat).contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  auto scores = at::empty({plan.score_rows * plan.latent_chunk}, f32);
  auto cand = at::empty({plan.row_block * plan.latent_chunk}, x.options().dtype(at::kInt));
  auto state = at::empty({2, plan.row_block * plan.state_stride}, x.options().dtype(at::kLong));
  auto row_min = at::empty({plan.row_block}, x.options().dtype(at::kLong));
  auto state_ptr = [&](int parity) { return reinterpret_cast<cuda::topk_key*>(state[parity].data_ptr()); };

  at::Tensor lhs;  // the GEMM's left operand for the current row block
  cuda::encode_schedule(
      plan, N, M,
      [&](int64_t n0, int64_t rows, int64_t m0, int64_t cols, int parity) {
        if (m0 == 0) {
          const auto xb = x.narrow(0, n0, rows);
          if (!b_dec) {
            lhs = xb;
          } else if (!split) {
            lhs = xb - *b_dec;
          } else {
            const auto xc = xb.to(at::kFloat) - b_dec->to(at::kFloat);
            const auto hi = xc.to(dtype);
            lhs = at::cat({hi, (xc - hi.to(at::kFloat)).to(dtype)}, 0);
          }
        }
        auto tile = scores.narrow(0, 0, lhs.size(0) * cols).view({lhs.size(0), cols});
        const auto w_chunk = W.narrow(0, m0, cols).t();
        if (dtype == at::kFloat) at::mm_out(tile, lhs, w_chunk);
        else at::mm_out(tile, lhs, w_chunk, at::kFloat);  // float32 output of a bf16/f16 tensor-core GEMM
        const float* s = tile.data_ptr<float>();
        C10_CUDA_CHECK(cuda::topk_select_chunk(s, split ? s + rows * cols : nullptr, cols,
                                               bias.data_ptr<float>() + m0, rows, cols, m0, k, plan.state_stride,
                                               state_ptr(parity), state_ptr(parity ^ 1),
                                               reinterpret_cast<cuda::topk_key*>(row_min.data_ptr()),
                                               reinterpret_cast<uint32_t*>(cand.data_ptr()), plan.latent_chunk,
                                               stream));
      },
      [&](int64_t n0, int64_t rows, int parity) {
        dispatch_dtype(dtype, "x", [&](auto tag) {
          using T = typename decltype(tag)::type;
          C10_CUDA_CHECK(cuda::topk_finish<T>(state_ptr(parity), rows, k, plan.state_stride, ptr<T>(values) + n0 * k,
                                              indices.data_ptr<int64_t>() + n0 * k, stream));
        });
      });
  return {values, indices};
}

at::Tensor sparse_decode_cuda(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                              const std::optional<at::Tensor>& b_dec) {
  check_cuda(values, "values");
  check_same_device(W_dec, values, "W_dec", "values");
  check_dim(values, 2, "values", "[N, k]");
  check_dim(indices, 2, "indices", "[N, k]");
  check_dim(W_dec, 2, "W_dec", "[M, d]");
  TORCH_CHECK(indices.sizes() == values.sizes(), "indices must have the shape of values ", values.sizes(), ", got ",
              indices.sizes());
  check_same_dtype(W_dec, values, "W_dec", "values");
  check_indices(indices, values, "indices", "values");
  const int64_t N = values.size(0), k = values.size(1), d = W_dec.size(1), M = W_dec.size(0);
  check_optional_bias(b_dec, d, values, "values");

  c10::cuda::CUDAGuard guard(values.device());
  auto out = at::empty({N, d}, values.options());
  const auto v = values.contiguous(), ix = indices.contiguous(), W = W_dec.contiguous();
  const auto b = b_dec ? b_dec->contiguous() : at::Tensor();
  dispatch_dtype(values.scalar_type(), "values", [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::sparse_decode<T>(ptr<T>(v), ix.data_ptr<int64_t>(), ptr<T>(W),
                                          b.defined() ? ptr<T>(b) : nullptr, N, k, d, M, ptr<T>(out),
                                          c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

at::Tensor sampled_dot_cuda(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& W) {
  check_cuda(grad, "grad");
  check_same_device(W, grad, "W", "grad");
  check_dim(grad, 2, "grad", "[N, d]");
  check_dim(indices, 2, "indices", "[N, k]");
  check_dim(W, 2, "W", "[M, d]");
  TORCH_CHECK(indices.size(0) == grad.size(0), "indices must have N = grad.size(0) = ", grad.size(0),
              " rows, got shape ", indices.sizes());
  TORCH_CHECK(W.size(1) == grad.size(1), "W must be [M, d] with d = grad.size(1) = ", grad.size(1), ", got shape ",
              W.sizes());
  check_same_dtype(W, grad, "W", "grad");
  check_indices(indices, grad, "indices", "grad");
  const int64_t N = grad.size(0), k = indices.size(1), d = grad.size(1);

  c10::cuda::CUDAGuard guard(grad.device());
  auto out = at::empty({N, k}, grad.options());
  const auto g = grad.contiguous(), ix = indices.contiguous(), Wc = W.contiguous();
  dispatch_dtype(grad.scalar_type(), "grad", [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::sampled_dot<T>(ptr<T>(g), ix.data_ptr<int64_t>(), ptr<T>(Wc), N, k, d, W.size(0),
                                        ptr<T>(out), c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> latent_transpose_cuda(const at::Tensor& indices, int64_t num_latents) {
  check_cuda(indices, "indices");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(num_latents >= 1, "num_latents must be >= 1, got ", num_latents);
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
  check_cuda(weights, "weights");
  check_same_device(rows, weights, "rows", "weights");
  check_same_device(offsets, weights, "offsets", "weights");
  check_same_device(order, weights, "order", "weights");
  check_dim(weights, 2, "weights", "[N, k]");
  check_dim(rows, 2, "rows", "[N, d]");
  check_dim(offsets, 1, "offsets", "[M + 1]");
  check_dim(order, 1, "order", "[N * k]");
  check_same_dtype(rows, weights, "rows", "weights");
  const int64_t N = weights.size(0), k = weights.size(1), d = rows.size(1), M = offsets.size(0) - 1;
  TORCH_CHECK(rows.size(0) == N, "rows must have N = weights.size(0) = ", N, " rows, got shape ", rows.sizes());
  TORCH_CHECK(M >= 1, "offsets must have at least 2 elements, got ", offsets.size(0));
  TORCH_CHECK(order.size(0) == N * k, "order must have N * k = ", N * k, " elements, got ", order.size(0));
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong && order.scalar_type() == at::kLong,
                   "offsets and order must be int64 (from latent_transpose)");

  c10::cuda::CUDAGuard guard(weights.device());
  auto out = at::empty({M, d}, rows.options());
  auto colsum = at::empty({M}, rows.options());
  if (k == 0) {  // no entries: every latent's sums are empty
    out.zero_();
    colsum.zero_();
    return {out, colsum};
  }
  const auto w = weights.contiguous(), X = rows.contiguous(), off = offsets.contiguous(), ord = order.contiguous();
  dispatch_dtype(weights.scalar_type(), "weights", [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::sparse_transpose_matmul<T>(ptr<T>(w), ptr<T>(X), N, k, d, off.data_ptr<int64_t>(),
                                                    ord.data_ptr<int64_t>(), M, ptr<T>(out), ptr<T>(colsum),
                                                    c10::cuda::getCurrentCUDAStream()));
  });
  return {out, colsum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tilted_group_stats_cuda(const at::Tensor& losses, double t,
                                                                       const std::optional<at::Tensor>& groups,
                                                                       int64_t num_groups) {
  check_cuda(losses, "losses");
  check_dim(losses, 1, "losses", "[N]");
  const int64_t n = losses.size(0);
  TORCH_CHECK(n > 0, "losses must not be empty");
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1, got ", num_groups);
  TORCH_CHECK(num_groups <= cuda::kMaxGrid, "num_groups must be < 2^31 on the cuda backend, got ", num_groups);
  at::Tensor g;
  if (groups) {
    check_dim(*groups, 1, "groups", "[N]");
    TORCH_CHECK(groups->size(0) == n, "groups must have N = ", n, " elements, got ", groups->size(0));
    check_indices(*groups, losses, "groups", "losses");
    g = groups->contiguous();
  } else {
    TORCH_CHECK(num_groups == 1, "num_groups must be 1 without groups, got ", num_groups);
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
  check_cuda(x_hat, "x_hat");
  check_same_device(x, x_hat, "x", "x_hat");
  check_dim(x_hat, 2, "x_hat", "[N, d]");
  TORCH_CHECK(x.sizes() == x_hat.sizes(), "x must have the shape of x_hat ", x_hat.sizes(), ", got ", x.sizes());
  check_same_dtype(x, x_hat, "x", "x_hat");
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
  check_cuda(values, "values");
  check_same_device(W_dec, values, "W_dec", "values");
  check_same_device(x, values, "x", "values");
  check_dim(values, 2, "values", "[N, k]");
  check_dim(indices, 2, "indices", "[N, k]");
  check_dim(W_dec, 2, "W_dec", "[M, d]");
  check_dim(x, 2, "x", "[N, d]");
  TORCH_CHECK(indices.sizes() == values.sizes(), "indices must have the shape of values ", values.sizes(), ", got ",
              indices.sizes());
  check_same_dtype(W_dec, values, "W_dec", "values");
  check_same_dtype(x, values, "x", "values");
  check_indices(indices, values, "indices", "values");
  const int64_t N = values.size(0), k = values.size(1), d = W_dec.size(1), M = W_dec.size(0);
  TORCH_CHECK(x.size(0) == N && x.size(1) == d, "x must be [N, d] = [", N, ", ", d, "], got shape ", x.sizes());
  check_optional_bias(b_dec, d, values, "values");
  dispatch_dtype(values.scalar_type(), "values", [](auto) {});

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
  check_cuda(values, "values");
  check_same_device(W_dec, values, "W_dec", "values");
  check_same_device(x, values, "x", "values");
  check_same_device(scale, values, "scale", "values");
  check_dim(values, 2, "values", "[N, k]");
  check_dim(indices, 2, "indices", "[N, k]");
  check_dim(W_dec, 2, "W_dec", "[M, d]");
  check_dim(x, 2, "x", "[N, d]");
  check_dim(scale, 1, "scale", "[N]");
  TORCH_CHECK(indices.sizes() == values.sizes(), "indices must have the shape of values ", values.sizes(), ", got ",
              indices.sizes());
  check_same_dtype(W_dec, values, "W_dec", "values");
  check_same_dtype(x, values, "x", "values");
  check_indices(indices, values, "indices", "values");
  const int64_t N = values.size(0), k = values.size(1), d = W_dec.size(1), M = W_dec.size(0);
  TORCH_CHECK(x.size(0) == N && x.size(1) == d, "x must be [N, d] = [", N, ", ", d, "], got shape ", x.sizes());
  TORCH_CHECK(scale.size(0) == N, "scale must be [N] with N = ", N, ", got shape ", scale.sizes());
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, "scale must be float32, got ", scale.scalar_type());
  check_optional_bias(b_dec, d, values, "values");
  dispatch_dtype(values.scalar_type(), "values", [](auto) {});

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
  check_cuda(G, "G");
  check_same_device(U, G, "U", "G");
  check_dim(G, 2, "G", "[d, n]");
  check_dim(U, 2, "U", "[d, r]");
  check_same_dtype(U, G, "U", "G");
  TORCH_CHECK(U.size(0) == G.size(0), "U must be [d, r] with d = G.size(0) = ", G.size(0), ", got shape ", U.sizes());
  TORCH_CHECK(U.size(1) >= 1 && U.size(1) <= U.size(0), "U [d, r] must have 1 <= r <= d, got shape ", U.sizes());
  dispatch_dtype(G.scalar_type(), "G", [](auto) {});
}

// Whether the kernels can read (or write) t as it is: unit column stride, rows apart
// (strides of size-1 dimensions do not matter).
bool rows_strided(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) >= std::max<int64_t>(t.size(1), 1));
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? std::max<int64_t>(t.size(1), 1) : t.stride(0); }

void run_project(const at::Tensor& G, const at::Tensor& U, bool complement, const at::Tensor& out) {
  const int64_t d = G.size(0), n = G.size(1), r = U.size(1);
  if (n == 0) return;
  c10::cuda::CUDAGuard guard(G.device());
  const auto Uc = U.contiguous();
  auto scratch = at::empty({cuda::project_subspace_scratch(r, n)}, G.options().dtype(at::kFloat));
  dispatch_dtype(G.scalar_type(), "G", [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(cuda::project_subspace<T>(ptr<T>(G), row_stride(G), ptr<T>(Uc), d, r, n, complement, ptr<T>(out),
                                             row_stride(out), scratch.data_ptr<float>(),
                                             c10::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace

at::Tensor project_subspace_cuda(const at::Tensor& G, const at::Tensor& U, bool complement) {
  check_project_args(G, U);
  auto out = at::empty(G.sizes(), G.options());
  run_project(rows_strided(G) ? G : G.contiguous(), U, complement, out);
  return out;
}

void project_subspace__cuda(const at::Tensor& G, const at::Tensor& U, bool complement) {
  check_project_args(G, U);
  TORCH_CHECK(at::has_internal_overlap(G) != at::MemOverlap::Yes,
              "G has overlapping elements (an expanded view); project_subspace_ cannot write it");
  if (rows_strided(G)) {
    run_project(G, U, complement, G);
  } else {  // e.g. a transposed view: compute densely, then copy back through G's strides
    const auto dense = G.contiguous();
    run_project(dense, U, complement, dense);
    G.copy_(dense);
  }
}

}  // namespace ssae
