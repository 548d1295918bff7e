// Per-element math of the widetopo ops, shared by the CPU and CUDA kernels.
//
// Layout convention for every tensor of rank >= 2: dim 0 = output units (O), dim 1 = input
// units (I), the remaining dims flattened into the kernel extent (K). A row-major flat index
// e maps to o = e / (I*K), i = (e / K) % I.
#pragma once

#include <cmath>
#include <cstdint>

#include "widetopo/macros.h"

namespace widetopo {
namespace core {

struct UnitIndex {
  int64_t o;
  int64_t i;
};

WIDETOPO_HD UnitIndex unit_index(int64_t flat, int64_t in_units, int64_t kernel) {
  UnitIndex u;
  u.o = flat / (in_units * kernel);
  u.i = (flat / kernel) % in_units;
  return u;
}

// Density-aware decay factor (docs/design.md §2.1):  ( m / max(out_deg * in_deg, 1) ) ^ exponent,
// exponent = c / gamma with c = -log10(density). Pruned entries get 0.
WIDETOPO_HD double decay_factor(bool kept, int64_t out_deg, int64_t in_deg, double exponent) {
  if (!kept) {
    return 0.0;
  }
  double denom = static_cast<double>(out_deg) * static_cast<double>(in_deg);
  if (denom < 1.0) {
    denom = 1.0;
  }
  if (exponent == 0.0) {
    return 1.0;
  }
  return pow(denom, -exponent);
}

// Restoration score of one entry (docs/design.md §2.3). Kept entries score 2 (always stay);
// pruned entries of rank >= 2 tensors score (1 - out_density)(1 - in_density) + scale * noise,
// so connections between the sparsest units regrow first.
WIDETOPO_HD float restoration_score(bool kept, float out_density, float in_density, float noise,
                                    float noise_scale) {
  if (kept) {
    return 2.0f;
  }
  return (1.0f - out_density) * (1.0f - in_density) + noise_scale * noise;
}

// Restoration score of an entry of a rank-1 tensor (biases, norm weights).
WIDETOPO_HD float restoration_score_rank1(bool kept) { return kept ? 2.0f : 1.0f; }

// One step of score accumulation: s + |a * b * m| (absolute) or s + a * b * m (signed).
// `T` is the math type (float for float/half/bfloat16 storage, double for double).
template <typename T>
WIDETOPO_HD T accumulate_score(T s, T a, T b, bool kept, bool absolute) {
  T p = kept ? a * b : T(0);
  if (absolute && p < T(0)) {
    p = -p;
  }
  return s + p;
}

// Contribution of one entry to the masked squared norm  sum (g * m)^2.
template <typename T>
WIDETOPO_HD T masked_square(T g, bool kept) {
  return kept ? g * g : T(0);
}

// Mask application by selection, not multiplication: a pruned entry becomes exactly 0
// even when it held inf or NaN.
template <typename T>
WIDETOPO_HD T apply_mask(T v, bool kept) {
  return kept ? v : T(0);
}

}  // namespace core
}  // namespace widetopo

namespace widetopo {
namespace core {

// Per-unit part of the decay factor: max(deg, 1)^(-exponent). For a kept entry both degrees
// are >= 1, so decay_factor(true, out_deg, in_deg, e) equals
// decay_unit_factor(out_deg, e) * decay_unit_factor(in_deg, e) (up to rounding); kernels use
// this to call pow once per unit instead of once per element.
WIDETOPO_HD double decay_unit_factor(int64_t deg, double exponent) {
  if (exponent == 0.0) {
    return 1.0;
  }
  double d = static_cast<double>(deg);
  if (d < 1.0) {
    d = 1.0;
  }
  return pow(d, -exponent);
}

}  // namespace core
}  // namespace widetopo
