// Dot products of a few rows against a tile of latents, for the fused encode
// when a block holds few rows (retrieval: 20 seed queries against 100k chunks).
//
// MKL's sgemm runs such short-and-wide products at under half the speed it
// reaches on large ones here (AMD EPYC, 2.6 GHz: 32 GFLOP/s per core at 20 x
// 100k x 384 against 74 at 2048 x 24576 x 768). This kernel reads both operands
// in their row-major [*, d] layout, so nothing is packed or transposed.
#pragma once

#include <cstdint>

namespace ssae::cpu {

// True when dot_tile runs its AVX-512F kernel on this CPU; otherwise it is a
// plain loop, correct but slower than BLAS.
bool dot_tile_fast();

// c[r * ldc + j] = sum_t a[r * d + t] * b[j * d + t] for r < rows, j < cols,
// accumulated in float32.
void dot_tile(int64_t rows, int64_t cols, int64_t d, const float* a, const float* b, float* c, int64_t ldc);

}  // namespace ssae::cpu
