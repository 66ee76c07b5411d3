// Subspace projection, CPU: out = U (U^T G), or G - U (U^T G) with complement.
// U is [d, r] dense row-major; G and out are [d, n] row-major with row strides
// ldg and ldo (unit column stride). Accumulation is in acc_t<T>.
#pragma once

#include <cstdint>

#include "scalar.h"

namespace ssae::cpu {

// out may be G itself (ldo == ldg): the kernel finishes reading a block of
// columns before it writes that block, and blocks are disjoint.
template <typename T>
void project_subspace(const T* G, int64_t ldg, const T* U, int64_t d, int64_t r, int64_t n, bool complement, T* out,
                      int64_t ldo);

// Columns per block for a problem on `threads` threads (exposed for the tests).
int64_t project_subspace_block(int64_t d, int64_t r, int64_t n, int threads);

}  // namespace ssae::cpu
