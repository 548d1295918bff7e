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

// ------------------------------------------------------------------ rounding of every product
// nvcc contracts a * b + c into one fused multiply-add by default (one rounding instead of
// two), host compilers do not (setup.py also passes -ffp-contract=off), so the same formula
// would round differently on the two backends. The formulas below use these helpers, which in
// device code are the explicitly rounded intrinsics that nvcc never contracts.
WIDETOPO_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
WIDETOPO_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
WIDETOPO_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
WIDETOPO_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
WIDETOPO_HD double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

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

// unit_index for tensors of fewer than 2^32 elements, with 32-bit divisions (a 64-bit division
// is a long instruction sequence on GPUs, a 32-bit one a few instructions). Requires
// flat < O * I * K <= 2^32 - 1.
WIDETOPO_HD UnitIndex unit_index32(uint32_t flat, uint32_t in_units, uint32_t kernel) {
  UnitIndex u;
  u.o = static_cast<int64_t>(flat / (in_units * kernel));
  u.i = static_cast<int64_t>((flat / kernel) % in_units);
  return u;
}

// The kernels' choice: 32-bit divisions when the tensor is small enough (a per-tensor, so
// per-block uniform, decision).
WIDETOPO_HD UnitIndex unit_index_of(int64_t flat, int64_t numel, int64_t in_units, int64_t kernel) {
  if (numel <= static_cast<int64_t>(0xFFFFFFFFu)) {
    return unit_index32(static_cast<uint32_t>(flat), static_cast<uint32_t>(in_units), static_cast<uint32_t>(kernel));
  }
  return unit_index(flat, in_units, kernel);
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
  // Two products and a sum, each rounded to float32 (no fused multiply-add on any backend).
  return add_rn(mul_rn(sub_rn(1.0f, out_density), sub_rn(1.0f, in_density)), mul_rn(noise_scale, noise));
}

// Restoration score of an entry of a rank-1 tensor (biases, norm weights).
WIDETOPO_HD float restoration_score_rank1(bool kept) { return kept ? 2.0f : 1.0f; }

// One step of score accumulation: s + |a * b * m| (absolute) or s + a * b * m (signed).
// `T` is the math type (float for float/half/bfloat16 storage, double for double).
template <typename T>
WIDETOPO_HD T accumulate_score(T s, T a, T b, bool kept, bool absolute) {
  T p = kept ? mul_rn(a, b) : T(0);
  if (absolute && p < T(0)) {
    p = -p;
  }
  return add_rn(s, p);
}

// Contribution of one entry to the masked squared norm  sum (g * m)^2.
template <typename T>
WIDETOPO_HD T masked_square(T g, bool kept) {
  return kept ? mul_rn(g, g) : T(0);
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
