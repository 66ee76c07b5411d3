// Fused TopK encode, CPU: running per-row top-k over tiles of pre-activations.
//
// The caller computes pre-activation tiles (a GEMM of a row block against a
// block of latents, in cache-sized pieces) and hands each tile to consume() in
// increasing latent order; only O(rows * k) state is kept between tiles, so the
// full rows x latents matrix never exists.
#pragma once

#include <cstdint>
#include <vector>

#include "dot_tile.h"

namespace ssae::cpu {

// A tile of screen scores for TopKSelector::consume_screened: approximate
// pre-activations (without bias) of a row block against a latent tile, with the
// float32 operands that score them exactly. For every row r and latent c,
//   |scores[r * ld + c] - dot_tile_one(d, x + r * d, w + c * d)|
//       <= row_a[r] * col_a[c] + row_b[r] * col_b[c] + (col_reach[c] - bias[c]),
// with room left for the rounding of the test itself. screen_row and
// screen_col build such bounds for a bfloat16 screen (dot_tile_bf16).
struct ScreenTile {
  const float* scores;
  int64_t ld;
  const float* row_a;      // [rows]
  const float* row_b;      // [rows]
  const float* col_a;      // [cols]
  const float* col_b;      // [cols]
  const float* col_reach;  // [cols]: the latent's bias plus the additive part of its bound
  const float* x;          // [rows, d]
  const float* w;          // [cols, d]
  int64_t d;
};

// The bound's factors for a bfloat16 screen, from the norms to_bf16_row
// returns for a row or latent (and the latent's bias); +inf where a norm is too
// large (or not finite) for the bound to hold, so that such a row or latent
// always goes to the exact score. topk_encode.cpp derives them.
struct ScreenRow {
  float a, b;
};
struct ScreenCol {
  float a, b, reach;
};
ScreenRow screen_row(const Bf16Norms& norms, int64_t d);
ScreenCol screen_col(const Bf16Norms& norms, float bias, int64_t d);

template <typename A>  // score type: float, or double for float64 inputs
class TopKSelector {
 public:
  TopKSelector(int64_t rows, int64_t k);

  // scores[r * ld + c] is the pre-activation of row row0 + r and latent col0 + c,
  // before bias[c] is added. Tiles of one row must arrive with increasing col0.
  void consume(const A* scores, int64_t ld, int64_t row0, int64_t nrows,
               int64_t col0, int64_t ncols, const A* bias);

  // consume() for a screened tile (float selectors): a latent whose screen score
  // plus its bound cannot beat the row's running k-th best is skipped, as
  // consume() would skip its exact score; every other latent is scored exactly,
  // dot_tile_one(...) + bias[c], and kept or not as consume() decides. The
  // selection ends exactly as consume() of the exact tile would leave it.
  void consume_screened(const ScreenTile& tile, int64_t row0, int64_t nrows, int64_t col0, int64_t ncols,
                        const A* bias);

  // Writes values[r, j] = ReLU(score) (the score itself with relu = false) and
  // indices[r, j] for the k best latents of every row, in descending order of
  // score; ties go to the lower index and NaN ranks above every number (as
  // torch.topk does).
  template <typename T>
  void finish(T* values, int64_t* indices, bool relu = true);

  // Takes in the candidates of `other` (same rows and k, fed a disjoint set of
  // latents), so that finish() selects over both: latent ranges can be scanned
  // by separate selectors in parallel. Call finish() (not consume()) afterwards.
  void merge(const TopKSelector& other);

  int64_t k() const { return k_; }
  int64_t capacity() const { return cap_; }
  // Bytes of selection state held for `rows` rows: O(rows * k).
  static int64_t state_bytes(int64_t rows, int64_t k);

 private:
  void compact(int64_t row, int64_t keep);
  // Offers latent `latent` with `score` to a row that holds k candidates:
  // kept if it beats the k-th best (or is NaN). False once the row is settled
  // (a NaN k-th best, which no later latent can beat).
  bool offer(int64_t row, A score, int32_t latent);

  struct Candidate {
    A score;
    int32_t latent;
  };

  int64_t rows_, k_, cap_;
  std::vector<Candidate> cand_;  // [rows, cap]
  std::vector<int32_t> count_;   // candidates held per row
  std::vector<A> theta_;         // per-row k-th best score once count reached k
};

// The threshold encode's pass over a score tile before consume(): scores[r *
// ld + c] becomes its pre-activation, score + bias[c], where that exceeds
// threshold[c], and -inf otherwise (NaN included); counts[r] grows by the
// number kept. consume() then takes the tile with a bias of -0.0 (x + -0.0 is
// x for every x), so -inf marks the latents that did not pass.
template <typename A>
void keep_above(A* scores, int64_t ld, int64_t rows, int64_t cols, const A* bias, const A* threshold, int64_t* counts);

}  // namespace ssae::cpu
