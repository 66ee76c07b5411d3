// TopK encode, CUDA: bias fold, selection and final merge + sort kernels
// (see topk_encode.cuh and docs/cuda.md).
//
// Why the GEMM is not in this file: the local toolkit has no cuBLAS headers,
// and a hand-written WMMA/mma.sync GEMM can be neither run nor tuned on a
// machine without a GPU. cuBLAS (through at::mm_out in the binding) gives
// tensor-core tiles at full speed on a bounded chunk of latents; the price is
// one float32 write and re-read of the chunk's scores (8 bytes per score, next
// to 2d = 1536 GEMM flops per score at d = 768), mostly served from L2 at the
// planned chunk size, and hidden behind the next chunk's GEMM by running the
// two on different streams. Selecting in registers straight out of the GEMM
// tiles is the Triton backend's design; this backend is the second opinion.
#include "device.cuh"
#include "topk_encode.cuh"

namespace ssae::cuda {
namespace {

constexpr int kFoldThreads = 256;

__global__ void __launch_bounds__(kFoldThreads) fold_chunk_bias_kernel(float* row, const float* b_enc, int64_t cols) {
  const int64_t c = int64_t(blockIdx.x) * kFoldThreads + int64_t(threadIdx.x);
  if (c < cols) row[c] = folded_bias(b_enc ? b_enc[c] : 0.0f, row[c]);
}

__global__ void __launch_bounds__(kSelectThreads)
    select_chunk_kernel(const float* scores, int64_t ld, const float* bias, int64_t cols, int64_t col0, int64_t seen,
                        int64_t k, int64_t splits, int64_t seg, int64_t state_stride, const topk_key* state_in,
                        topk_key* state_out, topk_key* row_min, uint32_t* cand, int64_t cand_stride,
                        const float* threshold, uint32_t* above) {
  __shared__ SelectShared sh;
  const int64_t b = blockIdx.x;
  const int64_t r = b / splits, s = b - r * splits;
  const int64_t first = s * seg;
  const SelectRow row{scores + r * ld + first,
                      bias + first,
                      split_cols(cols, seg, s),
                      col0 + first,
                      seen,
                      k,
                      state_in + b * state_stride,
                      state_out + b * state_stride,
                      row_min + b,
                      cand + r * cand_stride + first,
                      threshold ? threshold + first : nullptr,
                      above ? above + b : nullptr};
  DeviceExec ex;
  select_chunk(ex, sh, row);
}

template <typename T, bool kShared, bool kRaw>
__global__ void __launch_bounds__(kSelectThreads)
    finish_kernel(topk_key* state, topk_key* scratch, int64_t k, int64_t splits, int64_t M, int64_t chunk, int64_t seg,
                  int64_t state_stride, T* values, int64_t* indices) {
  __shared__ topk_key smem[kShared ? kSortSharedKeys : 1];
  const int64_t r = blockIdx.x;
  T* v = values + r * k;
  int64_t* ix = indices + r * k;
  DeviceExec ex;
  const auto store = [&](int64_t j, topk_key key) {
    const float s = key_score(key);
    if (kRaw) {  // threshold_encode: raw values; 0 / 0 where fewer than k scores were above threshold
      const bool below = is_below(key);
      v[j] = from_float<T>(below ? 0.0f : s);
      ix[j] = below ? 0 : key_latent(key);
    } else {
      v[j] = from_float<T>(s < 0.0f ? 0.0f : s);  // ReLU that keeps NaN, as torch.relu
      ix[j] = key_latent(key);
    }
  };
  if (splits == 1) {
    topk_key* row = state + r * state_stride;
    finish_row(ex, kShared ? smem : row, row, k, state_stride, store);
  } else {
    __shared__ SelectShared sh;
    __shared__ topk_key row_min;
    topk_key* buf = kShared ? smem : scratch + r * state_stride;
    merge_splits(ex, sh, MergeRow{state + r * splits * state_stride, splits, state_stride, k, M, chunk, seg, buf,
                                  &row_min});
    finish_row(ex, buf, buf, k, state_stride, store);
  }
}

}  // namespace

cudaError_t fold_chunk_bias(float* row, const float* b_enc, int64_t cols, cudaStream_t stream) {
  const Launch l{ceil_div(cols, kFoldThreads), kFoldThreads, 1};
  if (cols < 1 || !grid_fits(l)) return cudaErrorInvalidValue;
  fold_chunk_bias_kernel<<<unsigned(l.blocks), l.threads, 0, stream>>>(row, b_enc, cols);
  return cudaGetLastError();
}

cudaError_t topk_select_chunk(const float* scores, int64_t ld, const float* bias, int64_t rows, int64_t cols,
                              int64_t col0, int64_t seen, int64_t k, int64_t splits, int64_t seg,
                              int64_t state_stride, const topk_key* state_in, topk_key* state_out, topk_key* row_min,
                              uint32_t* cand, int64_t cand_stride, const float* threshold, uint32_t* above,
                              cudaStream_t stream) {
  const Launch l = select_launch(rows, splits);
  if (!grid_fits(l) || cols < 1 || k < 1 || splits < 1 || seg < 1 || splits * seg < cols || cand_stride < cols)
    return cudaErrorInvalidValue;
  select_chunk_kernel<<<unsigned(l.blocks), l.threads, 0, stream>>>(scores, ld, bias, cols, col0, seen, k, splits,
                                                                    seg, state_stride, state_in, state_out, row_min,
                                                                    cand, cand_stride, threshold, above);
  return cudaGetLastError();
}

template <typename T>
cudaError_t topk_finish(topk_key* state, topk_key* scratch, int64_t rows, int64_t k, int64_t splits, int64_t M,
                        int64_t latent_chunk, int64_t seg, int64_t state_stride, T* values, int64_t* indices,
                        bool raw, cudaStream_t stream) {
  const Launch l = finish_launch(rows);
  if (!grid_fits(l) || k < 1 || splits < 1 || state_stride < next_pow2(k) || (splits > 1 && !scratch))
    return cudaErrorInvalidValue;
  const auto launch = [&](auto kernel) {
    kernel<<<unsigned(l.blocks), l.threads, 0, stream>>>(state, scratch, k, splits, M, latent_chunk, seg, state_stride,
                                                         values, indices);
  };
  const bool shared = sort_in_shared(state_stride);
  if (shared && raw) launch(finish_kernel<T, true, true>);
  else if (shared) launch(finish_kernel<T, true, false>);
  else if (raw) launch(finish_kernel<T, false, true>);
  else launch(finish_kernel<T, false, false>);
  return cudaGetLastError();
}

template cudaError_t topk_finish<float>(topk_key*, topk_key*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                        int64_t, float*, int64_t*, bool, cudaStream_t);
template cudaError_t topk_finish<__nv_bfloat16>(topk_key*, topk_key*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                                int64_t, int64_t, __nv_bfloat16*, int64_t*, bool, cudaStream_t);
template cudaError_t topk_finish<__half>(topk_key*, topk_key*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                         int64_t, __half*, int64_t*, bool, cudaStream_t);

}  // namespace ssae::cuda
