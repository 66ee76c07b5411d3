// Argument checks and layout helpers shared by the ATen bindings of every backend
// (cpu_ops.cpp, cuda_ops.cu). A binding names its device; the op's leading tensor
// must be on it and every other tensor on the same device. Messages name the
// argument and say what was expected, in the words of the op modules' Python
// checks (ssae_kernels/ops), so every backend reports bad input alike: ValueError
// (TORCH_CHECK_VALUE) for values and shapes, TypeError for dtypes. Backend-specific
// limits (index ranges, latent counts, dtypes) stay in the bindings.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <utility>
#include <vector>
#include <optional>

namespace ssae::checks {

inline void on_device(const at::Tensor& t, c10::DeviceType type, const char* arg) {
  TORCH_CHECK_VALUE(t.device().type() == type, arg, " must be a ", c10::DeviceTypeName(type), " tensor, got device ",
              t.device());
}

inline void same_device(const at::Tensor& t, const at::Tensor& ref, const char* arg, const char* ref_arg) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), arg, " is on ", t.device(), " but ", ref_arg, " is on ", ref.device());
}

inline void dim(const at::Tensor& t, int64_t d, const char* arg, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == d, arg, " must be ", d, "-D ", shape, ", got shape ", t.sizes());
}

// The leading tensor's dtype, before the others are compared with it.
inline void floating(const at::Tensor& t, const char* arg) {
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf, arg,
                   " must be float32, float64, bfloat16 or float16, got ", d);
}

// A size that must equal another, as the Python checks say it: "<what>: expected E, got A".
inline void same_size(int64_t actual, int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(actual == expected, what, ": expected ", expected, ", got ", actual);
}

inline void same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* arg, const char* ref_arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), arg, " has dtype ", t.scalar_type(), " but ", ref_arg,
                   " has dtype ", ref.scalar_type());
}

inline void int64_indices(const at::Tensor& indices, const at::Tensor& ref, const char* arg, const char* ref_arg) {
  same_device(indices, ref, arg, ref_arg);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, arg, " must be int64, got ", indices.scalar_type());
}

// b_dec: optional [d] of ref's dtype and device.
inline void optional_bias(const std::optional<at::Tensor>& b, int64_t d, const at::Tensor& ref, const char* ref_arg,
                          const char* d_what) {
  if (!b) return;
  same_device(*b, ref, "b_dec", ref_arg);
  dim(*b, 1, "b_dec", "[d]");
  same_size(b->size(0), d, d_what);
  same_dtype(*b, ref, "b_dec", ref_arg);
}

// topk_encode(x [N, d], W_enc [M, d], b_enc [M]?, k, b_dec [d]?)
inline void encode_args(const at::Tensor& x, const at::Tensor& W_enc, const std::optional<at::Tensor>& b_enc,
                        int64_t k, const std::optional<at::Tensor>& b_dec, c10::DeviceType type,
                        const char* k_name = "k") {
  on_device(x, type, "x");
  same_device(W_enc, x, "W_enc", "x");
  dim(x, 2, "x", "[N, d]");
  dim(W_enc, 2, "W_enc", "[M, d]");
  floating(x, "x");
  const int64_t N = x.size(0), d = x.size(1), M = W_enc.size(0);
  TORCH_CHECK_VALUE(N > 0, "x must have at least one row, got shape ", x.sizes());
  same_size(W_enc.size(1), d, "W_enc.shape[1] must equal x.shape[1] (d)");
  TORCH_CHECK_VALUE(k >= 1 && k <= M, k_name, " must be in [1, M] with M = W_enc.shape[0] = ", M, ", got ", k);
  same_dtype(W_enc, x, "W_enc", "x");
  if (b_enc) {
    same_device(*b_enc, x, "b_enc", "x");
    dim(*b_enc, 1, "b_enc", "[M]");
    same_size(b_enc->size(0), M, "b_enc.shape[0] must equal W_enc.shape[0] (M)");
    same_dtype(*b_enc, x, "b_enc", "x");
  }
  optional_bias(b_dec, d, x, "x", "b_dec.shape[0] must equal x.shape[1] (d)");
}

// threshold_encode's threshold: a 0-d or [M] tensor of x's dtype and device
// (finiteness is the kernel's to check: it reads the values).
inline void threshold_arg(const at::Tensor& threshold, const at::Tensor& x, int64_t M) {
  same_device(threshold, x, "threshold", "x");
  TORCH_CHECK_VALUE(threshold.dim() == 0 || (threshold.dim() == 1 && threshold.size(0) == M),
                    "threshold must be a scalar (0-d) or of shape [M] with M = W_enc.shape[0] = ", M, ", got shape ",
                    threshold.sizes());
  same_dtype(threshold, x, "threshold", "x");
}

// sparse_decode(values [N, k], indices [N, k] int64, W_dec [M, d], b_dec [d]?); index
// ranges are the binding's to check (or not: see cuda_ops.cu).
inline void decode_args(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                        const std::optional<at::Tensor>& b_dec, c10::DeviceType type) {
  on_device(values, type, "values");
  same_device(W_dec, values, "W_dec", "values");
  dim(values, 2, "values", "[N, k]");
  dim(indices, 2, "indices", "[N, k]");
  dim(W_dec, 2, "W_dec", "[M, d]");
  floating(values, "values");
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes(), "indices must have the shape of values: expected ",
                    values.sizes(), ", got ", indices.sizes());
  TORCH_CHECK_VALUE(values.size(0) >= 1, "values must have at least one row, got shape ", values.sizes());
  same_dtype(W_dec, values, "W_dec", "values");
  int64_indices(indices, values, "indices", "values");
  optional_bias(b_dec, W_dec.size(1), values, "values", "b_dec.shape[0] must equal W_dec.shape[1] (d)");
}

// The target x [N, d] of the fused decode losses, beside decode_args.
inline void decode_target(const at::Tensor& x, const at::Tensor& values, const at::Tensor& W_dec) {
  same_device(x, values, "x", "values");
  dim(x, 2, "x", "[N, d]");
  const int64_t N = values.size(0), d = W_dec.size(1);
  TORCH_CHECK_VALUE(x.size(0) == N && x.size(1) == d, "x must be [N, d]: expected [", N, ", ", d, "], got ",
                    x.sizes());
  same_dtype(x, values, "x", "values");
}

// The per-row scale [N] of sparse_decode_residual, in the accumulation dtype acc.
inline void row_scale(const at::Tensor& scale, const at::Tensor& values, at::ScalarType acc) {
  same_device(scale, values, "scale", "values");
  dim(scale, 1, "scale", "[N]");
  same_size(scale.size(0), values.size(0), "scale must have one entry per row of values");
  TORCH_CHECK_TYPE(scale.scalar_type() == acc, "scale must be torch.", acc == at::kDouble ? "float64" : "float32",
                   " (the accumulation dtype of values ", values.scalar_type(), "), got ", scale.scalar_type());
}

// sampled_dot(grad [N, d], indices [N, k] int64, W [M, d]); index ranges as in decode_args.
inline void sampled_dot_args(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& W,
                             c10::DeviceType type) {
  on_device(grad, type, "grad");
  same_device(W, grad, "W", "grad");
  dim(grad, 2, "grad", "[N, d]");
  dim(indices, 2, "indices", "[N, k]");
  dim(W, 2, "W", "[M, d]");
  floating(grad, "grad");
  same_size(indices.size(0), grad.size(0), "indices.shape[0] (rows) must equal grad.shape[0]");
  same_size(W.size(1), grad.size(1), "W.shape[1] (d) must equal grad.shape[1]");
  same_dtype(W, grad, "W", "grad");
  int64_indices(indices, grad, "indices", "grad");
}

// sparse_transpose_matmul(weights [N, k], rows [N, d], offsets [M + 1], order [N * k]),
// offsets and order from latent_transpose; their contents are the binding's to check.
inline void transpose_matmul_args(const at::Tensor& weights, const at::Tensor& rows, const at::Tensor& offsets,
                                  const at::Tensor& order, c10::DeviceType type) {
  on_device(weights, type, "weights");
  same_device(rows, weights, "rows", "weights");
  same_device(offsets, weights, "offsets", "weights");
  same_device(order, weights, "order", "weights");
  dim(weights, 2, "weights", "[N, k]");
  dim(rows, 2, "rows", "[N, d]");
  dim(offsets, 1, "offsets", "[M + 1]");
  dim(order, 1, "order", "[N * k]");
  floating(weights, "weights");
  same_dtype(rows, weights, "rows", "weights");
  const int64_t N = weights.size(0), k = weights.size(1);
  same_size(rows.size(0), N, "rows.shape[0] (N) must equal weights.shape[0]");
  same_size(order.size(0), N * k, "order must have N * k elements");
  TORCH_CHECK_VALUE(offsets.size(0) >= 2, "offsets must have M + 1 >= 2 elements, got ", offsets.size(0));
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong && order.scalar_type() == at::kLong,
                   "offsets and order must be int64 (from latent_transpose)");
}

// row_sq_error(x_hat [N, d], x [N, d])
inline void row_error_args(const at::Tensor& x_hat, const at::Tensor& x, c10::DeviceType type) {
  on_device(x_hat, type, "x_hat");
  same_device(x, x_hat, "x", "x_hat");
  dim(x_hat, 2, "x_hat", "[N, d]");
  floating(x_hat, "x_hat");
  TORCH_CHECK_VALUE(x.sizes() == x_hat.sizes(), "x must have the shape of x_hat: expected ", x_hat.sizes(), ", got ",
                    x.sizes());
  same_dtype(x, x_hat, "x", "x_hat");
}

// project_subspace(G [d, n], U [d, r]) with 1 <= r <= d
inline void project_args(const at::Tensor& G, const at::Tensor& U, c10::DeviceType type) {
  on_device(G, type, "G");
  same_device(U, G, "U", "G");
  dim(G, 2, "G", "[d, n]");
  dim(U, 2, "U", "[d, r]");
  floating(G, "G");
  same_dtype(U, G, "U", "G");
  same_size(G.size(0), U.size(0), "G.shape[0] must equal U.shape[0] (d)");
  TORCH_CHECK_VALUE(U.size(1) >= 1, "U must have at least one column, got shape ", U.sizes());
  TORCH_CHECK_VALUE(U.size(1) <= U.size(0), "U [d, r] must have r <= d (orthonormal columns), got shape ", U.sizes());
}

// Whether a kernel can read (or write) the 2-D t as it is: unit column stride, rows
// apart (strides of size-1 dimensions do not matter); and its row stride then.
inline bool rows_strided(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) >= std::max<int64_t>(t.size(1), 1));
}

inline int64_t row_stride(const at::Tensor& t) {
  return t.size(0) <= 1 ? std::max<int64_t>(t.size(1), 1) : t.stride(0);
}

// project_subspace and project_subspace_ around a backend's run(G, U, complement, out),
// which needs rows_strided G and out.
template <typename Run>
at::Tensor project_out_of_place(const at::Tensor& G, const at::Tensor& U, bool complement, Run&& run) {
  auto out = at::empty(G.sizes(), G.options());
  run(rows_strided(G) ? G : G.contiguous(), U, complement, out);
  return out;
}

template <typename Run>
void project_in_place(const at::Tensor& G, const at::Tensor& U, bool complement, Run&& run) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(G) != at::MemOverlap::Yes,
              "G has overlapping elements (an expanded view); project_subspace_ cannot write it");
  if (rows_strided(G)) {
    run(G, U, complement, G);
  } else {  // e.g. a transposed view: compute densely, then copy back through G's strides
    const auto dense = G.contiguous();
    run(dense, U, complement, dense);
    G.copy_(dense);
  }
}

// sparse_adam_(param, exp_avg, exp_avg_sq [M, d], rows [R] int64, grad [R, d]?, catchup [R, 4], ...)
inline void adam_args(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& rows, const std::optional<at::Tensor>& grad, const at::Tensor& catchup,
                      double lr, double beta1, double beta2, double eps, int64_t step, c10::DeviceType type) {
  on_device(param, type, "param");
  dim(param, 2, "param", "[M, d]");
  TORCH_CHECK_TYPE(param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble,
                   "param must be float32 or float64, got ", param.scalar_type());
  // the moments: param's dtype, or bfloat16 beside a float32 param (both the same)
  same_dtype(exp_avg_sq, exp_avg, "exp_avg_sq", "exp_avg");
  TORCH_CHECK_TYPE(exp_avg.scalar_type() == param.scalar_type() ||
                   (exp_avg.scalar_type() == at::kBFloat16 && param.scalar_type() == at::kFloat),
                   "exp_avg and exp_avg_sq must have param's dtype (or bfloat16 with a float32 param), got ",
                   exp_avg.scalar_type(), " with param ", param.scalar_type());
  for (const auto& [t, name] : {std::pair{&exp_avg, "exp_avg"}, std::pair{&exp_avg_sq, "exp_avg_sq"}}) {
    same_device(*t, param, name, "param");
    dim(*t, 2, name, "[M, d]");
    TORCH_CHECK_VALUE(t->sizes() == param.sizes(), name, " must have the shape of param: expected ", param.sizes(),
                      ", got ", t->sizes());
  }
  dim(rows, 1, "rows", "[R]");
  int64_indices(rows, param, "rows", "param");
  const int64_t R = rows.size(0), d = param.size(1);
  if (grad) {
    same_device(*grad, param, "grad", "param");
    dim(*grad, 2, "grad", "[R, d]");
    same_dtype(*grad, param, "grad", "param");
    TORCH_CHECK_VALUE(grad->size(0) == R && grad->size(1) == d, "grad must be [R, d] (R = rows.shape[0], d = "
                      "param.shape[1]): expected [", R, ", ", d, "], got ", grad->sizes());
  }
  same_device(catchup, param, "catchup", "param");
  dim(catchup, 2, "catchup", "[R, 4]");
  same_dtype(catchup, param, "catchup", "param");
  TORCH_CHECK_VALUE(catchup.size(0) == R && catchup.size(1) == 4, "catchup must be [R, 4] (drift, decay1, decay2, "
                    "eps_skip): expected [", R, ", 4], got ", catchup.sizes());
  TORCH_CHECK_VALUE(lr >= 0 && std::isfinite(lr), "lr must be finite and >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0 && beta2 < 1, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_VALUE(step >= 1, "step must be >= 1, got ", step);
  for (const auto& [t, name] : {std::pair{&param, "param"}, std::pair{&exp_avg, "exp_avg"},
                                std::pair{&exp_avg_sq, "exp_avg_sq"}})
    TORCH_CHECK_VALUE(at::has_internal_overlap(*t) != at::MemOverlap::Yes, name,
                      " has overlapping elements (an expanded view); sparse_adam_ cannot write it");
}

// Runs run(tensors) on rows_strided versions of the tensors it writes: each one that is not
// (e.g. a transposed view) is computed in a contiguous copy that is copied back after.
template <typename Run>
void with_rows_strided(std::initializer_list<at::Tensor> written, Run&& run) {
  std::vector<at::Tensor> originals(written), usable;
  for (const auto& t : originals) usable.push_back(rows_strided(t) ? t : t.contiguous());
  run(usable);
  for (size_t i = 0; i < originals.size(); ++i)
    if (!usable[i].is_same(originals[i])) originals[i].copy_(usable[i]);
}

}  // namespace ssae::checks
