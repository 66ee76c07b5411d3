// The work split of sparse_transpose_matmul on the device, plain C++ so that the
// host tests (csrc/tests/test_sparse_backward.cpp) run exactly this arithmetic.
//
// The N*k entries, sorted by latent (latent_transpose), are cut into chunks of
// kHotPiece positions: chunk c covers positions [c * kHotPiece, (c + 1) * kHotPiece).
//
// - A cold latent (at most kHotPiece entries) is summed by one block, its owner,
//   in its sorted order, and written directly.
// - A hot latent (more entries) would serialise its owner behind up to N entries.
//   Its segment is summed instead by the chunks it crosses, one block each (the
//   "helpers"), into float32 partial sums, and the chunk holding its last entry
//   adds those partials in chunk order (a second kernel).
//
// A hot segment is longer than a chunk, so a chunk meets at most two of them:
// the one holding its first position (partial slot 0) and one that starts inside
// it and runs past its end (slot 1). Partials are [2 * chunks] rows of d floats.
// Every sum has one owner and a fixed order: results are deterministic (a hot
// latent's sum is associated by chunks, so it may differ in the last bits from a
// single sequential sum; a cold latent's is that sequential sum).
#pragma once

#include <cstdint>

#include "launch.h"

namespace ssae::cuda {

constexpr int64_t kHotPiece = 256;

SSAE_HD int64_t stm_chunks(int64_t entries) { return (entries + kHotPiece - 1) / kHotPiece; }
// Partial sums: rows (of d float32) and column sums, 2 per chunk.
SSAE_HD int64_t stm_partials(int64_t entries) { return 2 * stm_chunks(entries); }

// offsets[m] clamped into [0, entries]: offsets not made by latent_transpose must
// still not send any read out of bounds.
SSAE_HD int64_t clamp_offset(int64_t v, int64_t entries) { return v < 0 ? 0 : (v > entries ? entries : v); }

// Latent m's segment [begin, end) of sorted positions, clamped.
struct Segment {
  int64_t begin = 0, end = 0;
};
SSAE_HD Segment segment(const int64_t* offsets, int64_t m, int64_t entries) {
  Segment s;
  s.begin = clamp_offset(offsets[m], entries);
  s.end = clamp_offset(offsets[m + 1], entries);
  if (s.end < s.begin) s.end = s.begin;
  return s;
}

SSAE_HD bool is_hot(const Segment& s) { return s.end - s.begin > kHotPiece; }

// The latent whose segment holds position e: the last m in [0, num_latents] with
// offsets[m] <= e (binary search; offsets ascend). num_latents when e lies past
// every segment (entries that latent_transpose left out), or 0 before them.
SSAE_HD int64_t latent_of(const int64_t* offsets, int64_t num_latents, int64_t e) {
  int64_t lo = 0, hi = num_latents;  // answer in [lo, hi]
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (offsets[mid] <= e) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Positions [begin, end) of chunk c.
SSAE_HD Segment chunk_range(int64_t c, int64_t entries) {
  Segment s;
  s.begin = c * kHotPiece;
  s.end = s.begin + kHotPiece < entries ? s.begin + kHotPiece : entries;
  return s;
}

// A helper's piece of a hot segment: its positions and the partial slot it writes.
struct Piece {
  int64_t latent = -1;  // -1: no piece
  int64_t begin = 0, end = 0;
  int64_t slot = 0;  // partial row 2 * chunk + (0 or 1)
};

// The (at most two) pieces of hot segments in chunk c; pieces[i].latent = -1 where none.
SSAE_HD void hot_pieces(const int64_t* offsets, int64_t num_latents, int64_t entries, int64_t c, Piece (&pieces)[2]) {
  pieces[0] = Piece();
  pieces[1] = Piece();
  const Segment r = chunk_range(c, entries);
  if (r.begin >= r.end) return;
  const int64_t m0 = latent_of(offsets, num_latents, r.begin);
  if (m0 < num_latents) {
    const Segment s = segment(offsets, m0, entries);
    if (is_hot(s) && s.begin <= r.begin && r.begin < s.end) {
      pieces[0].latent = m0;
      pieces[0].begin = r.begin;
      pieces[0].end = s.end < r.end ? s.end : r.end;
      pieces[0].slot = 2 * c;
    }
  }
  const int64_t m1 = latent_of(offsets, num_latents, r.end - 1);
  if (m1 != m0 && m1 < num_latents) {
    const Segment s = segment(offsets, m1, entries);
    if (is_hot(s) && r.begin < s.begin && s.begin < r.end) {
      pieces[1].latent = m1;
      pieces[1].begin = s.begin;
      pieces[1].end = r.end;
      pieces[1].slot = 2 * c + 1;
    }
  }
}

// The hot latent whose sum chunk c finishes (the chunk holding its last entry), and
// where its partials are: slot first_slot of chunk first_chunk, then slot 0 of each
// later chunk up to and including c. latent = -1 when chunk c finishes none.
struct HotSum {
  int64_t latent = -1;
  int64_t first_chunk = 0, first_slot = 0, last_chunk = 0;
};
SSAE_HD HotSum hot_sum(const int64_t* offsets, int64_t num_latents, int64_t entries, int64_t c) {
  HotSum h;
  const Segment r = chunk_range(c, entries);
  if (r.begin >= r.end) return h;
  const int64_t m = latent_of(offsets, num_latents, r.begin);
  if (m >= num_latents) return h;
  const Segment s = segment(offsets, m, entries);
  // A hot segment that ends in chunk c started before it (it is longer than a chunk).
  if (!is_hot(s) || !(s.begin < r.begin && r.begin < s.end && s.end <= r.end)) return h;
  h.latent = m;
  h.first_chunk = s.begin / kHotPiece;
  h.first_slot = s.begin == h.first_chunk * kHotPiece ? 0 : 1;
  h.last_chunk = c;
  return h;
}

// Partial slot of chunk q (first_chunk <= q <= last_chunk) in h's sum.
SSAE_HD int64_t hot_slot(const HotSum& h, int64_t q) { return 2 * q + (q == h.first_chunk ? h.first_slot : 0); }

}  // namespace ssae::cuda
