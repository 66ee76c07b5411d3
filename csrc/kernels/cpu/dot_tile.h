// Dot products of a row block against a tile of latents: the score tiles of the
// fused encode (csrc/torch/cpu_ops.cpp, score_tile, says where it serves).
//
// MKL's sgemm is slow here (AMD EPYC, 1 thread): 32 GFLOP/s at 20 x 100k x 384
// (retrieval), 74 at 2048 x 24576 x 768 (the training encode); this kernel
// reaches 82 and 102. It reads both operands in their row-major [*, d] layout,
// so nothing is packed or transposed.
#pragma once

#include <cstdint>

namespace ssae::cpu {

// True when dot_tile runs its AVX-512F kernel on this CPU; otherwise it is a
// portable loop, slower than BLAS on large tiles but free of BLAS's per-call
// cost (and of its threads) on small ones.
bool dot_tile_fast();

// c[r * ldc + j] = sum_t a[r * d + t] * b[j * d + t] for r < rows, j < cols,
// accumulated in float32.
void dot_tile(int64_t rows, int64_t cols, int64_t d, const float* a, const float* b, float* c, int64_t ldc);

// The one value dot_tile writes for a . b when dot_tile_fast(), bit for bit (the
// same lanes, fused multiply-adds and reduction tree), so a single pair can be
// rescored exactly as a full tile would have scored it. Only with dot_tile_fast().
float dot_tile_one(int64_t d, const float* a, const float* b);

// out[i] = dot_tile_one(d, a, b + cols[i] * d) for i < n, several at a time (one
// dot product is a chain of dependent multiply-adds; four chains overlap).
void dot_tile_gather(int64_t d, const float* a, const float* b, const int32_t* cols, int64_t n, float* out);

// Squared norms of a float32 row and of its bfloat16 rounding residual.
struct Bf16Norms {
  double sum_sq, residual_sq;
};

// True when the CPU has AVX512_BF16 (vdpbf16ps) and AVX512BW, which dot_tile_bf16 needs.
bool dot_tile_bf16_available();

// dot_tile on bfloat16 operands: c[r * ldc + j] = sum_t a[r * ld + t] * w[j, t]
// over t < ld, products and sums in float32 (vdpbf16ps: input subnormals read
// as zero, output subnormals flushed). Rows of a have a leading dimension ld,
// a multiple of 32, zero-padded from d; the latents w come packed into panels
// (pack_bf16_panels) of 16 latents' bfloat16 pairs side by side, so one
// vdpbf16ps multiplies a row's broadcast pair by 16 latents and the sums need
// no reduction across lanes. Only with dot_tile_bf16_available().
void dot_tile_bf16(int64_t rows, int64_t cols, int64_t ld, const uint16_t* a, const uint16_t* panels, float* c,
                   int64_t ldc);

// Packs cols latents of d values (rows of w) into ceil(cols / 16) panels of
// 16 * ld values for dot_tile_bf16 (latents past cols and values past d are zeros). float32
// latents are rounded to bfloat16 (nearest even) and their norms (as
// to_bf16_row's) written to norms[0, cols).
void pack_bf16_panels(int64_t cols, int64_t d, int64_t ld, const float* w, uint16_t* panels, Bf16Norms* norms);
void pack_bf16_panels(int64_t cols, int64_t d, int64_t ld, const uint16_t* w, uint16_t* panels);

// dst[t] = bfloat16(src[t]) rounded to nearest even for t < d, and zeros up to
// ld (a multiple of 32). Returns the squared norms of src and of the rounding
// residual src - float(dst), summed in float32 (16 lanes, then across them).
Bf16Norms to_bf16_row(int64_t d, int64_t ld, const float* src, uint16_t* dst);

}  // namespace ssae::cpu
