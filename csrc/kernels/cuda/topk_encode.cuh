// Fused TopK encode, CUDA: the selection half.
//
// The encode walks encode_schedule() (launch.h): for each block of rows, the
// caller computes float32 pre-activation scores for one chunk of latents
// (a tensor-core GEMM; the ATen binding uses cuBLAS through at::mm_out) and
// topk_select_chunk() merges them into each row's running top-k; after the
// last chunk topk_finish() sorts and writes values and indices. Memory is
// bounded by the plan (plan_topk_encode): one chunk of scores, never N x M.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"
#include "topk_select.h"

namespace ssae::cuda {

// scores [rows, ld] (plus scores_lo at the same layout, or null): GEMM output
// of latents [col0, col0 + cols) before b_enc; bias: float32 b_enc + col0.
// state_in / state_out / row_min / cand: rows of stride state_stride,
// state_stride, 1 and cand_stride (>= cols).
cudaError_t topk_select_chunk(const float* scores, const float* scores_lo, int64_t ld, const float* bias,
                              int64_t rows, int64_t cols, int64_t col0, int64_t k, int64_t state_stride,
                              const topk_key* state_in, topk_key* state_out, topk_key* row_min, uint32_t* cand,
                              int64_t cand_stride, cudaStream_t stream);

// values [rows, k] = ReLU(score) as T, indices [rows, k] int64, descending.
// state is overwritten (it is the sort buffer when k > kSortSharedKeys).
template <typename T>
cudaError_t topk_finish(topk_key* state, int64_t rows, int64_t k, int64_t state_stride, T* values, int64_t* indices,
                        cudaStream_t stream);

}  // namespace ssae::cuda
