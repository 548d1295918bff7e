// CPU kernel of widetopo::global_threshold: keep the `keep` highest scores over a list of
// tensors and write the bool masks in place.
//
// Selection is a most-significant-digit-first radix select on order-preserving integer keys
// of the floats (widetopo/radix.h): every pass builds a histogram (11-bit digits, per-thread
// histograms summed in thread order) of the keys that match the digits fixed so far, and the
// bin holding the keep-th largest key fixes the next digit. The finite check is fused into the
// first pass. As soon as at most kGatherLimit keys match the prefix, one final pass writes
// every decided mask entry and gathers the few undecided (key, flat index) pairs, which are
// sorted in memory. Otherwise, after the last digit the prefix is the cut key `c` and
// r = keep - #(key > c) ties (key == c) are kept. Extra memory: the histograms, at most
// kGatherLimit candidates and one counter per block of kBlock elements - all allocated as
// torch tensors so memory profilers see them; no concatenated copy, no sort of the scores.
// Non-contiguous score tensors are read through contiguous copies.
//
// Ties at the cut ("exact" mode) go to the entries first in (tensor index, row-major flat
// index) order: ties are counted per fixed block of the flat index space, prefix-summed, and
// every block keeps ties while the running count stays below r - the result does not depend
// on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"
#include "widetopo/radix.h"

namespace widetopo {
namespace cpu {
namespace {

constexpr int kDigitBits = 11;
constexpr int64_t kBlock = 1 << 16;        // elements per block of the tie / write passes
constexpr int64_t kHistGrain = 1 << 17;    // elements per task of the histogram passes

template <typename U>
struct KeyList {
  std::vector<const U*> data;  // raw bits of each (contiguous) score tensor
  FlatIndex index;
};

// Histogram of the digit [shift, shift + width) of the keys that agree with `prefix` on every
// bit at or above `fixed_shift`. Per-thread histograms live in one scratch tensor allocated
// here (visible to the memory profiler) and are summed in thread order. When `check_finite`,
// also reports the smallest index of a tensor holding a non-finite value (or -1).
template <typename U>
std::vector<int64_t> histogram_pass(const KeyList<U>& keys, U prefix, int fixed_shift, int shift,
                                    int width, bool check_finite, U exponent_mask,
                                    int64_t* first_bad) {
  const int64_t bins = int64_t(1) << width;
  const int nthreads = std::max(1, at::get_num_threads());
  at::Tensor scratch = at::zeros({nthreads, bins + 1}, at::TensorOptions().dtype(at::kLong));
  int64_t* sp = scratch.mutable_data_ptr<int64_t>();
  for (int t = 0; t < nthreads; ++t) sp[t * (bins + 1) + bins] = -1;  // first bad tensor
  constexpr int W = int(sizeof(U) * 8);
  at::parallel_for(0, keys.index.total(), kHistGrain, [&](int64_t begin, int64_t end) {
    const int tid = std::min(at::get_thread_num(), nthreads - 1);
    int64_t* local = sp + tid * (bins + 1);
    int64_t local_bad = local[bins];
    keys.index.for_segments(begin, end, [&](size_t j, int64_t lo, int64_t hi) {
      const U* p = keys.data[j];
      if (check_finite) {
        bool all_finite = true;
        for (int64_t e = lo; e < hi; ++e) {
          const U bits = p[e];
          all_finite &= core::bits_finite<U>(bits, exponent_mask);
          ++local[core::key_digit<U>(core::order_key<U>(bits), shift, width)];
        }
        if (!all_finite && (local_bad < 0 || int64_t(j) < local_bad)) local_bad = int64_t(j);
      } else {
        const U hi_prefix = fixed_shift >= W ? U(0) : U(prefix >> fixed_shift);
        for (int64_t e = lo; e < hi; ++e) {
          const U key = core::order_key<U>(p[e]);
          if (U(key >> fixed_shift) == hi_prefix) ++local[core::key_digit<U>(key, shift, width)];
        }
      }
    });
    local[bins] = local_bad;
  });
  std::vector<int64_t> hist(bins, 0);
  int64_t bad = -1;
  for (int t = 0; t < nthreads; ++t) {
    const int64_t* local = sp + t * (bins + 1);
    for (int64_t b = 0; b < bins; ++b) hist[b] += local[b];
    if (local[bins] >= 0 && (bad < 0 || local[bins] < bad)) bad = local[bins];
  }
  if (first_bad) *first_bad = bad;
  return hist;
}

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

// Once at most kGatherLimit keys match the prefix, one pass finishes the job: keys above the
// prefix range are kept, keys below are pruned, and the matching keys ("candidates") are
// gathered as (key, flat index) pairs, sorted by key descending then index ascending, and the
// first `remaining` of them are kept ("exact"; "official" keeps those above the cut).
constexpr int64_t kGatherLimit = 1 << 14;

template <typename U>
U finish_by_gather(const KeyList<U>& keys, const std::vector<bool*>& masks, U prefix,
                   int fixed_shift, int64_t candidates, int64_t remaining, bool exact) {
  constexpr int W = int(sizeof(U) * 8);
  const int64_t N = keys.index.total();
  const U hi_prefix = fixed_shift >= W ? U(0) : U(prefix >> fixed_shift);
  at::Tensor gathered = at::empty({std::max<int64_t>(candidates, 1), 2}, at::TensorOptions().dtype(at::kLong));
  int64_t* gp = gathered.mutable_data_ptr<int64_t>();
  std::atomic<int64_t> slot{0};
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    keys.index.for_segments(b0 * kBlock, std::min(N, b1 * kBlock), [&](size_t j, int64_t lo, int64_t hi) {
      const U* p = keys.data[j];
      bool* m = masks[j];
      const int64_t base = keys.index.offsets[j];
      for (int64_t e = lo; e < hi; ++e) {
        const U key = core::order_key<U>(p[e]);
        const U top = fixed_shift >= W ? U(0) : U(key >> fixed_shift);
        m[e] = top > hi_prefix;
        if (top == hi_prefix) {
          const int64_t s = slot.fetch_add(1, std::memory_order_relaxed);
          gp[2 * s] = static_cast<int64_t>(key);
          gp[2 * s + 1] = base + e;
        }
      }
    });
  });
  TORCH_INTERNAL_ASSERT(slot.load() == candidates, "global_threshold: candidate count changed");
  struct Cand {
    int64_t key, index;
  };
  Cand* c = reinterpret_cast<Cand*>(gp);
  // Keys are stored as int64 from an unsigned U; compare them as U.
  std::sort(c, c + candidates, [](const Cand& a, const Cand& b) {
    const U ka = static_cast<U>(a.key), kb = static_cast<U>(b.key);
    return ka != kb ? ka > kb : a.index < b.index;
  });
  const U cut = static_cast<U>(c[remaining - 1].key);
  for (int64_t x = 0; x < candidates; ++x) {
    const int64_t g = c[x].index;
    const size_t j = std::upper_bound(keys.index.offsets.begin(), keys.index.offsets.end(), g) -
                     keys.index.offsets.begin() - 1;
    masks[j][g - keys.index.offsets[j]] = exact ? (x < remaining) : (static_cast<U>(c[x].key) > cut);
  }
  return cut;
}

// Returns the cut value; writes every mask.
template <typename U>
double threshold_impl(const std::vector<at::Tensor>& scores, const std::vector<bool*>& masks,
                      int64_t keep, bool exact, U exponent_mask, at::ScalarType st) {
  std::vector<int64_t> numels;
  KeyList<U> keys{{}, FlatIndex({})};
  for (const auto& s : scores) {
    numels.push_back(s.numel());
    keys.data.push_back(reinterpret_cast<const U*>(s.const_data_ptr()));
  }
  keys.index = FlatIndex(numels);
  const int64_t N = keys.index.total();
  constexpr int W = int(sizeof(U) * 8);

  // Passes: fix the digits of the keep-th largest key. `remaining` is its rank from the top
  // among the keys matching the prefix, `matching` how many keys match the prefix.
  U prefix = 0;
  int64_t remaining = keep;
  int64_t matching = N;
  int fixed_shift = W;
  const int passes = core::radix_passes(W, kDigitBits);
  const bool select = keep > 0;
  for (int p = 0; p < passes; ++p) {
    int width = 0;
    const int shift = core::radix_pass_shift(W, kDigitBits, p, &width);
    int64_t bad = -1;
    auto hist = histogram_pass<U>(keys, prefix, fixed_shift, shift, width, p == 0,
                                  exponent_mask, &bad);
    if (p == 0) {
      TORCH_CHECK(bad < 0, "widetopo::global_threshold: scores[", bad,
                  "] contains a non-finite value (NaN or +-inf); scores must be finite");
      if (!select) break;
    }
    int64_t b = (int64_t(1) << width) - 1;
    for (; b > 0; --b) {
      if (remaining <= hist[b]) break;
      remaining -= hist[b];
    }
    prefix = U(prefix | (U(b) << shift));
    matching = hist[b];
    fixed_shift = shift;
    if (matching <= kGatherLimit) break;
  }

  if (!select) {
    at::parallel_for(0, int64_t(masks.size()), 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) std::memset(masks[j], 0, numels[j] * sizeof(bool));
    });
    return std::numeric_limits<double>::infinity();
  }
  if (matching <= kGatherLimit) {
    const U cut = finish_by_gather<U>(keys, masks, prefix, fixed_shift, matching, remaining, exact);
    return key_to_double<U>(cut, st);
  }

  // Every digit is fixed: the prefix is the cut key and `remaining` ties (key == cut) are kept.
  const U cut = prefix;
  const int64_t r = remaining;  // 1 <= r <= matching
  const int64_t ties_total = matching;
  const int64_t nblocks = (N + kBlock - 1) / kBlock;

  if (!exact || r == ties_total) {
    // "official": key > cut. "exact" with every tie kept: key >= cut.
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      keys.index.for_segments(b0 * kBlock, std::min(N, b1 * kBlock),
                              [&](size_t j, int64_t lo, int64_t hi) {
                                const U* p = keys.data[j];
                                bool* m = masks[j];
                                if (exact) {
                                  for (int64_t e = lo; e < hi; ++e)
                                    m[e] = core::order_key<U>(p[e]) >= cut;
                                } else {
                                  for (int64_t e = lo; e < hi; ++e)
                                    m[e] = core::order_key<U>(p[e]) > cut;
                                }
                              });
    });
  } else {
    // Ties per block, exclusive prefix sum, then each block keeps ties while the running
    // count is below r.
    at::Tensor before_t = at::zeros({nblocks + 1}, at::TensorOptions().dtype(at::kLong));
    int64_t* before = before_t.mutable_data_ptr<int64_t>();
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t c = 0;
        keys.index.for_segments(b * kBlock, std::min(N, (b + 1) * kBlock),
                                [&](size_t j, int64_t lo, int64_t hi) {
                                  const U* p = keys.data[j];
                                  for (int64_t e = lo; e < hi; ++e)
                                    c += core::order_key<U>(p[e]) == cut;
                                });
        before[b + 1] = c;
      }
    });
    for (int64_t b = 0; b < nblocks; ++b) before[b + 1] += before[b];
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t seen = before[b];
        keys.index.for_segments(b * kBlock, std::min(N, (b + 1) * kBlock),
                                [&](size_t j, int64_t lo, int64_t hi) {
                                  const U* p = keys.data[j];
                                  bool* m = masks[j];
                                  for (int64_t e = lo; e < hi; ++e) {
                                    const U key = core::order_key<U>(p[e]);
                                    bool k = key > cut;
                                    if (key == cut) k = (seen++ < r);
                                    m[e] = k;
                                  }
                                });
      }
    });
  }
  return key_to_double<U>(cut, st);
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
      cut = threshold_impl<uint64_t>(work_scores, mask_ptrs, keep, exact,
                                     uint64_t(0x7FF0000000000000ull), st);
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
