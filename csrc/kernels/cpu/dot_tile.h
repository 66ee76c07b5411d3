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

}  // namespace ssae::cpu
