// Fused TopK encode, CUDA: selection and final sort kernels (see topk_encode.cuh).
//
// Why the GEMM is not in this file: the local toolkit has no cuBLAS headers,
// and a hand-written WMMA/mma.sync GEMM can be neither run nor tuned on a
// machine without a GPU. cuBLAS (through at::mm_out in the binding) gives
// tensor-core tiles at full speed on a bounded chunk of latents; the price is
// one float32 write and re-read of the chunk's scores (8 bytes per score, next
// to 2d = 1536 GEMM flops per score at d = 768), mostly served from L2 at the
// planned chunk size. Selecting in registers straight out of the GEMM tiles is
// the Triton backend's design; this backend is the second opinion.
#include "device.cuh"
#include "topk_encode.cuh"

namespace ssae::cuda {
namespace {

__global__ void __launch_bounds__(kSelectThreads)
    select_chunk_kernel(const float* scores, const float* scores_lo, int64_t ld, const float* bias, int64_t cols,
                        int64_t col0, int64_t k, int64_t state_stride, const topk_key* state_in, topk_key* state_out,
                        topk_key* row_min, uint32_t* cand, int64_t cand_stride) {
  __shared__ SelectShared sh;
  const int64_t r = blockIdx.x;
  const SelectRow row{scores + r * ld,
                      scores_lo ? scores_lo + r * ld : nullptr,
                      bias,
                      cols,
                      col0,
                      k,
                      state_in + r * state_stride,
                      state_out + r * state_stride,
                      row_min + r,
                      cand + r * cand_stride};
  DeviceExec ex;
  select_chunk(ex, sh, row);
}

template <typename T, bool kShared>
__global__ void __launch_bounds__(kSelectThreads)
    finish_kernel(topk_key* state, int64_t k, int64_t state_stride, T* values, int64_t* indices) {
  __shared__ topk_key smem[kShared ? kSortSharedKeys : 1];
  const int64_t r = blockIdx.x;
  topk_key* row = state + r * state_stride;
  T* v = values + r * k;
  int64_t* ix = indices + r * k;
  DeviceExec ex;
  finish_row(ex, kShared ? smem : row, row, k, state_stride, [&](int64_t j, float s, int64_t latent) {
    v[j] = from_float<T>(s < 0.0f ? 0.0f : s);  // ReLU that keeps NaN, as torch.relu
    ix[j] = latent;
  });
}

}  // namespace

cudaError_t topk_select_chunk(const float* scores, const float* scores_lo, int64_t ld, const float* bias,
                              int64_t rows, int64_t cols, int64_t col0, int64_t k, int64_t state_stride,
                              const topk_key* state_in, topk_key* state_out, topk_key* row_min, uint32_t* cand,
                              int64_t cand_stride, cudaStream_t stream) {
  const Launch l = select_launch(rows);
  if (!grid_fits(l) || cols < 1 || k < 1) return cudaErrorInvalidValue;
  select_chunk_kernel<<<unsigned(l.blocks), l.threads, 0, stream>>>(scores, scores_lo, ld, bias, cols, col0, k,
                                                                    state_stride, state_in, state_out, row_min,
                                                                    cand, cand_stride);
  return cudaGetLastError();
}

template <typename T>
cudaError_t topk_finish(topk_key* state, int64_t rows, int64_t k, int64_t state_stride, T* values, int64_t* indices,
                        cudaStream_t stream) {
  const Launch l = select_launch(rows);
  if (!grid_fits(l) || k < 1 || state_stride < next_pow2(k)) return cudaErrorInvalidValue;
  if (sort_in_shared(state_stride))
    finish_kernel<T, true><<<unsigned(l.blocks), l.threads, 0, stream>>>(state, k, state_stride, values, indices);
  else
    finish_kernel<T, false><<<unsigned(l.blocks), l.threads, 0, stream>>>(state, k, state_stride, values, indices);
  return cudaGetLastError();
}

template cudaError_t topk_finish<float>(topk_key*, int64_t, int64_t, int64_t, float*, int64_t*, cudaStream_t);
template cudaError_t topk_finish<__nv_bfloat16>(topk_key*, int64_t, int64_t, int64_t, __nv_bfloat16*, int64_t*,
                                                cudaStream_t);
template cudaError_t topk_finish<__half>(topk_key*, int64_t, int64_t, int64_t, __half*, int64_t*, cudaStream_t);

}  // namespace ssae::cuda
