// Shared helpers of the CPU kernels: argument checks with messages that name the argument,
// the (O, I, K) view of a rank >= 2 tensor, contiguous working copies, and the walk over a
// list of tensors as one virtual flat index space (no concatenated copy).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace widetopo {
namespace cpu {

// Elements per parallel task for the elementwise kernels.
constexpr int64_t kGrain = 32768;

inline void check_same_length(at::TensorList a, at::TensorList b, const char* op, const char* name_a,
                              const char* name_b) {
  TORCH_CHECK(a.size() == b.size(), "widetopo::", op, ": ", name_a, " and ", name_b,
              " must have the same length, got ", a.size(), " and ", b.size());
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name, size_t j) {
  TORCH_CHECK(t.defined(), "widetopo::", op, ": ", name, "[", j, "] is undefined");
  TORCH_CHECK(t.device().is_cpu(), "widetopo::", op, ": ", name, "[", j,
              "] must be on the CPU like the other tensors of the call, got ", t.device());
}

inline bool is_score_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

inline void check_score_dtype(const at::Tensor& t, const char* op, const char* name, size_t j) {
  TORCH_CHECK(is_score_dtype(t.scalar_type()), "widetopo::", op, ": ", name, "[", j,
              "] must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// A mask: bool, CPU, same shape as its partner tensor.
inline void check_mask(const at::Tensor& mask, const at::Tensor& partner, const char* op,
                       const char* mask_name, const char* partner_name, size_t j) {
  check_cpu(mask, op, mask_name, j);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "widetopo::", op, ": ", mask_name, "[", j,
              "] must be torch.bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == partner.sizes(), "widetopo::", op, ": ", mask_name, "[", j,
              "] has shape ", mask.sizes(), " but ", partner_name, "[", j, "] has shape ",
              partner.sizes(), "; they must be equal");
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& partner, const char* op,
                             const char* name, const char* partner_name, size_t j) {
  TORCH_CHECK(t.sizes() == partner.sizes(), "widetopo::", op, ": ", name, "[", j, "] has shape ",
              t.sizes(), " but ", partner_name, "[", j, "] has shape ", partner.sizes(),
              "; they must be equal");
}

// An in-place output must not have internally overlapping memory (e.g. from expand()): the
// result would depend on write order, and copying a working copy back would fail half-way.
inline void check_writable(const at::Tensor& t, const char* op, const char* name, size_t j) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "widetopo::", op, ": ", name, "[", j,
              "] is written in place but has internally overlapping memory (e.g. from expand()); ",
              "pass a tensor that owns its elements (e.g. .clone())");
}

// (O, I, K) of a rank >= 2 tensor: dim 0 = output units, dim 1 = input units, rest = kernel.
struct OIK {
  int64_t O;
  int64_t I;
  int64_t K;
};

inline OIK oik_of(const at::Tensor& t) {
  OIK d{t.size(0), t.size(1), 1};
  for (int64_t k = 2; k < t.dim(); ++k) d.K *= t.size(k);
  return d;
}

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

// A contiguous tensor to write into, and the caller's tensor to copy it back into afterwards
// (when the caller's tensor is not contiguous).
struct Writable {
  at::Tensor work;
  at::Tensor target;
  bool copy_back = false;

  explicit Writable(const at::Tensor& t) : target(t) {
    if (t.is_contiguous()) {
      work = t;
    } else {
      work = t.contiguous();
      copy_back = true;
    }
  }
  void finish() {
    if (copy_back) target.copy_(work);
  }
};

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
