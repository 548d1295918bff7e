// Unit tests of the kernel cores (csrc/include/widetopo), plain C++ without torch or gtest:
//   g++ -std=c++20 -Icsrc/include csrc/tests/test_cores.cpp -o test_cores && ./test_cores
// Expected values are computed by hand (or from IEEE bit patterns written out in the test).
// Returns nonzero when any check fails.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "widetopo/elementwise.h"
#include "widetopo/radix.h"

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond)                                                          \
  do {                                                                       \
    ++g_checks;                                                              \
    if (!(cond)) {                                                           \
      ++g_failures;                                                          \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                        \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                                 \
  do {                                                                                        \
    ++g_checks;                                                                               \
    const double va_ = (a), vb_ = (b);                                                        \
    if (!(std::fabs(va_ - vb_) <= (tol))) {                                                   \
      ++g_failures;                                                                           \
      std::fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s = %.17g vs %s = %.17g\n", __FILE__, \
                   __LINE__, #a, va_, #b, vb_);                                               \
    }                                                                                         \
  } while (0)

using widetopo::core::order_key;
using widetopo::core::key_to_bits;

uint32_t bits32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
uint64_t bits64(double d) {
  uint64_t u;
  std::memcpy(&u, &d, 8);
  return u;
}

// Keys must be strictly increasing along a list of floats sorted ascending (distinct values).
template <typename U>
void check_strictly_increasing(const std::vector<U>& bits, const char* what) {
  for (size_t k = 1; k < bits.size(); ++k) {
    const U a = order_key<U>(bits[k - 1]), b = order_key<U>(bits[k]);
    ++g_checks;
    if (!(a < b)) {
      ++g_failures;
      std::fprintf(stderr, "order_key not increasing (%s) at position %zu\n", what, k);
    }
  }
}

void test_keys_float32() {
  const float denorm_min = std::numeric_limits<float>::denorm_min();
  const float fmax = std::numeric_limits<float>::max();
  const std::vector<float> vals = {-fmax, -1e30f, -2.0f, -1.0f, -1.1754944e-38f /* -min normal */,
                                   -denorm_min * 3, -denorm_min, 0.0f, denorm_min, denorm_min * 3,
                                   1.1754944e-38f, 0.5f, 1.0f, 1.0000001f, 2.0f, 1e30f, fmax};
  std::vector<uint32_t> bits;
  for (float v : vals) bits.push_back(bits32(v));
  check_strictly_increasing(bits, "float32");
  // -0.0 and +0.0 share one key, and it sits between -denorm_min and +denorm_min.
  CHECK(order_key<uint32_t>(0x80000000u) == order_key<uint32_t>(0x00000000u));
  // Hand-computed keys: +0 -> 0x80000000, 1.0f (0x3F800000) -> 0xBF800000,
  // -1.0f (0xBF800000) -> ~0xBF800000 = 0x407FFFFF, -denorm_min (0x80000001) -> 0x7FFFFFFE.
  CHECK(order_key<uint32_t>(0x00000000u) == 0x80000000u);
  CHECK(order_key<uint32_t>(0x3F800000u) == 0xBF800000u);
  CHECK(order_key<uint32_t>(0xBF800000u) == 0x407FFFFFu);
  CHECK(order_key<uint32_t>(0x80000001u) == 0x7FFFFFFEu);
  // Round trip (on the +0-folded image).
  for (float v : vals) CHECK(key_to_bits<uint32_t>(order_key<uint32_t>(bits32(v))) == bits32(v));
  CHECK(key_to_bits<uint32_t>(order_key<uint32_t>(0x80000000u)) == 0u);
}

void test_keys_float64() {
  const double dmin = std::numeric_limits<double>::denorm_min();
  const double dmax = std::numeric_limits<double>::max();
  const std::vector<double> vals = {-dmax, -3.5, -1.0, -dmin * 2, -dmin, 0.0, dmin, dmin * 2,
                                    2.2250738585072014e-308, 1e-300, 1.0, 1.0 + 2.220446049250313e-16,
                                    3.5, dmax};
  std::vector<uint64_t> bits;
  for (double v : vals) bits.push_back(bits64(v));
  check_strictly_increasing(bits, "float64");
  CHECK(order_key<uint64_t>(0x8000000000000000ull) == order_key<uint64_t>(0ull));
  CHECK(order_key<uint64_t>(0ull) == 0x8000000000000000ull);
  // 1.0 = 0x3FF0000000000000 -> 0xBFF0000000000000; -1.0 -> ~0xBFF0... = 0x400FFFFFFFFFFFFF.
  CHECK(order_key<uint64_t>(0x3FF0000000000000ull) == 0xBFF0000000000000ull);
  CHECK(order_key<uint64_t>(0xBFF0000000000000ull) == 0x400FFFFFFFFFFFFFull);
  for (double v : vals) CHECK(key_to_bits<uint64_t>(order_key<uint64_t>(bits64(v))) == bits64(v));
}

void test_keys_16bit() {
  // float16 bit patterns: -65504 = 0xFBFF, -1 = 0xBC00, -denorm_min = 0x8001, +0 = 0x0000,
  // denorm_min = 0x0001, largest subnormal = 0x03FF, min normal = 0x0400, 1 = 0x3C00,
  // 1 + 2^-10 = 0x3C01, 65504 = 0x7BFF.
  const std::vector<uint16_t> half = {0xFBFF, 0xBC00, 0x8400, 0x83FF, 0x8001, 0x0000, 0x0001,
                                      0x03FF, 0x0400, 0x3C00, 0x3C01, 0x7BFF};
  check_strictly_increasing(half, "float16");
  // bfloat16: -1 = 0xBF80, -denorm_min = 0x8001, +0, denorm_min = 0x0001, 1 = 0x3F80, 2 = 0x4000.
  const std::vector<uint16_t> bf16 = {0xFF7F, 0xBF80, 0x8001, 0x0000, 0x0001, 0x3F80, 0x4000, 0x7F7F};
  check_strictly_increasing(bf16, "bfloat16");
  CHECK(order_key<uint16_t>(0x8000) == order_key<uint16_t>(0x0000));
  CHECK(order_key<uint16_t>(0x0000) == 0x8000);
  CHECK(order_key<uint16_t>(0x3C00) == 0xBC00);
  CHECK(order_key<uint16_t>(0xBC00) == 0x43FF);
  for (uint16_t b : half) CHECK(key_to_bits<uint16_t>(order_key<uint16_t>(b)) == b);
}

void test_finite() {
  using widetopo::core::bits_finite;
  CHECK(bits_finite<uint32_t>(bits32(1.0f), 0x7F800000u));
  CHECK(bits_finite<uint32_t>(bits32(std::numeric_limits<float>::max()), 0x7F800000u));
  CHECK(bits_finite<uint32_t>(bits32(std::numeric_limits<float>::denorm_min()), 0x7F800000u));
  CHECK(!bits_finite<uint32_t>(bits32(std::numeric_limits<float>::infinity()), 0x7F800000u));
  CHECK(!bits_finite<uint32_t>(bits32(-std::numeric_limits<float>::infinity()), 0x7F800000u));
  CHECK(!bits_finite<uint32_t>(bits32(std::numeric_limits<float>::quiet_NaN()), 0x7F800000u));
  CHECK(!bits_finite<uint64_t>(bits64(std::numeric_limits<double>::infinity()), 0x7FF0000000000000ull));
  CHECK(bits_finite<uint64_t>(bits64(-1e308), 0x7FF0000000000000ull));
  CHECK(!bits_finite<uint16_t>(0x7C00, 0x7C00));  // half +inf
  CHECK(!bits_finite<uint16_t>(0xFE00, 0x7C00));  // half NaN
  CHECK(bits_finite<uint16_t>(0x7BFF, 0x7C00));   // half max
  CHECK(!bits_finite<uint16_t>(0x7FC0, 0x7F80));  // bfloat16 NaN
  CHECK(bits_finite<uint16_t>(0x7F7F, 0x7F80));   // bfloat16 max
}

void test_digits() {
  using widetopo::core::key_digit;
  using widetopo::core::key_matches_prefix;
  CHECK(key_digit<uint32_t>(0xABCD1234u, 24, 8) == 0xABu);
  CHECK(key_digit<uint32_t>(0xABCD1234u, 0, 8) == 0x34u);
  CHECK(key_digit<uint32_t>(0xABCD1234u, 21, 11) == (0xABCD1234u >> 21));
  CHECK(key_digit<uint32_t>(0xFFFFFFFFu, 0, 10) == 0x3FFu);
  CHECK(key_digit<uint16_t>(0xBEEF, 5, 11) == (0xBEEFu >> 5));
  CHECK(key_digit<uint64_t>(0x0123456789ABCDEFull, 60, 4) == 0x0u);
  CHECK(key_digit<uint64_t>(0x0123456789ABCDEFull, 52, 8) == 0x12u);
  CHECK(key_matches_prefix<uint32_t>(0xABCD1234u, 0xABC00000u, 20));
  CHECK(!key_matches_prefix<uint32_t>(0xABCD1234u, 0xABE00000u, 20));
  CHECK(key_matches_prefix<uint32_t>(0x12345678u, 0u, 32));  // nothing fixed yet
  CHECK(key_matches_prefix<uint64_t>(1ull, 0ull, 64));
  CHECK(key_matches_prefix<uint16_t>(0x8001, 0x8000, 1));

  // Digit plan with 11-bit digits: 32 bits -> [21,32) [10,21) [0,10); 16 -> [5,16) [0,5).
  using widetopo::core::radix_pass_shift;
  using widetopo::core::radix_passes;
  int w = 0;
  CHECK(radix_passes(32, 11) == 3);
  CHECK(radix_pass_shift(32, 11, 0, &w) == 21 && w == 11);
  CHECK(radix_pass_shift(32, 11, 1, &w) == 10 && w == 11);
  CHECK(radix_pass_shift(32, 11, 2, &w) == 0 && w == 10);
  CHECK(radix_passes(16, 11) == 2);
  CHECK(radix_pass_shift(16, 11, 1, &w) == 0 && w == 5);
  CHECK(radix_passes(64, 11) == 6);
  CHECK(radix_pass_shift(64, 11, 5, &w) == 0 && w == 9);
}

// An MSD select built only from the cores finds the k-th largest of a small list.
void test_select_with_cores() {
  const std::vector<float> vals = {0.5f, -2.0f, 3.0f, 0.0f, -0.0f, 3.0f, 1e-40f, -1e-40f, 7.0f, 0.5f};
  // Sorted descending: 7, 3, 3, 0.5, 0.5, 1e-40, 0, -0, -1e-40, -2.
  const std::vector<float> expect = {7.0f, 3.0f, 3.0f, 0.5f, 0.5f, 1e-40f, 0.0f, 0.0f, -1e-40f, -2.0f};
  for (int keep = 1; keep <= 10; ++keep) {
    uint32_t prefix = 0;
    int64_t remaining = keep;
    for (int p = 0; p < widetopo::core::radix_passes(32, 8); ++p) {
      int width = 0;
      const int shift = widetopo::core::radix_pass_shift(32, 8, p, &width);
      std::vector<int64_t> hist(size_t(1) << width, 0);
      for (float v : vals) {
        const uint32_t key = order_key<uint32_t>(bits32(v));
        if (widetopo::core::key_matches_prefix<uint32_t>(key, prefix, shift + width))
          ++hist[widetopo::core::key_digit<uint32_t>(key, shift, width)];
      }
      int64_t b = int64_t(hist.size()) - 1;
      for (; b > 0 && remaining > hist[b]; --b) remaining -= hist[b];
      prefix |= uint32_t(b) << shift;
    }
    float got;
    const uint32_t gb = key_to_bits<uint32_t>(prefix);
    std::memcpy(&got, &gb, 4);
    CHECK(got == expect[keep - 1]);
  }
}

void test_unit_index() {
  using widetopo::core::unit_index;
  // Shape (O=2, I=3, K=4): flat 0 -> (0,0); 5 -> (0,1); 12 -> (1,0); 23 -> (1,2).
  CHECK(unit_index(0, 3, 4).o == 0 && unit_index(0, 3, 4).i == 0);
  CHECK(unit_index(5, 3, 4).o == 0 && unit_index(5, 3, 4).i == 1);
  CHECK(unit_index(12, 3, 4).o == 1 && unit_index(12, 3, 4).i == 0);
  CHECK(unit_index(23, 3, 4).o == 1 && unit_index(23, 3, 4).i == 2);
  CHECK(unit_index(7, 7, 1).o == 1 && unit_index(7, 7, 1).i == 0);
}

void test_decay_factor() {
  using widetopo::core::decay_factor;
  CHECK(decay_factor(false, 3, 4, 0.5) == 0.0);
  CHECK(decay_factor(false, 3, 4, 0.0) == 0.0);  // pruned stays 0 even at density 1
  CHECK(decay_factor(true, 3, 4, 0.0) == 1.0);
  CHECK_NEAR(decay_factor(true, 2, 8, 0.5), 0.25, 1e-15);          // (1/16)^0.5
  CHECK_NEAR(decay_factor(true, 10, 10, 1.0), 0.01, 1e-15);        // 1/100
  CHECK_NEAR(decay_factor(true, 4, 2, 0.2), std::pow(8.0, -0.2), 1e-15);
  CHECK(decay_factor(true, 0, 5, 0.7) == 1.0);  // max(0 * 5, 1) = 1
  CHECK(decay_factor(true, 1, 1, 3.0) == 1.0);

  using widetopo::core::decay_unit_factor;
  CHECK_NEAR(decay_unit_factor(4, 0.5), 0.5, 1e-15);
  CHECK(decay_unit_factor(0, 0.5) == 1.0);  // max(0, 1) = 1
  CHECK(decay_unit_factor(7, 0.0) == 1.0);
  // Kept entries: the per-unit parts multiply to the full factor.
  CHECK_NEAR(decay_unit_factor(3, 0.3) * decay_unit_factor(5, 0.3), decay_factor(true, 3, 5, 0.3), 1e-15);
  CHECK_NEAR(decay_unit_factor(128, 0.4) * decay_unit_factor(9, 0.4), decay_factor(true, 128, 9, 0.4), 1e-15);
}

void test_restoration() {
  using widetopo::core::restoration_score;
  using widetopo::core::restoration_score_rank1;
  CHECK(restoration_score(true, 0.1f, 0.9f, 5.0f, 1e-5f) == 2.0f);
  CHECK_NEAR(restoration_score(false, 0.25f, 0.5f, 0.0f, 1e-5f), 0.375, 1e-7);  // 0.75 * 0.5
  CHECK_NEAR(restoration_score(false, 0.0f, 0.0f, 2.0f, 1e-5f), 1.0 + 2e-5, 1e-7);
  CHECK_NEAR(restoration_score(false, 1.0f, 0.5f, -1.0f, 0.5f), -0.5, 1e-7);
  CHECK(restoration_score_rank1(true) == 2.0f);
  CHECK(restoration_score_rank1(false) == 1.0f);
}

void test_accumulate_and_masks() {
  using widetopo::core::accumulate_score;
  using widetopo::core::apply_mask;
  using widetopo::core::masked_square;
  CHECK(accumulate_score<float>(1.0f, 2.0f, -3.0f, true, true) == 7.0f);    // 1 + |-6|
  CHECK(accumulate_score<float>(1.0f, 2.0f, -3.0f, true, false) == -5.0f);  // 1 - 6
  CHECK(accumulate_score<float>(1.0f, 2.0f, -3.0f, false, true) == 1.0f);
  CHECK(accumulate_score<float>(1.0f, 2.0f, -3.0f, false, false) == 1.0f);
  CHECK(accumulate_score<double>(0.5, -0.25, -4.0, true, false) == 1.5);
  CHECK(accumulate_score<double>(0.0, -0.25, 4.0, true, true) == 1.0);
  CHECK(masked_square<double>(-3.0, true) == 9.0);
  CHECK(masked_square<double>(-3.0, false) == 0.0);
  CHECK(masked_square<float>(0.5f, true) == 0.25f);
  CHECK(apply_mask<float>(3.5f, true) == 3.5f);
  CHECK(apply_mask<float>(3.5f, false) == 0.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(apply_mask<float>(nan, false) == 0.0f);  // selection, not multiplication
  CHECK(apply_mask<float>(inf, false) == 0.0f);
  CHECK(std::isnan(apply_mask<float>(nan, true)));
  CHECK(apply_mask<int64_t>(-7, false) == 0 && apply_mask<int64_t>(-7, true) == -7);
  CHECK(apply_mask<uint16_t>(0xFFFF, false) == 0);
}

}  // namespace


// The 32-bit unit index of the GPU kernels agrees with the 64-bit one (hand-picked shapes and
// every flat index of small ones, plus the last index below 2^32).
void test_unit_index32() {
  using widetopo::core::unit_index;
  using widetopo::core::unit_index32;
  using widetopo::core::unit_index_of;
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 4, 1}, {5, 3, 9}, {7, 1, 25}, {2, 6, 49}};
  for (const auto& d : shapes) {
    for (int64_t e = 0; e < d[0] * d[1] * d[2]; ++e) {
      const auto a = unit_index(e, d[1], d[2]);
      const auto b = unit_index32(static_cast<uint32_t>(e), static_cast<uint32_t>(d[1]), static_cast<uint32_t>(d[2]));
      CHECK(a.o == b.o && a.i == b.i);
    }
  }
  // O = 65537, I = 65535, K = 1: O * I * K = 2^32 - 1.
  const int64_t numel = 65537LL * 65535LL;
  const auto big = unit_index_of(numel - 1, numel, 65535, 1);
  CHECK(big.o == 65536 && big.i == 65534);
  const auto huge = unit_index_of(numel, numel + 1, 65535, 1);  // 64-bit path
  CHECK(huge.o == 65537 && huge.i == 0);
}

// Window bins of the CPU threshold: the smallest shift that leaves at most 2^bits bins.
void test_window_bins() {
  using widetopo::core::window_bin;
  using widetopo::core::window_bins;
  using widetopo::core::window_shift;
  CHECK(window_shift<uint32_t>(100u, 100u + 4095u, 12) == 0 && window_bins<uint32_t>(100u, 4195u, 0) == 4096);
  CHECK(window_shift<uint32_t>(100u, 100u + 4096u, 12) == 1);             // 4097 keys: pairs
  CHECK(window_shift<uint32_t>(0u, 0xFFFFFFFFu, 12) == 20);               // the full range
  CHECK(window_shift<uint32_t>(0u, 0xFFFFFFFFu, 16) == 16);
  CHECK(window_shift<uint64_t>(0ull, ~0ull, 12) == 52);
  CHECK(window_shift<uint16_t>(0, 0xFFFF, 16) == 0);
  CHECK(window_bin<uint32_t>(0x80001234u, 0x80000000u, 4) == 0x123);
  CHECK(widetopo::core::in_window<uint32_t>(5u, 3u, 2u) && !widetopo::core::in_window<uint32_t>(2u, 3u, 2u));
  CHECK(!widetopo::core::in_window<uint32_t>(6u, 3u, 2u));
}

// order_key on 16 lanes at once (the CPU threshold's form) equals the scalar key.
void test_order_key_lanes() {
  typedef uint32_t V32 __attribute__((vector_size(64)));
  typedef uint16_t V16 __attribute__((vector_size(32)));
  uint32_t in32[16];
  uint16_t in16[16];
  for (int k = 0; k < 16; ++k) {
    in32[k] = static_cast<uint32_t>(k) * 0x11111111u;
    in16[k] = static_cast<uint16_t>(k * 0x1111);
  }
  in32[3] = 0x80000000u;  // -0.0
  in16[2] = 0x8000;
  V32 v32;
  V16 v16;
  std::memcpy(&v32, in32, sizeof v32);
  std::memcpy(&v16, in16, sizeof v16);
  const V32 k32 = widetopo::core::order_key_lanes<uint32_t, V32>(v32);
  const V16 k16 = widetopo::core::order_key_lanes<uint16_t, V16>(v16);
  for (int k = 0; k < 16; ++k) {
    CHECK(k32[k] == order_key<uint32_t>(in32[k]));
    CHECK(k16[k] == order_key<uint16_t>(in16[k]));
  }
}

// The restoration score rounds each product and the sum separately (no fused multiply-add):
// values chosen so that one fused rounding would give a different float.
void test_restoration_rounding() {
  const float o = 0.3f, i = 0.7f, noise = 1.0f / 3.0f, scale = 0.1f;
  const volatile float a = 1.0f - o, b = 1.0f - i, n = scale * noise;
  const volatile float ab = a * b;
  const float two_roundings = ab + n;
  CHECK(widetopo::core::restoration_score(false, o, i, noise, scale) == two_roundings);
}

int main() {
  test_keys_float32();
  test_keys_float64();
  test_keys_16bit();
  test_finite();
  test_digits();
  test_select_with_cores();
  test_unit_index();
  test_decay_factor();
  test_restoration();
  test_accumulate_and_masks();
  test_unit_index32();
  test_order_key_lanes();
  test_window_bins();
  test_restoration_rounding();
  std::printf("test_cores: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
