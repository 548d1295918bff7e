// Order-preserving integer keys of IEEE floats, for radix / histogram selection.
//
// For a float with raw bits u (unsigned, same width), key(u) is an unsigned integer with
// key(a) < key(b)  <=>  a < b  for all finite a, b. Negative zero is folded onto +0 so
// that -0.0 and +0.0 tie, as they compare equal. NaN/inf are rejected before keys are
// built, so their keys never matter.
#pragma once

#include <cstdint>

#include "widetopo/macros.h"

namespace widetopo {
namespace core {

// Branch-free (a compare and a select, which compilers turn into vector blends): with
// n = all ones for a negative float and 0 otherwise, key = bits ^ (n | sign) is ~bits for
// negatives and bits | sign for positives; -0.0 (bits == sign) is first mapped to +0.0.
// `V` is U itself, or (CPU kernel) a GCC vector of U lanes: one text for every backend.
template <typename U, typename V>
WIDETOPO_HD V order_key_lanes(V bits) {
  constexpr int kTop = int(sizeof(U) * 8) - 1;
  constexpr U sign = U(U(1) << kTop);
  const V b = (bits == sign) ? V{} : bits;   // -0.0 -> +0.0
  const V negative = V(V{} - V(b >> kTop));  // all ones when the sign bit is set
  return V(b ^ V(negative | sign));
}

template <typename U>
WIDETOPO_HD U order_key(U bits) {
  return order_key_lanes<U, U>(bits);
}

// Inverse of order_key (for the +0-folded image): recovers the raw float bits.
template <typename U>
WIDETOPO_HD U key_to_bits(U key) {
  constexpr U sign = U(1) << (sizeof(U) * 8 - 1);
  return (key & sign) ? U(key & ~sign) : U(~key);
}

// The `nbits`-wide digit of `key` starting at bit `shift` (shift counted from the LSB).
template <typename U>
WIDETOPO_HD uint32_t key_digit(U key, int shift, int nbits) {
  return static_cast<uint32_t>((key >> shift) & ((U(1) << nbits) - U(1)));
}

// True when `key` agrees with `prefix` on every bit at or above `shift`
// (the digits already fixed by earlier passes of a most-significant-digit-first select).
template <typename U>
WIDETOPO_HD bool key_matches_prefix(U key, U prefix, int shift) {
  if (shift >= static_cast<int>(sizeof(U) * 8)) {
    return true;
  }
  return (key >> shift) == (prefix >> shift);
}

}  // namespace core
}  // namespace widetopo

namespace widetopo {
namespace core {

// True when the IEEE float with raw bits `bits` is finite (not inf, not NaN);
// `exponent_mask` has exactly the exponent bits set (0x7F800000 for float32,
// 0x7FF0000000000000 for float64, 0x7C00 for float16, 0x7F80 for bfloat16).
template <typename U>
WIDETOPO_HD bool bits_finite(U bits, U exponent_mask) {
  return (bits & exponent_mask) != exponent_mask;
}

// Digit plan of a most-significant-digit-first select over W-bit keys with digits of at most
// `max_bits` bits: pass p covers the bits [shift, shift + width) where the passes walk down
// from the top. Returns the shift of pass p and writes its width; the number of passes is
// radix_passes(W, max_bits).
WIDETOPO_HD int radix_passes(int key_bits, int max_bits) {
  return (key_bits + max_bits - 1) / max_bits;
}
WIDETOPO_HD int radix_pass_shift(int key_bits, int max_bits, int pass, int* width) {
  int hi = key_bits - pass * max_bits;  // exclusive upper bit of this pass
  int w = hi < max_bits ? hi : max_bits;
  *width = w;
  return hi - w;
}

}  // namespace core
}  // namespace widetopo

namespace widetopo {
namespace core {

// ------------------------------------------------------------------ window select (CPU kernel)
// A window [lo, hi] of keys is split into at most 2^bits bins of 2^shift keys each:
// bin(key) = (key - lo) >> shift. window_shift returns the smallest shift with
// (hi - lo) >> shift < 2^bits, so one histogram pass narrows any window by a factor 2^bits
// and a window of at most 2^bits keys resolves to single keys.
template <typename U>
WIDETOPO_HD int window_shift(U lo, U hi, int bits = 16) {
  const U range = U(hi - lo);
  const uint64_t top = (uint64_t(1) << bits) - 1;
  int shift = 0;
  while (static_cast<uint64_t>(range >> shift) > top) ++shift;
  return shift;
}

// Number of bins of the window [lo, hi] at `shift`.
template <typename U>
WIDETOPO_HD int64_t window_bins(U lo, U hi, int shift) {
  return static_cast<int64_t>(U(hi - lo) >> shift) + 1;
}

// True when lo <= key <= hi, as one unsigned compare (wraps for key < lo).
template <typename U>
WIDETOPO_HD bool in_window(U key, U lo, U range) {
  return U(key - lo) <= range;
}

template <typename U>
WIDETOPO_HD int64_t window_bin(U key, U lo, int shift) {
  return static_cast<int64_t>(U(key - lo) >> shift);
}

}  // namespace core
}  // namespace widetopo
