// Block-level top-k selection of the CUDA fused encode, written once for the
// device and for a host emulation used by the unit tests.
//
// A (score, latent) pair is packed into one 64-bit key whose unsigned order is
// the ranking order: score bits mapped monotonically (NaN above +inf, -0 equal
// to +0) in the high half, the complemented latent in the low half (ties go to
// the lower latent). Keys are unique, so "the k largest keys" is exact and
// deterministic whatever the thread schedule.
//
// The algorithms are templates over an execution policy `Exec`:
//   ex.threads()           threads per block (== kRadixBins)
//   ex.each(f)             f(tid) for every thread, then a block barrier
//   ex.append(&n, keep)    slot index from counter n for threads with keep
//                          (called by every thread the same number of times)
//   ex.atomic_add / ex.atomic_min   on shared counters
// On the device (device.cuh) `each` is one call per thread + __syncthreads;
// on the host (csrc/tests) it loops over thread ids in any order. Code outside
// `each` runs in every thread on the device and once on the host, so it only
// reads shared state that no thread writes before the next two barriers.
#pragma once

#include <cstdint>
#include <cstring>

#include "launch.h"

#if defined(__CUDACC__)
#define SSAE_FN __device__ __forceinline__
#else
#define SSAE_FN inline
#endif

namespace ssae::cuda {

using topk_key = unsigned long long;
static_assert(sizeof(topk_key) == 8, "keys are 64-bit");

SSAE_FN uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

SSAE_FN float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// Monotone map of a float to uint32: a < b  <=>  order_bits(a) < order_bits(b);
// every NaN maps to the maximum; -0 and +0 map to the same value.
SSAE_FN uint32_t order_bits(float s) {
  if (s != s) return 0xffffffffu;
  if (s == 0.0f) return 0x80000000u;
  const uint32_t u = float_bits(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inverse of order_bits (NaN comes back as a NaN, -0 as +0).
SSAE_FN float order_float(uint32_t b) { return bits_float((b & 0x80000000u) ? (b & 0x7fffffffu) : ~b); }

// Keys of real entries are > 0: order_bits(-inf) = 0x007fffff.
SSAE_FN topk_key pack_key(float score, int64_t latent) {
  return (topk_key(order_bits(score)) << 32) | topk_key(~uint32_t(latent));
}
SSAE_FN float key_score(topk_key key) { return order_float(uint32_t(key >> 32)); }
SSAE_FN int64_t key_latent(topk_key key) { return int64_t(~uint32_t(key)); }

struct SelectShared {
  uint32_t hist[kRadixBins];
  uint32_t scan[2][kRadixBins];
  uint32_t ncand;
  uint32_t nout;
  uint32_t digit;  // radix digit of the k-th key at this pass
  uint32_t above;  // keys in higher bins
  uint32_t count;  // keys in the digit's bin
  topk_key kmin;
};

// One row of one latent chunk.
struct SelectRow {
  const float* scores;     // [cols] GEMM output for this row
  const float* scores_lo;  // [cols] second half when x - b_dec was split into hi + lo, else null
  const float* bias;       // [cols] b_enc of the chunk's latents, float32
  int64_t cols;            // latents in this chunk
  int64_t col0;            // first latent of the chunk (chunks arrive in increasing order from 0)
  int64_t k;
  const topk_key* state_in;   // the row's top keys so far: min(k, col0) of them, any order
  topk_key* state_out;        // receives min(k, col0 + cols) keys
  topk_key* row_min;          // smallest key of the state, kept once the state holds k keys
  uint32_t* cand;          // [cols] scratch: chunk columns that beat the row's threshold
};

SSAE_FN topk_key chunk_key(const SelectRow& a, int64_t c) {
  float s = a.scores[c];
  if (a.scores_lo) s += a.scores_lo[c];
  return pack_key(s + a.bias[c], a.col0 + c);
}

// Merges the chunk into the row's top-k: keys of the chunk above the current
// k-th key are listed, then a most-significant-digit radix select over
// (state + listed keys) finds the new k-th key, usually in 2-4 passes of 8 bits
// (it stops once the k-th key's bin is taken whole).
template <class Exec>
SSAE_FN void select_chunk(Exec& ex, SelectShared& sh, const SelectRow& a) {
  const int T = ex.threads();
  const int64_t filled = a.col0 < a.k ? a.col0 : a.k;
  const topk_key threshold = filled == a.k ? *a.row_min : topk_key(0);

  ex.each([&](int t) {
    if (t == 0) {
      sh.ncand = 0;
      sh.nout = 0;
      sh.kmin = ~topk_key(0);
    }
  });
  ex.each([&](int t) {
    for (int64_t base = 0; base < a.cols; base += T) {
      const int64_t c = base + t;
      const bool keep = c < a.cols && chunk_key(a, c) > threshold;
      const uint32_t slot = ex.append(&sh.ncand, keep);
      if (keep) a.cand[slot] = uint32_t(c);
    }
  });
  const int64_t total = filled + int64_t(sh.ncand);
  const auto key_at = [&](int64_t i) -> topk_key { return i < filled ? a.state_in[i] : chunk_key(a, a.cand[i - filled]); };

  if (total <= a.k) {  // nothing to drop
    ex.each([&](int t) {
      for (int64_t i = t; i < total; i += T) {
        const topk_key key = key_at(i);
        a.state_out[i] = key;
        ex.atomic_min(&sh.kmin, key);
      }
    });
    if (total == a.k)
      ex.each([&](int t) {
        if (t == 0) *a.row_min = sh.kmin;
      });
    return;
  }

  // Invariant: `remaining` (>= 1) keys are still to be taken among the keys
  // whose masked bits equal `prefix`; every key with larger masked bits is taken.
  topk_key prefix = 0, mask = 0;
  uint32_t remaining = uint32_t(a.k);
  for (int shift = 56; shift >= 0; shift -= 8) {
    ex.each([&](int t) { sh.hist[t] = 0; });
    ex.each([&](int t) {
      for (int64_t i = t; i < total; i += T) {
        const topk_key key = key_at(i);
        if ((key & mask) == prefix) ex.atomic_add(&sh.hist[(key >> shift) & 0xff], 1u);
      }
    });
    // Suffix sums over the bins (Hillis-Steele, ping-pong buffers).
    const uint32_t* src = sh.hist;
    for (int off = 1, b = 0; off < kRadixBins; off <<= 1, b ^= 1) {
      uint32_t* dst = sh.scan[b];
      ex.each([&](int t) { dst[t] = src[t] + (t + off < kRadixBins ? src[t + off] : 0u); });
      src = dst;
    }
    // The bin holding the remaining-th largest key: exactly one t has
    // suffix[t] >= remaining > suffix[t + 1].
    ex.each([&](int t) {
      const uint32_t here = src[t], next = t + 1 < kRadixBins ? src[t + 1] : 0u;
      if (here >= remaining && next < remaining) {
        sh.digit = uint32_t(t);
        sh.above = next;
        sh.count = sh.hist[t];
      }
    });
    remaining -= sh.above;
    prefix |= topk_key(sh.digit) << shift;
    mask |= topk_key(0xff) << shift;
    if (sh.count == remaining) break;  // the whole bin is taken; always true at shift 0 (unique keys)
  }

  ex.each([&](int t) {
    for (int64_t base = 0; base < total; base += T) {
      const int64_t i = base + t;
      topk_key key = 0;
      bool keep = false;
      if (i < total) {
        key = key_at(i);
        keep = (key & mask) >= prefix;
      }
      const uint32_t slot = ex.append(&sh.nout, keep);
      if (keep) {
        a.state_out[slot] = key;
        ex.atomic_min(&sh.kmin, key);
      }
    }
  });
  ex.each([&](int t) {
    if (t == 0) *a.row_min = sh.kmin;
  });
}

// Sorts a row's k keys in descending order and emits them through
// store(j, score, latent). buf holds `padded` = next_pow2(k) keys (shared
// memory, or the row's own state buffer: state may alias buf).
template <class Exec, class Store>
SSAE_FN void finish_row(Exec& ex, topk_key* buf, const topk_key* state, int64_t k, int64_t padded, Store&& store) {
  const int T = ex.threads();
  ex.each([&](int t) {
    for (int64_t i = t; i < padded; i += T) buf[i] = i < k ? state[i] : topk_key(0);  // 0 sorts last
  });
  // Bitonic sort, descending: pairs (lo, lo + stride) are disjoint within a step.
  for (int64_t size = 2; size <= padded; size <<= 1)
    for (int64_t stride = size >> 1; stride > 0; stride >>= 1)
      ex.each([&](int t) {
        for (int64_t q = t; q < padded / 2; q += T) {
          const int64_t lo = 2 * q - (q & (stride - 1));
          const int64_t hi = lo + stride;
          const bool descending = (lo & size) == 0;
          const topk_key x = buf[lo], y = buf[hi];
          if ((x < y) == descending) {
            buf[lo] = y;
            buf[hi] = x;
          }
        }
      });
  ex.each([&](int t) {
    for (int64_t j = t; j < k; j += T) store(j, key_score(buf[j]), key_latent(buf[j]));
  });
}

}  // namespace ssae::cuda
