// Argument validation of every widetopo op, shared by the CPU and CUDA backends (host code).
//
// Each backend calls the op's check_* function with the device of the call (CPU, or the CUDA
// device of the first tensor) before touching any data, so both backends accept and reject
// exactly the same inputs with the same messages, and a rejected call writes nothing.
// Also here: the (O, I, K) view of a rank >= 2 tensor and contiguous working copies of in-place
// arguments, which both backends use.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace widetopo {
namespace args {

// ------------------------------------------------------------------------------ primitives

inline void same_length(at::TensorList a, at::TensorList b, const char* op, const char* name_a,
                        const char* name_b) {
  TORCH_CHECK(a.size() == b.size(), "widetopo::", op, ": ", name_a, " and ", name_b,
              " must have the same length, got ", a.size(), " and ", b.size());
}

inline void on_device(const at::Tensor& t, const at::Device& device, const char* op, const char* name,
                      size_t j) {
  TORCH_CHECK(t.defined(), "widetopo::", op, ": ", name, "[", j, "] is undefined");
  TORCH_CHECK(t.device() == device, "widetopo::", op, ": ", name, "[", j, "] must be on ", device,
              " like the other tensors of the call, got ", t.device());
}

inline bool is_score_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

inline void score_dtype(const at::Tensor& t, const char* op, const char* name, size_t j) {
  TORCH_CHECK(is_score_dtype(t.scalar_type()), "widetopo::", op, ": ", name, "[", j,
              "] must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// All tensors of `name` share the dtype of the first one; returns it (float32 for an empty list).
inline at::ScalarType common_dtype(at::TensorList ts, const char* op, const char* name) {
  const at::ScalarType st = ts.empty() ? at::kFloat : ts[0].scalar_type();
  for (size_t j = 1; j < ts.size(); ++j) {
    TORCH_CHECK(ts[j].scalar_type() == st, "widetopo::", op, ": ", name, "[", j, "] has dtype ",
                ts[j].scalar_type(), " but ", name, "[0] has dtype ", st, "; all ", name,
                " of one call must share a dtype");
  }
  return st;
}

inline void same_shape(const at::Tensor& t, const at::Tensor& partner, const char* op, const char* name,
                       const char* partner_name, size_t j) {
  TORCH_CHECK(t.sizes() == partner.sizes(), "widetopo::", op, ": ", name, "[", j, "] has shape ",
              t.sizes(), " but ", partner_name, "[", j, "] has shape ", partner.sizes(),
              "; they must be equal");
}

inline void bool_mask(const at::Tensor& mask, const at::Device& device, const char* op, const char* name,
                      size_t j) {
  on_device(mask, device, op, name, j);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "widetopo::", op, ": ", name, "[", j,
              "] must be torch.bool, got ", mask.scalar_type());
}

// A mask: bool, on the call's device, same shape as its partner tensor.
inline void mask_of(const at::Tensor& mask, const at::Tensor& partner, const at::Device& device,
                    const char* op, const char* mask_name, const char* partner_name, size_t j) {
  bool_mask(mask, device, op, mask_name, j);
  same_shape(mask, partner, op, mask_name, partner_name, j);
}

// An in-place output must not have internally overlapping memory (e.g. from expand()): the
// result would depend on write order, and copying a working copy back would fail half-way.
inline void writable(const at::Tensor& t, const char* op, const char* name, size_t j) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "widetopo::", op, ": ", name, "[", j,
              "] is written in place but has internally overlapping memory (e.g. from expand()); ",
              "pass a tensor that owns its elements (e.g. .clone())");
}

// ------------------------------------------------------------------- aliasing across entries
// One launch covers a whole list on the GPU, so two entries that share memory race there
// (accumulate_score_([s, s], ...), masks=[m, m]) while the CPU runs them in order. A tensor
// written in place must therefore share no memory with any tensor of another entry of the call
// (written or read). Tensors of the same entry may be the very same view (apply_masks_([m], [m])
// reads and writes each element at the same position), but any other overlap of an output with an
// input of its entry (x[1:] and x[:-1], x and x.t()) makes the result depend on the order in which
// elements are visited, so it is refused too. Byte ranges are sorted, so a call costs
// O(n log n) plus a precise check (at::get_overlap_status) of the pairs whose ranges meet;
// interleaved strided views that ATen cannot decide are refused too.
struct ListArg {
  at::TensorList tensors;
  const char* name;
  bool written;
};

struct ByteRange {
  uintptr_t lo, hi;  // [lo, hi)
  size_t list, j;
};

inline ByteRange byte_range(const at::Tensor& t, size_t list, size_t j) {
  int64_t lo = 0, hi = 0;  // element offsets from data_ptr of the lowest and highest element
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t span = t.stride(d) * (t.size(d) - 1);
    if (span < 0) lo += span; else hi += span;
  }
  const auto base = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const auto es = static_cast<int64_t>(t.element_size());
  return {base + static_cast<uintptr_t>(lo * es), base + static_cast<uintptr_t>((hi + 1) * es), list, j};
}

// Two tensors address element i at the same byte for every i.
inline bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.const_data_ptr() == b.const_data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides() &&
         a.element_size() == b.element_size();
}

inline void no_cross_entry_aliasing(const char* op, std::initializer_list<ListArg> lists) {
  const std::vector<ListArg> ls(lists);
  bool any_written = false;
  for (const auto& l : ls) any_written = any_written || (l.written && !l.tensors.empty());
  if (!any_written) return;
  std::vector<ByteRange> ranges;
  for (size_t a = 0; a < ls.size(); ++a) {
    for (size_t j = 0; j < ls[a].tensors.size(); ++j) {
      const at::Tensor& t = ls[a].tensors[j];
      if (!t.defined() || t.numel() == 0) continue;
      ranges.push_back(byte_range(t, a, j));
    }
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const ByteRange& x, const ByteRange& y) { return x.lo != y.lo ? x.lo < y.lo : x.hi < y.hi; });
  for (size_t x = 0; x < ranges.size(); ++x) {
    for (size_t y = x + 1; y < ranges.size() && ranges[y].lo < ranges[x].hi; ++y) {
      const ByteRange &p = ranges[x], &q = ranges[y];
      if (!(ls[p.list].written || ls[q.list].written)) continue;
      const at::Tensor& tp = ls[p.list].tensors[p.j];
      const at::Tensor& tq = ls[q.list].tensors[q.j];
      if (p.j == q.j) {
        if (same_view(tp, tq)) continue;
        if (at::get_overlap_status(tp, tq) == at::MemOverlapStatus::No) continue;
        const ByteRange& out = ls[p.list].written ? p : q;
        const ByteRange& in = ls[p.list].written ? q : p;
        TORCH_CHECK(false, "widetopo::", op, ": ", ls[out.list].name, "[", out.j, "] overlap: it is written in "
                    "place and shares memory with ", ls[in.list].name, "[", in.j, "] without being the same "
                    "view (same start, shape and strides), so the result would depend on the order in which "
                    "elements are visited; pass distinct tensors (e.g. .clone())");
      }
      if (at::get_overlap_status(tp, tq) == at::MemOverlapStatus::No) continue;
      // Name the later entry first: "masks[1] shares memory with masks[0]".
      const bool p_later = p.j > q.j;
      const ByteRange& later = p_later ? p : q;
      const ByteRange& earlier = p_later ? q : p;
      TORCH_CHECK(false, "widetopo::", op, ": ", ls[later.list].name, "[", later.j, "] shares memory with ",
                  ls[earlier.list].name, "[", earlier.j, "] and one of them is written in place; "
                  "entries of one call must not overlap (one GPU launch covers the whole list): pass "
                  "distinct tensors (e.g. .clone())");
    }
  }
}

// --------------------------------------------------------------------------- one per op

struct ThresholdCall {
  at::ScalarType dtype;
  int64_t numel;  // N, the number of scores
  bool exact;     // rule "exact" (else "official")
};

inline ThresholdCall check_global_threshold(at::TensorList scores, at::TensorList masks, int64_t keep,
                                            c10::string_view rule, const at::Device& device) {
  constexpr const char* op = "global_threshold";
  const std::string rule_s(rule.data(), rule.size());
  TORCH_CHECK(rule_s == "exact" || rule_s == "official", "widetopo::global_threshold: rule (mode) must be ",
              "\"exact\" or \"official\", got \"", rule_s, "\"");
  same_length(scores, masks, op, "scores", "masks");
  int64_t n = 0;
  for (size_t j = 0; j < scores.size(); ++j) {
    on_device(scores[j], device, op, "scores", j);
    score_dtype(scores[j], op, "scores", j);
    mask_of(masks[j], scores[j], device, op, "masks", "scores", j);
    writable(masks[j], op, "masks", j);
    n += scores[j].numel();
  }
  const at::ScalarType st = common_dtype(scores, op, "scores");
  no_cross_entry_aliasing(op, {{masks, "masks", true}, {scores, "scores", false}});
  TORCH_CHECK(keep >= 0 && keep <= n, "widetopo::global_threshold: keep must be in [0, N] with N = ", n,
              " (total number of scores), got ", keep);
  return {st, n, rule_s == "exact"};
}

inline void check_density_decay(at::TensorList scores, at::TensorList masks, double exponent,
                                 const at::Device& device) {
  constexpr const char* op = "density_decay_";
  same_length(scores, masks, op, "scores", "masks");
  TORCH_CHECK(std::isfinite(exponent), "widetopo::density_decay_: exponent must be finite, got ", exponent);
  for (size_t j = 0; j < scores.size(); ++j) {
    on_device(scores[j], device, op, "scores", j);
    writable(scores[j], op, "scores", j);
    score_dtype(scores[j], op, "scores", j);
    mask_of(masks[j], scores[j], device, op, "masks", "scores", j);
  }
  no_cross_entry_aliasing(op, {{scores, "scores", true}, {masks, "masks", false}});
}

inline void check_restoration_scores(at::TensorList masks, at::TensorList noise, double noise_scale,
                                     const at::Device& device) {
  constexpr const char* op = "restoration_scores";
  same_length(masks, noise, op, "masks", "noise");
  TORCH_CHECK(std::isfinite(noise_scale), "widetopo::restoration_scores: noise_scale must be finite, got ",
              noise_scale);
  for (size_t j = 0; j < masks.size(); ++j) {
    bool_mask(masks[j], device, op, "masks", j);
    if (masks[j].dim() < 2) {
      // noise[j] is ignored, but a tensor given there must still be on the call's device: a
      // CUDA noise tensor beside CPU masks would otherwise reach the CUDA kernel.
      if (noise[j].defined()) on_device(noise[j], device, op, "noise", j);
      continue;
    }
    on_device(noise[j], device, op, "noise", j);
    TORCH_CHECK(noise[j].scalar_type() == at::kFloat, "widetopo::restoration_scores: noise[", j,
                "] must be float32, got ", noise[j].scalar_type());
    TORCH_CHECK(noise[j].dim() == 2 && noise[j].size(0) == masks[j].size(0) &&
                    noise[j].size(1) == masks[j].size(1),
                "widetopo::restoration_scores: noise[", j, "] must have shape (O, I) = (", masks[j].size(0),
                ", ", masks[j].size(1), ") for masks[", j, "] of shape ", masks[j].sizes(), ", got ",
                noise[j].sizes());
  }
}

inline void check_accumulate_score(at::TensorList scores, at::TensorList a, at::TensorList b,
                                   at::TensorList masks, const at::Device& device) {
  constexpr const char* op = "accumulate_score_";
  same_length(scores, a, op, "scores", "a");
  const bool has_b = !b.empty(), has_m = !masks.empty();
  if (has_b) same_length(scores, b, op, "scores", "b (or an empty list)");
  if (has_m) same_length(scores, masks, op, "scores", "masks (or an empty list)");
  for (size_t j = 0; j < scores.size(); ++j) {
    on_device(scores[j], device, op, "scores", j);
    writable(scores[j], op, "scores", j);
    score_dtype(scores[j], op, "scores", j);
    on_device(a[j], device, op, "a", j);
    score_dtype(a[j], op, "a", j);
    same_shape(a[j], scores[j], op, "a", "scores", j);
    if (has_b) {
      on_device(b[j], device, op, "b", j);
      score_dtype(b[j], op, "b", j);
      same_shape(b[j], scores[j], op, "b", "scores", j);
    }
    if (has_m) mask_of(masks[j], scores[j], device, op, "masks", "scores", j);
  }
  no_cross_entry_aliasing(op, {{scores, "scores", true}, {a, "a", false}, {b, "b", false}, {masks, "masks", false}});
}

// Returns the common dtype of `tensors`.
inline at::ScalarType check_masked_sq_norm(at::TensorList tensors, at::TensorList masks,
                                           const at::Device& device) {
  constexpr const char* op = "masked_sq_norm";
  const bool has_m = !masks.empty();
  if (has_m) same_length(tensors, masks, op, "tensors", "masks (or an empty list)");
  for (size_t j = 0; j < tensors.size(); ++j) {
    on_device(tensors[j], device, op, "tensors", j);
    score_dtype(tensors[j], op, "tensors", j);
    if (has_m) mask_of(masks[j], tensors[j], device, op, "masks", "tensors", j);
  }
  return common_dtype(tensors, op, "tensors");
}

inline void check_apply_masks(at::TensorList tensors, at::TensorList masks, const at::Device& device) {
  constexpr const char* op = "apply_masks_";
  same_length(tensors, masks, op, "tensors", "masks");
  for (size_t j = 0; j < tensors.size(); ++j) {
    on_device(tensors[j], device, op, "tensors", j);
    writable(tensors[j], op, "tensors", j);
    const auto st = tensors[j].scalar_type();
    TORCH_CHECK(!at::isComplexType(st) && tensors[j].element_size() <= 8 && !at::isQIntType(st),
                "widetopo::apply_masks_: tensors[", j, "] has unsupported dtype ", st,
                "; real floating, integer or bool tensors are allowed");
    mask_of(masks[j], tensors[j], device, op, "masks", "tensors", j);
  }
  no_cross_entry_aliasing(op, {{tensors, "tensors", true}, {masks, "masks", false}});
}

inline void check_mask_stats(at::TensorList masks, const at::Device& device) {
  for (size_t j = 0; j < masks.size(); ++j) bool_mask(masks[j], device, "mask_stats", "masks", j);
}

// ---------------------------------------------------------------------------- shared shapes

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

// A contiguous tensor to write into, and the caller's tensor to copy it back into afterwards
// (when the caller's tensor is not contiguous; on CUDA the copy runs on the current stream).
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

}  // namespace args
}  // namespace widetopo
