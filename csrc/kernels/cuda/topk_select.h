// Block-level top-k selection of the CUDA encode, written once for the
// device and for a host emulation used by the unit tests
// (csrc/tests/test_cuda_topk_select.cpp, which also runs it with the block's
// threads in random orders between barriers).
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
// on the host (csrc/tests) it loops over thread ids in any order (the tests
// draw a fresh random order for every phase). Code outside
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

// threshold_encode: a score not above its latent's threshold gets a key with a
// zero high half, below every real score's key (order_bits(-inf) > 0) and
// still > 0 and unique, so the selection runs unchanged: a row's k best keys
// are its scores above threshold, largest first, then (when there are fewer
// than k) below-threshold keys, which the finish writes as value 0, index 0.
SSAE_FN topk_key below_key(int64_t latent) { return topk_key(~uint32_t(latent)); }
SSAE_FN bool is_below(topk_key key) { return (key >> 32) == 0; }

struct SelectShared {
  uint32_t hist[kRadixBins];
  uint32_t scan[2][kRadixBins];
  uint32_t ncand;
  uint32_t nout;
  uint32_t digit;  // radix digit of the k-th key at this pass
  uint32_t above;  // keys in higher bins
  uint32_t count;  // keys in the digit's bin
  uint32_t nabove;  // threshold_encode: scores of the segment above their thresholds
  topk_key kmin;
};

// The k largest of the keys key_at(i), i in [0, n), where key 0 marks an
// absent entry (every real key is > 0) and `total` real keys are present
// (unique, as every key is). They are written to out[0, min(k, total)) in any
// order and their minimum to *row_min. A most-significant-digit radix select
// finds the k-th key, usually in 2-4 passes of 8 bits (it stops once the k-th
// key's bin is taken whole); with total <= k every real key is kept.
// Precondition: sh.nout == 0 and sh.kmin == ~0, written before a barrier.
template <class Exec, class KeyAt>
SSAE_FN void select_top(Exec& ex, SelectShared& sh, int64_t n, int64_t total, int64_t k, const KeyAt& key_at,
                        topk_key* out, topk_key* row_min) {
  const int T = ex.threads();
  // Invariant: `remaining` (>= 1) keys are still to be taken among the keys
  // whose masked bits equal `prefix`; every key with larger masked bits is taken.
  topk_key prefix = 0, mask = 0;  // mask 0: every real key is taken
  if (total > k) {
    uint32_t remaining = uint32_t(k);
    for (int shift = 56; shift >= 0; shift -= 8) {
      ex.each([&](int t) { sh.hist[t] = 0; });
      ex.each([&](int t) {
        for (int64_t i = t; i < n; i += T) {
          const topk_key key = key_at(i);
          if (key != 0 && (key & mask) == prefix) ex.atomic_add(&sh.hist[(key >> shift) & 0xff], 1u);
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
  }

  ex.each([&](int t) {
    for (int64_t base = 0; base < n; base += T) {
      const int64_t i = base + t;
      topk_key key = 0;
      bool keep = false;
      if (i < n) {
        key = key_at(i);
        keep = key != 0 && (key & mask) >= prefix;
      }
      const uint32_t slot = ex.append(&sh.nout, keep);
      if (keep) {
        out[slot] = key;
        ex.atomic_min(&sh.kmin, key);
      }
    }
  });
  ex.each([&](int t) {
    if (t == 0) *row_min = sh.kmin;
  });
}

// The bias of a latent with b_dec folded in (BDec::kFold, launch.h): b_enc
// minus the float32 GEMM output W[m] @ b_dec.
SSAE_FN float folded_bias(float b_enc, float w_dot_b_dec) { return b_enc - w_dot_b_dec; }

// One selection block's share of one latent chunk: the segment of a row's
// chunk that one latent split owns (the whole chunk with one split).
struct SelectRow {
  const float* scores;  // [cols] GEMM output for this row and segment
  const float* bias;    // [cols] float32 bias of the segment's latents (b_enc, with W @ b_dec folded in)
  int64_t cols;         // latents in this segment (0: a split past the end of the last chunk)
  int64_t col0;         // latent of column 0
  int64_t seen;         // latents this split merged before (its segments of the earlier chunks)
  int64_t k;
  const topk_key* state_in;  // the split's top keys so far: min(k, seen) of them, any order
  topk_key* state_out;       // receives min(k, seen + cols) keys
  topk_key* row_min;         // smallest key of the state, read once the state holds k keys
  uint32_t* cand;            // [cols] scratch: segment columns that beat the split's threshold
  // threshold_encode only (null for topk_encode): the float32 thresholds of the segment's latents, and the
  // (row, split)'s count of scores above them, increased by this segment's
  const float* threshold = nullptr;
  uint32_t* above = nullptr;
};

SSAE_FN topk_key chunk_key(const SelectRow& a, int64_t c) {
  const float score = a.scores[c] + a.bias[c];
  if (a.threshold && !(score > a.threshold[c])) return below_key(a.col0 + c);  // NaN is never above
  return pack_key(score, a.col0 + c);
}

// Merges the segment into the split's top-k: keys of the segment above the
// current k-th key are listed, then select_top() over (state + listed keys).
template <class Exec>
SSAE_FN void select_chunk(Exec& ex, SelectShared& sh, const SelectRow& a) {
  const int T = ex.threads();
  const int64_t filled = a.seen < a.k ? a.seen : a.k;
  const topk_key kth_key = filled == a.k ? *a.row_min : topk_key(0);  // a candidate must beat it

  ex.each([&](int t) {
    if (t == 0) {
      sh.ncand = 0;
      sh.nout = 0;
      sh.nabove = 0;
      sh.kmin = ~topk_key(0);
    }
  });
  ex.each([&](int t) {
    for (int64_t base = 0; base < a.cols; base += T) {
      const int64_t c = base + t;
      const topk_key key = c < a.cols ? chunk_key(a, c) : topk_key(0);
      const bool keep = key > kth_key;  // key 0 (past the segment) never does
      const uint32_t slot = ex.append(&sh.ncand, keep);
      if (keep) a.cand[slot] = uint32_t(c);
      if (a.threshold && key != 0 && !is_below(key)) ex.atomic_add(&sh.nabove, 1u);
    }
  });
  ex.each([&](int t) {
    if (t == 0 && a.above) *a.above += sh.nabove;  // only this block touches the (row, split) count
  });
  const int64_t total = filled + int64_t(sh.ncand);
  const auto key_at = [&](int64_t i) -> topk_key {
    return i < filled ? a.state_in[i] : chunk_key(a, a.cand[i - filled]);
  };
  select_top(ex, sh, total, total, a.k, key_at, a.state_out, a.row_min);
}

// A row's latent splits, merged after its last chunk: split s holds
// split_keys(M, chunk, seg, s, k) keys (launch.h) at states + s * stride.
struct MergeRow {
  const topk_key* states;  // [splits, stride]
  int64_t splits;
  int64_t stride;
  int64_t k;
  int64_t M;             // latents in all
  int64_t chunk;         // latents per chunk (splits * seg)
  int64_t seg;           // latents per split per chunk
  topk_key* out;         // receives the row's k keys
  topk_key* row_min;
};

template <class Exec>
SSAE_FN void merge_splits(Exec& ex, SelectShared& sh, const MergeRow& a) {
  ex.each([&](int t) {
    if (t == 0) {
      sh.nout = 0;
      sh.kmin = ~topk_key(0);
    }
  });
  // split_keys() without a division per key: stride is a power of two.
  const int64_t full = (a.M / a.chunk) * a.seg, rest = a.M % a.chunk;
  int shift = 0;
  while ((int64_t(1) << shift) < a.stride) ++shift;
  const auto keys_of = [&](int64_t s) {
    const int64_t n = split_latents_from(full, rest, a.seg, s);
    return n < a.k ? n : a.k;
  };
  int64_t total = 0;
  for (int64_t s = 0; s < a.splits; ++s) total += keys_of(s);
  const auto key_at = [&](int64_t i) -> topk_key {
    const int64_t s = i >> shift, j = i & (a.stride - 1);
    return j < keys_of(s) ? a.states[i] : topk_key(0);
  };
  select_top(ex, sh, a.splits * a.stride, total, a.k, key_at, a.out, a.row_min);
}

// Sorts a row's k keys in descending order and emits them through
// store(j, key). buf holds `padded` = next_pow2(k) keys (shared
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
    for (int64_t j = t; j < k; j += T) store(j, buf[j]);
  });
}

}  // namespace ssae::cuda
