// Sparse backward primitives, CPU, shared by the encoder and decoder backward.
//
// A TopK code is a sparse rows x latents matrix S with S[n, indices[n, j]] =
// weights[n, j]. The backward passes need S^T X (grad of a weight matrix) and
// the dot products of dense rows with the selected weight rows (grad of the
// code). S^T is built once per step as a counting sort of entries by latent,
// so every latent's gradient row is a sum owned by one thread: no atomics,
// and the summation order is fixed (deterministic).
#pragma once

#include <cstdint>

#include "scalar.h"

namespace ssae::cpu {

// out[n, j] = grad[n] . W[indices[n, j]]  (an SDDMM). grad [rows, d], W [*, d], out [rows, k].
template <typename T>
void sampled_dot(const T* grad, const int64_t* indices, const T* W, int64_t rows, int64_t k,
                 int64_t d, T* out);

// Counting sort of the entries p = n * k + j by latent indices[p]:
// order[offsets[m] .. offsets[m + 1]) lists, ascending, the entries of latent m.
// offsets has num_latents + 1 elements, order has count.
void latent_transpose(const int64_t* indices, int64_t count, int64_t num_latents,
                      int64_t* offsets, int64_t* order);

// out[m] = sum over entries p of latent m of weights[p] * rows[p / k]   ([num_latents, d])
// colsum[m] = sum over the same entries of weights[p]                   (may be null)
template <typename T>
void sparse_transpose_matmul(const T* weights, const T* rows, int64_t k, int64_t d,
                             const int64_t* offsets, const int64_t* order, int64_t num_latents,
                             T* out, T* colsum);

}  // namespace ssae::cpu
