// Shared helpers of the CPU kernels: per-unit degree counts and the walk over a list of
// tensors as one virtual flat index space (no concatenated copy). Argument checks, the
// (O, I, K) view and contiguous working copies are shared with CUDA (csrc/common/arguments.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "../common/arguments.h"

namespace widetopo {
namespace cpu {

// Elements per parallel task for the elementwise kernels.
constexpr int64_t kGrain = 32768;

using args::OIK;
using args::oik_of;
using args::Writable;

// Per-unit degrees of a contiguous bool mask of shape (O, I, K):
// out_deg[o] = sum_{i,k} m[o,i,k], in_deg[i] = sum_{o,k} m[o,i,k].
// Parallel over rows; each task sums its own in_deg partial, merged at the end.
inline void unit_degrees(const bool* m, const OIK& d, int64_t* out_deg, int64_t* in_deg) {
  std::fill(in_deg, in_deg + d.I, int64_t(0));
  if (d.O == 0 || d.I == 0) {
    std::fill(out_deg, out_deg + d.O, int64_t(0));
    return;
  }
  const int64_t row = d.I * d.K;
  const int64_t grain_rows = std::max<int64_t>(1, kGrain / std::max<int64_t>(row, 1));
  std::mutex mu;
  at::parallel_for(0, d.O, grain_rows, [&](int64_t o0, int64_t o1) {
    std::vector<int64_t> part(d.I, 0);
    for (int64_t o = o0; o < o1; ++o) {
      const bool* r = m + o * row;
      int64_t total = 0;
      if (d.K == 1) {  // 1x1 convolutions and linear layers: one flat, vectorizable loop
        for (int64_t i = 0; i < d.I; ++i) {
          part[i] += r[i];
          total += r[i];
        }
        out_deg[o] = total;
        continue;
      }
      for (int64_t i = 0; i < d.I; ++i) {
        const bool* c = r + i * d.K;
        int64_t s = 0;
        for (int64_t k = 0; k < d.K; ++k) s += c[k];
        part[i] += s;
        total += s;
      }
      out_deg[o] = total;
    }
    std::lock_guard<std::mutex> g(mu);
    for (int64_t i = 0; i < d.I; ++i) in_deg[i] += part[i];
  });
}

// A list of tensors seen as one flat index space [0, N): tensor j covers
// [offsets[j], offsets[j+1]).
struct FlatIndex {
  std::vector<int64_t> offsets;

  explicit FlatIndex(const std::vector<int64_t>& numels) : offsets(numels.size() + 1, 0) {
    for (size_t j = 0; j < numels.size(); ++j) offsets[j + 1] = offsets[j] + numels[j];
  }
  int64_t total() const { return offsets.back(); }

  // Calls f(j, lo, hi) for every tensor j overlapping [begin, end), with the local range
  // [lo, hi) of tensor j, in (tensor, index) order.
  template <typename F>
  void for_segments(int64_t begin, int64_t end, const F& f) const {
    if (begin >= end) return;
    size_t j = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    const size_t n = offsets.size() - 1;
    for (; j < n && offsets[j] < end; ++j) {
      const int64_t lo = std::max(begin, offsets[j]);
      const int64_t hi = std::min(end, offsets[j + 1]);
      if (lo < hi) f(j, lo - offsets[j], hi - offsets[j]);
    }
  }
};

}  // namespace cpu
}  // namespace widetopo
