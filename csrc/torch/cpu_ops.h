// ATen entry points of the CPU backend, registered under the CPU dispatch key
// (bindings.cpp). Each validates its arguments with TORCH_CHECK (naming the
// argument), takes any strides (index and group tensors are made contiguous
// before they are read or range-checked) and hands raw pointers to the
// torch-free kernels in csrc/kernels/cpu.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace ssae {

std::tuple<at::Tensor, at::Tensor> topk_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                   const std::optional<at::Tensor>& b_enc, int64_t k,
                                                   const std::optional<at::Tensor>& b_dec);
// Every latent whose pre-activation exceeds threshold (0-d or [M]), at most max_k per row, largest first;
// (values [N, max_k] raw pre-activations, indices [N, max_k], counts [N] before the cap).
std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                                    const std::optional<at::Tensor>& b_enc,
                                                                    const at::Tensor& threshold, int64_t max_k,
                                                                    const std::optional<at::Tensor>& b_dec);
at::Tensor sparse_decode_cpu(const at::Tensor& values, const at::Tensor& indices,
                             const at::Tensor& W_dec, const std::optional<at::Tensor>& b_dec);
at::Tensor sampled_dot_cpu(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& W);
std::tuple<at::Tensor, at::Tensor> latent_transpose_cpu(const at::Tensor& indices, int64_t num_latents);
std::tuple<at::Tensor, at::Tensor> sparse_transpose_matmul_cpu(const at::Tensor& weights,
                                                               const at::Tensor& rows,
                                                               const at::Tensor& offsets,
                                                               const at::Tensor& order);

std::tuple<at::Tensor, at::Tensor, at::Tensor> tilted_group_stats_cpu(const at::Tensor& losses, double t,
                                                                      const std::optional<at::Tensor>& groups,
                                                                      int64_t num_groups);
at::Tensor row_sq_error_cpu(const at::Tensor& x_hat, const at::Tensor& x);
at::Tensor sparse_decode_sq_error_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                                      const std::optional<at::Tensor>& b_dec, const at::Tensor& x);

// (residual, grad_values): the backward of sparse_decode_sq_error in one pass (see kernels/cpu/sparse_decode.h).
std::tuple<at::Tensor, at::Tensor> sparse_decode_residual_cpu(const at::Tensor& values, const at::Tensor& indices,
                                                              const at::Tensor& W_dec,
                                                              const std::optional<at::Tensor>& b_dec,
                                                              const at::Tensor& x, const at::Tensor& scale);

// Work split of the fused encode for a problem at the current thread count, exposed
// for tests and tuning: (rows per block, latents per tile, latent ranges).
std::tuple<int64_t, int64_t, int64_t> topk_encode_plan_cpu(int64_t rows, int64_t latents, int64_t d,
                                                           bool exact_dtype);

// Where the CPU has AVX512_BF16, the encode uses vdpbf16ps: float32 encodes
// screen in bfloat16 (their results stay exactly those of the float32 encode),
// bfloat16 encodes multiply their stored values directly. Whether a float32
// call of this shape screens, and a switch for tests and benchmarks (on by
// default; off, both run their float32 GEMMs).
bool topk_encode_screens_cpu(int64_t rows, int64_t latents, int64_t d, int64_t k);
void set_bf16_dot(bool enabled);

// U (U^T G) or G - U (U^T G); the second form writes the result into G.
at::Tensor project_subspace_cpu(const at::Tensor& G, const at::Tensor& U, bool complement);
void project_subspace__cpu(const at::Tensor& G, const at::Tensor& U, bool complement);

// Adam on param[rows] in place after each row's catch-up (ssae_kernels/ops/sparse_adam.py).
void sparse_adam__cpu(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& rows, const std::optional<at::Tensor>& grad, const at::Tensor& catchup,
                      double lr, double beta1, double beta2, double eps, int64_t step, int64_t seed);

}  // namespace ssae
