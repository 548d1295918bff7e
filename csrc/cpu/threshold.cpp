// CPU kernel of widetopo::global_threshold: keep the `keep` highest scores over a list of
// tensors and write the bool masks in place.
//
// Window select on order-preserving integer keys of the floats (widetopo/radix.h). The cut c
// (the key of the keep-th largest score) is known to lie in [LO, HI] (at first every key).
//   1. Sample: for N >= kSampleMin, kSample keys at fixed pseudo-random positions (one per
//      stratum of the flat index space) are partially sorted (nth_element) to guess a window
//      [lo, hi] around c, wide enough (4.5 standard deviations of the sample rank) that c
//      almost always falls inside, and a "tie key" t when the sample holds many copies of the
//      key at the guessed cut (e.g. all pruned weights score 0).
//   2. Counting pass (every score read once, 16 keys per step, branch-free, AVX2 when the CPU
//      has it): #(key > hi); #(key == t) per block of kBlock elements; and, only for the rare
//      keys inside the window, a histogram of at most 2^16 bins (key - lo) >> shift. The
//      finite check is fused into the first counting pass.
//   3. The bin holding the keep-th largest key: if it is a single key, c is found; if it holds
//      at most kGatherLimit keys, the writing pass gathers them; otherwise the bin becomes the
//      next window (each pass narrows by 2^16, so float32 needs at most two). If the sample
//      missed (c outside [lo, hi]), [LO, HI] shrinks to the side that holds c and the next
//      window is all of it - slower, never wrong.
//   4. Writing pass (every score read once more, masks written 16 at a time): key > c, or
//      key >= c when every tie is kept; gathered candidates are sorted by (key descending,
//      flat index ascending) and the first `remaining` kept; a partial run of ties is kept in
//      (tensor, flat index) order from the per-block tie counts (prefix sums), so only the one
//      block where the kept ties end is written element by element.
// Typical cost: the sample (64 K random reads), two streaming reads of the scores and one
// write of the masks - also with heavy ties at the cut, whose key the sample reveals.
// Extra memory: the 2^16-bin histograms (one per thread), the sample, at most kGatherLimit
// candidates and three counters per block - all allocated as torch tensors so memory
// profilers see them; no concatenated copy, no sort of the scores. Non-contiguous score
// tensors are read through contiguous copies.
//
// Ties at the cut ("exact" mode) go to the entries first in (tensor index, row-major flat
// index) order; the result does not depend on the number of threads, on the sample (which
// only decides how many passes are needed) or on the instruction set.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "widetopo/radix.h"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define WIDETOPO_X86_DISPATCH 1
#define WIDETOPO_ALWAYS_INLINE inline __attribute__((always_inline))
#define WIDETOPO_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define WIDETOPO_X86_DISPATCH 0
#define WIDETOPO_ALWAYS_INLINE inline
#endif

namespace widetopo {
namespace cpu {
namespace {

constexpr int64_t kBlock = 1 << 16;        // elements per block (tie counts, parallel tasks)
constexpr int kLanes = 16;                 // keys per step of the streaming loops
constexpr int64_t kGatherLimit = 1 << 14;  // candidates the writing pass may gather
constexpr int kWindowBits = 12;            // 2^12 histogram bins: 33 KB per thread, cache-resident
constexpr int64_t kSampleMin = 1 << 21;    // sample only lists at least this long
constexpr int64_t kSampleDefault = 1 << 16;  // sampled keys
constexpr int64_t kHeavyTie = 64;          // sample copies of the cut key that make it the tie key
constexpr double kWindowSigmas = 4.5;      // half-width of the window, in sample-rank deviations

// -------------------------------------------------------------------------- instruction set
// The streaming loops are compiled twice, for the x86-64 baseline and for AVX2, and the AVX2
// version runs when the CPU has it (WIDETOPO_CPU_ISA=baseline forces the baseline: same
// results, for checks and measurements).
bool use_avx2() {
#if WIDETOPO_X86_DISPATCH
  const char* env = std::getenv("WIDETOPO_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "baseline") == 0) return false;
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

// Half-width of the sampled window in sample-rank deviations; WIDETOPO_THRESHOLD_WINDOW_SIGMAS
// overrides it (tests set 0 to make the window miss and exercise the fallback passes).
// Sampled keys (WIDETOPO_THRESHOLD_SAMPLE_LOG2 overrides the default 2^16, for measurements).
int64_t sample_size() {
  const char* env = std::getenv("WIDETOPO_THRESHOLD_SAMPLE_LOG2");
  const int bits = env != nullptr ? std::clamp(std::atoi(env), 8, 20) : 16;
  return env != nullptr ? (int64_t(1) << bits) : kSampleDefault;
}

double window_sigmas() {
  const char* env = std::getenv("WIDETOPO_THRESHOLD_WINDOW_SIGMAS");
  return env != nullptr ? std::atof(env) : kWindowSigmas;
}

// ----------------------------------------------------------------------------- counting pass
template <typename U>
struct Window {
  U lo, hi;      // histogram keys lo <= key <= hi (except `tie`), bin = (key - lo) >> shift
  int shift;
  U tie;         // counted per block instead of in the histogram (when the pass has a tie key)
  U exponent;    // exponent bits of the dtype, for the finite check
};

struct SegmentCount {
  int64_t above = 0;  // key > hi
  int64_t ties = 0;   // key == tie
  bool bad = false;   // a non-finite score
};

// Keys are processed in steps of kStep (in L1): a branch-free loop that compilers vectorize
// computes the counts and a byte flag per key; keys inside the window are then found by
// testing the flags 16 at a time (two 8-byte words).
constexpr int64_t kStep = 256;

// The 16 byte flags (0 / 1) at f as a 16-bit mask, bit k = f[k]: per 8 bytes, one multiply
// gathers the low bit of every byte into the top byte.
WIDETOPO_ALWAYS_INLINE uint32_t flag_bits16(const uint8_t* f) {
  uint64_t a, b;
  std::memcpy(&a, f, 8);
  std::memcpy(&b, f + 8, 8);
  if ((a | b) == 0) return 0;
  constexpr uint64_t kGather = 0x0102040810204080ull;
  return static_cast<uint32_t>((a * kGather) >> 56) | (static_cast<uint32_t>((b * kGather) >> 56) << 8);
}

// One segment (n <= kBlock keys of one tensor). Only the lanes flagged inside the window are
// visited (set bits of the group's 16-bit flag mask), so a group costs two loads and a test
// unless it holds a window key.
template <typename U, bool kCheck, bool kTie, bool kHist>
WIDETOPO_ALWAYS_INLINE void count_body(const U* p, int64_t n, const Window<U>& w, int64_t* hist,
                                       int64_t spare, SegmentCount& out) {
  (void)spare;  // histogram slots past the bins (unused by this loop)
  const U hi = w.hi, lo = w.lo, range = U(w.hi - w.lo), tie = w.tie, ex = w.exponent;
  const int shift = w.shift;
  alignas(64) uint8_t flag[kStep + kLanes];
  int64_t above = 0, eq = 0;
  uint32_t bad = 0;
  for (int64_t s0 = 0; s0 < n; s0 += kStep) {
    const int64_t len = std::min<int64_t>(kStep, n - s0);
    if (len <= 0) break;
    const U* q = p + s0;
    uint32_t a = 0, t = 0, z = 0;
    for (int64_t e = 0; e < len; ++e) {
      const U bits = q[e];
      const U key = core::order_key<U>(bits);
      if constexpr (kCheck) z |= uint32_t((bits & ex) == ex);
      a += uint32_t(key > hi);
      if constexpr (kTie) t += uint32_t(key == tie);
      if constexpr (kHist) {
        bool in = core::in_window<U>(key, lo, range);
        if constexpr (kTie) in = in && key != tie;
        flag[e] = uint8_t(in);
      }
    }
    above += a;
    eq += t;
    bad |= z;
    if constexpr (kHist) {
      std::memset(flag + len, 0, sizeof(flag) - static_cast<size_t>(len));  // 0 < len <= kStep
      for (int64_t g = 0; g < len; g += kLanes) {
        for (uint32_t bits = flag_bits16(flag + g); bits != 0; bits &= bits - 1) {
          const U key = core::order_key<U>(q[g + __builtin_ctz(bits)]);
          ++hist[core::window_bin<U>(key, lo, shift)];
        }
      }
    }
  }
  out.above += above;
  out.ties += eq;
  out.bad = out.bad || bad != 0;
}

template <typename U>
using CountFn = void (*)(const U*, int64_t, const Window<U>&, int64_t*, int64_t, SegmentCount&);

template <typename U, bool C, bool T, bool H>
void count_baseline(const U* p, int64_t n, const Window<U>& w, int64_t* h, int64_t s, SegmentCount& o) {
  count_body<U, C, T, H>(p, n, w, h, s, o);
}
#if WIDETOPO_X86_DISPATCH
template <typename U, bool C, bool T, bool H>
WIDETOPO_TARGET_AVX2 void count_avx2(const U* p, int64_t n, const Window<U>& w, int64_t* h, int64_t s,
                                     SegmentCount& o) {
  count_body<U, C, T, H>(p, n, w, h, s, o);
}
#endif

template <typename U, bool C, bool T, bool H>
CountFn<U> count_variant(bool avx2) {
#if WIDETOPO_X86_DISPATCH
  if (avx2) return &count_avx2<U, C, T, H>;
#endif
  (void)avx2;
  return &count_baseline<U, C, T, H>;
}

template <typename U>
CountFn<U> count_fn(bool check, bool tie, bool hist, bool avx2) {
  switch ((check ? 4 : 0) | (tie ? 2 : 0) | (hist ? 1 : 0)) {
    case 0: return count_variant<U, false, false, false>(avx2);
    case 1: return count_variant<U, false, false, true>(avx2);
    case 2: return count_variant<U, false, true, false>(avx2);
    case 3: return count_variant<U, false, true, true>(avx2);
    case 4: return count_variant<U, true, false, false>(avx2);
    case 5: return count_variant<U, true, false, true>(avx2);
    case 6: return count_variant<U, true, true, false>(avx2);
    default: return count_variant<U, true, true, true>(avx2);
  }
}

// ------------------------------------------------------------------------------ writing pass
// m = key > gt for every key of the segment.
template <typename U>
WIDETOPO_ALWAYS_INLINE void write_body(const U* p, bool* m, int64_t n, U gt) {
  for (int64_t e = 0; e < n; ++e) m[e] = core::order_key<U>(p[e]) > gt;
}

// m = key > hi, and the keys lo <= key <= hi are candidates: for each, calls
// sink(local index, key) (rare: the writing pass of the gather case).
template <typename U, typename Sink>
WIDETOPO_ALWAYS_INLINE void write_gather_body(const U* p, bool* m, int64_t n, U lo, U hi, const Sink& sink) {
  const U range = U(hi - lo);
  alignas(64) uint8_t flag[kStep + kLanes];
  for (int64_t s0 = 0; s0 < n; s0 += kStep) {
    const int64_t len = std::min<int64_t>(kStep, n - s0);
    if (len <= 0) break;
    const U* q = p + s0;
    bool* mq = m + s0;
    for (int64_t e = 0; e < len; ++e) {
      const U key = core::order_key<U>(q[e]);
      mq[e] = key > hi;
      flag[e] = uint8_t(core::in_window<U>(key, lo, range));
    }
    std::memset(flag + len, 0, sizeof(flag) - static_cast<size_t>(len));  // 0 < len <= kStep
    for (int64_t g = 0; g < len; g += kLanes) {
      for (uint32_t bits = flag_bits16(flag + g); bits != 0; bits &= bits - 1) {
        const int64_t k = g + __builtin_ctz(bits);
        sink(s0 + k, core::order_key<U>(q[k]));
      }
    }
  }
}

template <typename U>
using WriteFn = void (*)(const U*, bool*, int64_t, U);
template <typename U>
void write_baseline(const U* p, bool* m, int64_t n, U gt) {
  write_body<U>(p, m, n, gt);
}
#if WIDETOPO_X86_DISPATCH
template <typename U>
WIDETOPO_TARGET_AVX2 void write_avx2(const U* p, bool* m, int64_t n, U gt) {
  write_body<U>(p, m, n, gt);
}
#endif
template <typename U>
WriteFn<U> write_fn(bool avx2) {
#if WIDETOPO_X86_DISPATCH
  if (avx2) return &write_avx2<U>;
#endif
  (void)avx2;
  return &write_baseline<U>;
}

// Candidate sink of the gather case: (key, flat index) pairs in a preallocated buffer.
struct Candidates {
  int64_t* pairs;
  int64_t capacity;
  std::atomic<int64_t> count{0};
  void add(uint64_t key, int64_t index) {
    const int64_t s = count.fetch_add(1, std::memory_order_relaxed);
    if (s < capacity) {
      pairs[2 * s] = static_cast<int64_t>(key);
      pairs[2 * s + 1] = index;
    }
  }
};

template <typename U>
using GatherFn = void (*)(const U*, bool*, int64_t, U, U, int64_t, Candidates*);
template <typename U>
void gather_baseline(const U* p, bool* m, int64_t n, U lo, U hi, int64_t base, Candidates* c) {
  write_gather_body<U>(p, m, n, lo, hi, [&](int64_t e, U key) { c->add(key, base + e); });
}
#if WIDETOPO_X86_DISPATCH
template <typename U>
WIDETOPO_TARGET_AVX2 void gather_avx2(const U* p, bool* m, int64_t n, U lo, U hi, int64_t base,
                                      Candidates* c) {
  write_gather_body<U>(p, m, n, lo, hi, [&](int64_t e, U key) { c->add(key, base + e); });
}
#endif
template <typename U>
GatherFn<U> gather_fn(bool avx2) {
#if WIDETOPO_X86_DISPATCH
  if (avx2) return &gather_avx2<U>;
#endif
  (void)avx2;
  return &gather_baseline<U>;
}

// ------------------------------------------------------------------------------- the select
template <typename U>
double key_to_double(U key, at::ScalarType st) {
  const U bits = core::key_to_bits<U>(key);
  if constexpr (sizeof(U) == 8) {
    double v;
    std::memcpy(&v, &bits, 8);
    return v;
  } else if constexpr (sizeof(U) == 4) {
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
  } else {
    if (st == at::kHalf) return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
    return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  }
}

at::Tensor long_buffer(int64_t n) { return at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(at::kLong)); }

template <typename U>
struct Select {
  const std::vector<const U*>& data;
  const std::vector<bool*>& masks;
  const FlatIndex& index;
  int64_t N, keep, nblocks;
  bool exact, avx2;
  U exponent;
  at::ScalarType st;

  // Calls f(block, j, lo, hi) for the segments of every block, blocks in parallel.
  template <typename F>
  void for_blocks(const F& f) const {
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        index.for_segments(b * kBlock, std::min(N, (b + 1) * kBlock),
                           [&](size_t j, int64_t lo, int64_t hi) { f(b, j, lo, hi); });
      }
    });
  }

  // ---- sample: the guessed window [lo, hi] and tie key
  struct Guess {
    U lo, hi;
    bool has_tie = false;
    U tie = 0;
  };

  // Ascending LSD radix sort (16-bit digits) of the n sampled keys, with tmp as the second
  // buffer: linear however many keys are equal (nth_element can degrade on long runs of equal
  // keys, which are exactly the tie-heavy inputs).
  static void sort_sample(U* s, U* tmp, int64_t n) {
    at::Tensor counts_t = at::empty({(1 << 16) + 1}, at::TensorOptions().dtype(at::kLong));
    int64_t* count = counts_t.mutable_data_ptr<int64_t>();
    U* from = s;
    U* to = tmp;
    for (int shift = 0; shift < int(sizeof(U) * 8); shift += 16) {
      std::fill(count, count + (1 << 16) + 1, int64_t(0));
      for (int64_t x = 0; x < n; ++x) ++count[((from[x] >> shift) & 0xFFFF) + 1];
      for (int b = 0; b < (1 << 16); ++b) count[b + 1] += count[b];
      for (int64_t x = 0; x < n; ++x) to[count[(from[x] >> shift) & 0xFFFF]++] = from[x];
      std::swap(from, to);
    }
    if (from != s) std::memcpy(s, from, n * sizeof(U));
  }

  Guess sample() const {
    const int64_t kSample = sample_size();
    at::Tensor buf = long_buffer(2 * kSample);  // the keys and a buffer for sorting them
    U* s = reinterpret_cast<U*>(buf.mutable_data_ptr<int64_t>());
    const int64_t stratum = N / kSample;
    size_t j = 0;
    for (int64_t x = 0; x < kSample; ++x) {
      // A fixed pseudo-random offset inside each stratum (splitmix-style hash of x): no
      // aliasing with periodic layouts, and the same positions on every call.
      uint64_t h = static_cast<uint64_t>(x) * 0x9E3779B97F4A7C15ull;
      h ^= h >> 31;
      h *= 0xBF58476D1CE4E5B9ull;
      h ^= h >> 29;
      const int64_t g = x * stratum + static_cast<int64_t>(h % static_cast<uint64_t>(stratum));
      while (index.offsets[j + 1] <= g) ++j;
      s[x] = core::order_key<U>(data[j][g - index.offsets[j]]);
    }
    sort_sample(s, reinterpret_cast<U*>(buf.mutable_data_ptr<int64_t>()) + kSample, kSample);
    // Ascending sample; the cut is near ascending sample rank S - keep * S / N.
    const double frac = static_cast<double>(keep) / static_cast<double>(N);
    const int64_t c = std::clamp<int64_t>(kSample - static_cast<int64_t>(std::ceil(frac * kSample)), 0, kSample - 1);
    const double sigma = std::sqrt(static_cast<double>(kSample) * frac * (1.0 - frac));
    const int64_t d = static_cast<int64_t>(std::ceil(window_sigmas() * sigma)) + 4;
    Guess g;
    g.lo = c - d >= 0 ? s[c - d] : U(0);
    g.hi = c + d < kSample ? s[c + d] : U(~U(0));
    const U at_cut = s[c];
    int64_t copies = 0;
    for (int64_t x = 0; x < kSample; ++x) copies += s[x] == at_cut;
    if (copies >= kHeavyTie) {
      g.has_tie = true;
      g.tie = at_cut;
    }
    return g;
  }

  // ---- one counting pass over every score
  struct Count {
    int64_t above = 0;          // key > window hi
    int64_t ties = 0;           // key == tie
    std::vector<int64_t> hist;  // window bins (the tie key counted in its bin)
  };

  Count count_pass(const Window<U>& w, bool has_hist, bool has_tie, bool check, int64_t* ties_per_block) const {
    const int64_t bins = has_hist ? core::window_bins<U>(w.lo, w.hi, w.shift) : 0;
    const int64_t stride = has_hist ? bins + kLanes : 0;
    const int nthreads = std::max(1, at::get_num_threads());
    at::Tensor scratch = at::zeros({has_hist ? nthreads * stride : 1}, at::TensorOptions().dtype(at::kLong));
    int64_t* hp = scratch.mutable_data_ptr<int64_t>();
    at::Tensor per_block = at::empty({3, nblocks}, at::TensorOptions().dtype(at::kLong));
    int64_t* above_b = per_block.mutable_data_ptr<int64_t>();
    int64_t* ties_b = ties_per_block != nullptr ? ties_per_block : above_b + nblocks;
    int64_t* bad_b = above_b + 2 * nblocks;
    const CountFn<U> fn = count_fn<U>(check, has_tie, has_hist, avx2);
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      const int tid = std::min(at::get_thread_num(), nthreads - 1);
      int64_t* local = has_hist ? hp + tid * stride : nullptr;
      for (int64_t b = b0; b < b1; ++b) {
        SegmentCount c;
        int64_t bad = -1;
        index.for_segments(b * kBlock, std::min(N, (b + 1) * kBlock), [&](size_t j, int64_t lo, int64_t hi) {
          const bool was_bad = c.bad;
          c.bad = false;
          fn(data[j] + lo, hi - lo, w, local, bins, c);
          if (c.bad && bad < 0) bad = static_cast<int64_t>(j);
          c.bad = was_bad || c.bad;
        });
        above_b[b] = c.above;
        ties_b[b] = c.ties;
        bad_b[b] = bad;
      }
    });
    if (check) {
      for (int64_t b = 0; b < nblocks; ++b) {
        TORCH_CHECK(bad_b[b] < 0, "widetopo::global_threshold: scores[", bad_b[b],
                    "] contains a non-finite value (NaN or +-inf); scores must be finite");
      }
    }
    Count out;
    for (int64_t b = 0; b < nblocks; ++b) {
      out.above += above_b[b];
      out.ties += ties_b[b];
    }
    out.hist.assign(bins, 0);
    for (int t = 0; t < (has_hist ? nthreads : 0); ++t) {
      for (int64_t x = 0; x < bins; ++x) out.hist[x] += hp[t * stride + x];
    }
    if (has_hist && has_tie) out.hist[core::window_bin<U>(w.tie, w.lo, w.shift)] += out.ties;
    return out;
  }

  // ---- writing passes
  void write_threshold(U gt) const {  // m = key > gt
    const WriteFn<U> fn = write_fn<U>(avx2);
    for_blocks([&](int64_t, size_t j, int64_t lo, int64_t hi) { fn(data[j] + lo, masks[j] + lo, hi - lo, gt); });
  }

  // c is the cut key, r of its `ties` copies are kept in (tensor, flat index) order;
  // ties_per_block holds the copies of c in every block.
  void write_ties(U c, int64_t r, int64_t* ties_per_block) const {
    std::vector<int64_t> before(nblocks + 1, 0);
    for (int64_t b = 0; b < nblocks; ++b) before[b + 1] = before[b] + ties_per_block[b];
    const WriteFn<U> fn = write_fn<U>(avx2);
    for_blocks([&](int64_t b, size_t j, int64_t lo, int64_t hi) {
      if (before[b + 1] <= r) {
        fn(data[j] + lo, masks[j] + lo, hi - lo, U(c - 1));  // every tie of the block kept
      } else if (before[b] >= r) {
        fn(data[j] + lo, masks[j] + lo, hi - lo, c);         // none kept
      }
    });
    // The block where the kept ties end, in order (its segments in tensor order).
    int64_t b = 0;
    while (b < nblocks && !(before[b] < r && before[b + 1] > r)) ++b;
    if (b == nblocks) return;
    int64_t seen = before[b];
    index.for_segments(b * kBlock, std::min(N, (b + 1) * kBlock), [&](size_t j, int64_t lo, int64_t hi) {
      const U* p = data[j];
      bool* m = masks[j];
      for (int64_t e = lo; e < hi; ++e) {
        const U key = core::order_key<U>(p[e]);
        const bool tie = key == c;
        m[e] = key > c || (tie && seen < r);
        seen += tie;
      }
    });
  }

  // Keys above [lo, hi] kept, below pruned; the `candidates` keys inside are sorted (key
  // descending, flat index ascending) and the first `remaining` kept ("exact"; "official"
  // keeps those above the cut). Returns the cut key.
  U write_gather(U lo, U hi, int64_t candidates, int64_t remaining) const {
    at::Tensor buf = long_buffer(2 * candidates);
    Candidates sink;
    sink.pairs = buf.mutable_data_ptr<int64_t>();
    sink.capacity = candidates;
    const GatherFn<U> fn = gather_fn<U>(avx2);
    for_blocks([&](int64_t, size_t j, int64_t a, int64_t z) {
      fn(data[j] + a, masks[j] + a, z - a, lo, hi, index.offsets[j] + a, &sink);
    });
    TORCH_INTERNAL_ASSERT(sink.count.load() == candidates, "global_threshold: candidate count changed");
    struct Cand {
      int64_t key, index;
    };
    Cand* cand = reinterpret_cast<Cand*>(sink.pairs);
    std::sort(cand, cand + candidates, [](const Cand& a, const Cand& b) {
      const U ka = static_cast<U>(a.key), kb = static_cast<U>(b.key);
      return ka != kb ? ka > kb : a.index < b.index;
    });
    const U cut = static_cast<U>(cand[remaining - 1].key);
    for (int64_t x = 0; x < candidates; ++x) {
      const int64_t g = cand[x].index;
      const size_t j = std::upper_bound(index.offsets.begin(), index.offsets.end(), g) - index.offsets.begin() - 1;
      masks[j][g - index.offsets[j]] = exact ? (x < remaining) : (static_cast<U>(cand[x].key) > cut);
    }
    return cut;
  }

  // ---- the whole select (keep >= 1); returns the cut key
  U run() const {
    constexpr U kMax = U(~U(0));
    U LO = 0, HI = kMax;  // c lies in [LO, HI]
    Window<U> w{LO, HI, 0, 0, exponent};
    bool has_tie = false;
    if (N >= kSampleMin) {
      const Guess g = sample();
      w.lo = g.lo;
      w.hi = g.hi;
      has_tie = g.has_tie && g.tie >= w.lo && g.tie <= w.hi;
      w.tie = g.tie;
    }
    at::Tensor ties_t = long_buffer(nblocks);
    int64_t* ties_per_block = ties_t.mutable_data_ptr<int64_t>();
    bool first = true;
    for (;;) {
      w.shift = core::window_shift<U>(w.lo, w.hi, kWindowBits);
      // A window that is only the tie key needs no histogram.
      const bool has_hist = !(has_tie && w.lo == w.hi);
      const Count cnt = count_pass(w, has_hist, has_tie, first, has_tie ? ties_per_block : nullptr);
      first = false;
      const int64_t inside = has_hist ? [&] {
        int64_t t = 0;
        for (int64_t v : cnt.hist) t += v;
        return t;
      }() : cnt.ties;
      if (keep <= cnt.above) {  // c > hi: the sample's window was too low
        TORCH_INTERNAL_ASSERT(w.hi < HI, "widetopo::global_threshold: window select lost the cut");
        LO = U(w.hi + 1);
        w = Window<U>{LO, HI, 0, w.tie, exponent};
        has_tie = has_tie && w.tie >= LO;
        continue;
      }
      int64_t rem = keep - cnt.above;  // rank of c from the top inside the window
      if (rem > inside) {               // c < lo: too high
        TORCH_INTERNAL_ASSERT(w.lo > LO, "widetopo::global_threshold: window select lost the cut");
        HI = U(w.lo - 1);
        w = Window<U>{LO, HI, 0, w.tie, exponent};
        has_tie = has_tie && w.tie <= HI;
        continue;
      }
      U blo = w.lo, bhi = w.hi;
      int64_t in_bin = inside;
      if (has_hist) {
        int64_t b = static_cast<int64_t>(cnt.hist.size()) - 1;
        for (; b > 0; --b) {
          if (rem <= cnt.hist[b]) break;
          rem -= cnt.hist[b];
        }
        in_bin = cnt.hist[b];
        blo = U(w.lo + (U(b) << w.shift));
        const U width_m1 = w.shift >= int(sizeof(U) * 8) ? kMax : U((U(1) << w.shift) - 1);
        bhi = U(kMax - blo) < width_m1 ? kMax : U(blo + width_m1);
        if (bhi > w.hi) bhi = w.hi;
      }
      if (blo == bhi) {  // the cut key is known; `rem` of its `in_bin` copies are kept
        const U c = blo;
        if (!exact) {
          write_threshold(c);
        } else if (rem == in_bin) {
          write_threshold(U(c - 1));
        } else if (has_tie && w.tie == c) {
          write_ties(c, rem, ties_per_block);
        } else if (in_bin <= kGatherLimit) {
          write_gather(c, c, in_bin, rem);
        } else {  // many copies of an unexpected key: count them per block first
          LO = HI = c;
          w = Window<U>{c, c, 0, c, exponent};
          has_tie = true;
          continue;
        }
        return c;
      }
      if (in_bin <= kGatherLimit) return write_gather(blo, bhi, in_bin, rem);
      LO = blo;
      HI = bhi;
      w = Window<U>{LO, HI, 0, w.tie, exponent};
      has_tie = has_tie && w.tie >= LO && w.tie <= HI;
    }
  }

  // keep == 0: the finite check, then every mask false.
  void run_none() const {
    Window<U> w{U(0), U(~U(0)), 0, 0, exponent};
    (void)count_pass(w, false, false, true, nullptr);
    at::parallel_for(0, int64_t(masks.size()), 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        std::memset(masks[j], 0, (index.offsets[j + 1] - index.offsets[j]) * sizeof(bool));
      }
    });
  }
};

// Returns the cut value; writes every mask.
template <typename U>
double threshold_impl(const std::vector<at::Tensor>& scores, const std::vector<bool*>& masks,
                      int64_t keep, bool exact, U exponent_mask, at::ScalarType st) {
  std::vector<int64_t> numels;
  std::vector<const U*> data;
  for (const auto& s : scores) {
    numels.push_back(s.numel());
    data.push_back(reinterpret_cast<const U*>(s.const_data_ptr()));
  }
  const FlatIndex index(numels);
  const int64_t N = index.total();
  Select<U> sel{data, masks, index, N, keep, (N + kBlock - 1) / kBlock, exact, use_avx2(), exponent_mask, st};
  if (keep == 0) {
    sel.run_none();
    return std::numeric_limits<double>::infinity();
  }
  return key_to_double<U>(sel.run(), st);
}

at::Tensor global_threshold_cpu(at::TensorList scores, at::TensorList masks, int64_t keep,
                                c10::string_view rule) {
  const args::ThresholdCall call = args::check_global_threshold(scores, masks, keep, rule, at::kCPU);
  const at::ScalarType st = call.dtype;

  std::vector<at::Tensor> work_scores;
  std::vector<Writable> work_masks;
  std::vector<bool*> mask_ptrs;
  work_scores.reserve(scores.size());
  work_masks.reserve(masks.size());
  for (size_t j = 0; j < scores.size(); ++j) {
    work_scores.push_back(scores[j].contiguous());
    work_masks.emplace_back(masks[j]);
  }
  for (auto& w : work_masks) mask_ptrs.push_back(w.work.mutable_data_ptr<bool>());

  const bool exact = call.exact;
  double cut;
  switch (st) {
    case at::kDouble:
      cut = threshold_impl<uint64_t>(work_scores, mask_ptrs, keep, exact, uint64_t(0x7FF0000000000000ull), st);
      break;
    case at::kFloat:
      cut = threshold_impl<uint32_t>(work_scores, mask_ptrs, keep, exact, uint32_t(0x7F800000u), st);
      break;
    case at::kHalf:
      cut = threshold_impl<uint16_t>(work_scores, mask_ptrs, keep, exact, uint16_t(0x7C00u), st);
      break;
    default:  // bfloat16
      cut = threshold_impl<uint16_t>(work_scores, mask_ptrs, keep, exact, uint16_t(0x7F80u), st);
      break;
  }
  for (auto& w : work_masks) w.finish();
  return at::scalar_tensor(cut, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(widetopo, CPU, m) { m.impl("global_threshold", &global_threshold_cpu); }

}  // namespace cpu
}  // namespace widetopo
