// The online state of a tilted (TERM) reduction, shared by the CUDA kernels
// (csrc/kernels/cuda/tilted_loss.cu) and their host tests: the same
// arithmetic as the CPU kernels' TiltState (csrc/kernels/cpu/tilted_loss.cpp).
//
// anchor = the loss maximising t * l so far, count, and
// s = sum_i expm1(t (l_i - anchor)) (for t == 0: s = sum_i l_i), in float64:
// log_mean = log1p(s / count) stays exact for tiny |t| (terms near 0) and huge
// |t| (terms near -1) alike.
#pragma once

#include <cmath>
#include <cstdint>

#include "launch.h"

namespace ssae::cuda {

struct TiltState {
  double anchor, s;
  int64_t count;
};

SSAE_HD TiltState tilt_empty() { return TiltState{0.0, 0.0, 0}; }

SSAE_HD void tilt_add(TiltState& st, double loss, double t) {
  if (t == 0) {
    st.s += loss;
    ++st.count;
    return;
  }
  if (st.count == 0) {
    st.anchor = loss;
    st.s = 0;
    st.count = 1;
    return;
  }
  const double delta = t * (loss - st.anchor);
  if (delta > 0) {  // a new anchor: rescale, sum exp = f (c + s) with f = exp(-delta)
    st.s = exp(-delta) * st.s + double(st.count) * expm1(-delta);
    st.anchor = loss;
  } else {
    st.s += expm1(delta);  // NaN propagates here
  }
  ++st.count;
}

SSAE_HD void tilt_merge(TiltState& st, const TiltState& o, double t) {
  if (o.count == 0) return;
  if (t == 0) {
    st.s += o.s;
    st.count += o.count;
    return;
  }
  if (st.count == 0) {
    st = o;
    return;
  }
  const double delta = t * (o.anchor - st.anchor);
  if (delta > 0) {  // the other anchor wins: rescale ours
    st.s = exp(-delta) * st.s + double(st.count) * expm1(-delta) + o.s;
    st.anchor = o.anchor;
  } else {
    st.s += exp(delta) * o.s + double(o.count) * expm1(delta);
  }
  st.count += o.count;
}

// The op's outputs from a group's merged state (empty groups: zeros).
SSAE_HD void tilt_finish(const TiltState& st, double t, double* anchor, double* log_mean, int64_t* count) {
  *count = st.count;
  if (st.count == 0) {
    *anchor = 0;
    *log_mean = 0;
  } else if (t == 0) {
    *anchor = st.s / double(st.count);
    *log_mean = 0;
  } else {
    *anchor = st.anchor;
    *log_mean = log1p(st.s / double(st.count));
  }
}

}  // namespace ssae::cuda
