// Fused TopK encode, CPU: running per-row top-k over tiles of pre-activations.
//
// The caller computes pre-activation tiles (a GEMM of a row block against a
// block of latents, in cache-sized pieces) and hands each tile to consume() in
// increasing latent order; only O(rows * k) state is kept between tiles, so the
// full rows x latents matrix never exists.
#pragma once

#include <cstdint>
#include <vector>

namespace ssae::cpu {

template <typename A>  // score type: float, or double for float64 inputs
class TopKSelector {
 public:
  TopKSelector(int64_t rows, int64_t k);

  // scores[r * ld + c] is the pre-activation of row row0 + r and latent col0 + c,
  // before bias[c] is added. Tiles of one row must arrive with increasing col0.
  void consume(const A* scores, int64_t ld, int64_t row0, int64_t nrows,
               int64_t col0, int64_t ncols, const A* bias);

  // Writes values[r, j] = ReLU(score) and indices[r, j] for the k best latents of
  // every row, in descending order of score; ties go to the lower index and NaN
  // ranks above every number (as torch.topk does).
  template <typename T>
  void finish(T* values, int64_t* indices);

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

  struct Candidate {
    A score;
    int32_t latent;
  };

  int64_t rows_, k_, cap_;
  std::vector<Candidate> cand_;  // [rows, cap]
  std::vector<int32_t> count_;   // candidates held per row
  std::vector<A> theta_;         // per-row k-th best score once count reached k
};

}  // namespace ssae::cpu
