// ATen entry points of the CUDA backend (built when SSAE_WITH_CUDA is defined,
// see setup.py). Same signatures and checks as cpu_ops.h; each validates its
// arguments with TORCH_CHECK (naming the argument) and launches the torch-free
// kernels of csrc/kernels/cuda on the current stream. float32, bfloat16 and
// float16 (float64 is served by the reference backend).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace ssae {

std::tuple<at::Tensor, at::Tensor> topk_encode_cuda(const at::Tensor& x, const at::Tensor& W_enc,
                                                    const std::optional<at::Tensor>& b_enc, int64_t k,
                                                    const std::optional<at::Tensor>& b_dec);
std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_encode_cuda(const at::Tensor& x, const at::Tensor& W_enc,
                                                                     const std::optional<at::Tensor>& b_enc,
                                                                     const at::Tensor& threshold, int64_t max_k,
                                                                     const std::optional<at::Tensor>& b_dec);
at::Tensor sparse_decode_cuda(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                              const std::optional<at::Tensor>& b_dec);
at::Tensor sampled_dot_cuda(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& W);
std::tuple<at::Tensor, at::Tensor> latent_transpose_cuda(const at::Tensor& indices, int64_t num_latents);
std::tuple<at::Tensor, at::Tensor> sparse_transpose_matmul_cuda(const at::Tensor& weights, const at::Tensor& rows,
                                                                const at::Tensor& offsets, const at::Tensor& order);
// TERM primitives (see cpu_ops.h): float64 group stats, float32 per-row squared errors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tilted_group_stats_cuda(const at::Tensor& losses, double t,
                                                                       const std::optional<at::Tensor>& groups,
                                                                       int64_t num_groups);
at::Tensor row_sq_error_cuda(const at::Tensor& x_hat, const at::Tensor& x);
at::Tensor sparse_decode_sq_error_cuda(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                                       const std::optional<at::Tensor>& b_dec, const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor> sparse_decode_residual_cuda(const at::Tensor& values, const at::Tensor& indices,
                                                               const at::Tensor& W_dec,
                                                               const std::optional<at::Tensor>& b_dec,
                                                               const at::Tensor& x, const at::Tensor& scale);

// U (U^T G) or G - U (U^T G); the second form writes the result into G.
at::Tensor project_subspace_cuda(const at::Tensor& G, const at::Tensor& U, bool complement);
void project_subspace__cuda(const at::Tensor& G, const at::Tensor& U, bool complement);

// Adam on param[rows] in place after each row's catch-up (ssae_kernels/ops/sparse_adam.py); float32 only.
void sparse_adam__cuda(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                       const at::Tensor& rows, const std::optional<at::Tensor>& grad, const at::Tensor& catchup,
                       double lr, double beta1, double beta2, double eps, int64_t step, int64_t seed);

}  // namespace ssae
