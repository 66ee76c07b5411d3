// Row gathers on the device.
//
// - decode_tile (tilted_loss.cu's fused decodes): a block adds the W rows selected by
//   row n into its threads' columns of one column tile (the layout of row_tiles_launch
//   in launch.h: kColsPerThread columns per thread, strided by the block width so that
//   every load is coalesced), element by element, dense rows of d.
// - load_run / store_run (sparse_decode.cu, sparse_backward.cu): the
//   vectorised layout of row_decode.h, runs of consecutive columns per thread read with
//   16-byte loads where the rows are aligned, any row stride.
#pragma once

#include <cstdint>

#include "device.cuh"
#include "launch.h"
#include "row_decode.h"

namespace ssae::cuda {

// ---------------------------------------------------------------- 16-byte vectors

// Packing of float32 values into 16 bytes of T and back.
template <typename T>
struct Vec16;

template <>
struct Vec16<float> {
  static constexpr int n = 4;
  __device__ __forceinline__ static void unpack(const uint4& q, float* f) {
    f[0] = __uint_as_float(q.x);
    f[1] = __uint_as_float(q.y);
    f[2] = __uint_as_float(q.z);
    f[3] = __uint_as_float(q.w);
  }
  __device__ __forceinline__ static uint4 pack(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

// 16-bit types: eight values, two per 32-bit word; Halves::word widens a word, Halves::pair narrows two
// floats into one.
template <typename Halves>
struct Vec16Halves {
  static constexpr int n = 8;
  __device__ __forceinline__ static void unpack(const uint4& q, float* f) {
    Halves::word(q.x, f);
    Halves::word(q.y, f + 2);
    Halves::word(q.z, f + 4);
    Halves::word(q.w, f + 6);
  }
  __device__ __forceinline__ static uint4 pack(const float* f) {
    return make_uint4(Halves::pair(f[0], f[1]), Halves::pair(f[2], f[3]), Halves::pair(f[4], f[5]),
                      Halves::pair(f[6], f[7]));
  }
};

// bfloat16 is the high half of a float32: widening is a shift.
template <>
struct Vec16<__nv_bfloat16> : Vec16Halves<Vec16<__nv_bfloat16>> {
  __device__ __forceinline__ static void word(uint32_t w, float* f) {
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xffff0000u);
  }
  __device__ __forceinline__ static uint32_t pair(float lo, float hi) {
    return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
  }
};

template <>
struct Vec16<__half> : Vec16Halves<Vec16<__half>> {
  __device__ __forceinline__ static void word(uint32_t w, float* f) {
    f[0] = __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
    f[1] = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
  }
  __device__ __forceinline__ static uint32_t pair(float lo, float hi) {
    return uint32_t(__half_as_ushort(__float2half_rn(lo))) | (uint32_t(__half_as_ushort(__float2half_rn(hi))) << 16);
  }
};

// f[0 .. R) = row[c .. c + R) as float32 (0 past column d). R is a multiple of the
// vector width (Vec16<T>::n) or divides it; c is a multiple of R. 16-byte loads
// when vector_run(aligned, c, R, d) (row_decode.h), else element by element.
template <int R, typename T>
__device__ __forceinline__ void load_run(const T* row, int64_t c, int64_t d, bool aligned, float (&f)[R]) {
  constexpr int n = Vec16<T>::n;
  if constexpr (R % n == 0) {
    if (vector_run(aligned, c, R, d)) {
#pragma unroll
      for (int g = 0; g < R / n; ++g) {
        const uint4 q = *reinterpret_cast<const uint4*>(row + c + g * n);
        Vec16<T>::unpack(q, f + g * n);
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < R; ++i) f[i] = c + i < d ? to_float(row[c + i]) : 0.0f;
}

// row[c .. c + R) = f (columns below d), rounded to T; 16-byte stores as in load_run.
template <int R, typename T>
__device__ __forceinline__ void store_run(T* row, int64_t c, int64_t d, bool aligned, const float (&f)[R]) {
  constexpr int n = Vec16<T>::n;
  if constexpr (R % n == 0) {
    if (vector_run(aligned, c, R, d)) {
#pragma unroll
      for (int g = 0; g < R / n; ++g) *reinterpret_cast<uint4*>(row + c + g * n) = Vec16<T>::pack(f + g * n);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < R; ++i)
    if (c + i < d) row[c + i] = from_float<T>(f[i]);
}

// Whether p (a device pointer) and every row p + r * stride are 16-byte aligned.
template <typename T>
inline bool aligned_rows(const T* p, int64_t stride) {
  return rows_aligned(uint64_t(reinterpret_cast<uintptr_t>(p)), stride, int(sizeof(T)));
}

// One round of a row's (index, value) entries, staged in shared memory.
struct DecodeStage {
  float w[kStageEntries];
  int64_t row[kStageEntries];
};

// Stages entries j0 .. j0 + nj - 1 of row n and returns nj. An index outside
// [0, num_latents) is never dereferenced: it reads row 0 with a NaN weight.
// Starts with a barrier (the previous round's readers are done) and ends with one.
template <typename T>
__device__ __forceinline__ int64_t stage_entries(DecodeStage& s, const T* values, const int64_t* indices, int64_t n,
                                                 int64_t k, int64_t j0, int64_t num_latents) {
  const int t = int(threadIdx.x), nt = int(blockDim.x);
  const int64_t nj = k - j0 < kStageEntries ? k - j0 : kStageEntries;
  __syncthreads();
  for (int64_t j = t; j < nj; j += nt) {
    const int64_t idx = indices[n * k + j0 + j];
    const bool ok = idx >= 0 && idx < num_latents;
    s.row[j] = ok ? idx : 0;
    s.w[j] = ok ? to_float(values[n * k + j0 + j]) : quiet_nan();
  }
  __syncthreads();
  return nj;
}

// acc[i] += sum_j values[n, j] * W[indices[n, j], c_i] in slot order, for this
// thread's columns c_i = tile_column(first, i, ...) < d. Every thread of the block calls it.
template <typename T>
__device__ __forceinline__ void decode_tile(const T* values, const int64_t* indices, const T* W, int64_t n, int64_t k,
                                            int64_t d, int64_t num_latents, int64_t first, DecodeStage& stage,
                                            float (&acc)[kColsPerThread]) {
  const int t = int(threadIdx.x), nt = int(blockDim.x);
  for (int64_t j0 = 0; j0 < k; j0 += kStageEntries) {
    const int64_t nj = stage_entries(stage, values, indices, n, k, j0, num_latents);
#pragma unroll 4
    for (int64_t j = 0; j < nj; ++j) {
      const float w = stage.w[j];
      const T* row = W + stage.row[j] * d;
#pragma unroll
      for (int i = 0; i < kColsPerThread; ++i) {
        const int64_t c = tile_column(first, i, t, nt);
        if (c < d) acc[i] += w * to_float(row[c]);
      }
    }
  }
}

}  // namespace ssae::cuda
