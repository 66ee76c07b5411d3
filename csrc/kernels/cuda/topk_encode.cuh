// TopK encode, CUDA: the kernels around the GEMM.
//
// The encode walks encode_pipeline() (launch.h): for each block of rows, the
// caller computes float32 pre-activation scores for one chunk of latents
// (a tensor-core GEMM; the ATen binding uses cuBLAS through at::mm_out, on a
// second stream, into one of two score buffers) and topk_select_chunk() merges
// them into the running top-k of each (row, latent split); after the last
// chunk topk_finish() merges each row's splits, sorts, and writes values and
// indices. With a 16-bit x and b_dec, fold_chunk_bias() turns the chunk's extra
// GEMM row (W_chunk @ b_dec) into its bias. Memory is bounded by the plan (plan_topk_encode): two chunks of
// scores, never N x M. See docs/cuda.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"
#include "topk_select.h"

namespace ssae::cuda {

// b_dec folded into the bias (BDec::kFold, launch.h): row[c] holds the GEMM's
// W_chunk @ b_dec (b_dec is the extra last row of the GEMM's left operand);
// it becomes (b_enc ? b_enc[c] : 0) - row[c] = folded_bias(...), in place. Then
// pre = x @ W.T + row equals (x - b_dec) @ W.T + b_enc, with a 16-bit x
// entering the tensor-core GEMM as it is.
cudaError_t fold_chunk_bias(float* row, const float* b_enc, int64_t cols, cudaStream_t stream);

// One chunk: scores [rows, ld], the GEMM output of latents [col0, col0 + cols);
// bias: float32 bias + col0. Block (r, s) of rows x splits takes columns
// [s * seg, s * seg + split_cols(cols, seg, s)) of row r, and the state of
// (r, s): rows r * splits + s of state_in / state_out / row_min (strides
// state_stride, state_stride, 1). seen: latents every split merged before
// (chunk index x seg). cand: row r at r * cand_stride (>= cols).
// threshold_encode: threshold (float32 + col0, null for topk_encode) holds the
// chunk's latents' thresholds, and above [rows * splits] the (row, split)
// counts of scores above them, increased by this chunk's.
cudaError_t topk_select_chunk(const float* scores, int64_t ld, const float* bias, int64_t rows, int64_t cols,
                              int64_t col0, int64_t seen, int64_t k, int64_t splits, int64_t seg,
                              int64_t state_stride, const topk_key* state_in, topk_key* state_out, topk_key* row_min,
                              uint32_t* cand, int64_t cand_stride, const float* threshold, uint32_t* above,
                              cudaStream_t stream);

// values [rows, k] = ReLU(score) as T, indices [rows, k] int64, descending;
// with raw (threshold_encode) the score itself, and value 0, index 0 for the
// keys of scores below their thresholds (topk_select.h: below_key).
// state: the rows' splits after the last chunk (latent_chunk = splits * seg of
// the plan, M latents in all). state is overwritten when splits == 1 and
// k > kSortSharedKeys (it is the sort buffer); scratch (rows * splits *
// state_stride keys, the other state buffer) is used when splits > 1.
template <typename T>
cudaError_t topk_finish(topk_key* state, topk_key* scratch, int64_t rows, int64_t k, int64_t splits, int64_t M,
                        int64_t latent_chunk, int64_t seg, int64_t state_stride, T* values, int64_t* indices,
                        bool raw, cudaStream_t stream);

}  // namespace ssae::cuda
