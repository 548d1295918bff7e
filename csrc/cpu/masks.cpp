// CPU kernels of the mask helpers:
//   widetopo::apply_masks_:  t <- m ? t : 0  (selection: a pruned NaN/inf becomes exactly 0)
//   widetopo::mask_stats:    int64 (n, 3): kept, active output units, active input units;
//                            rank < 2 masks report kept, kept, kept.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common.h"
#include "widetopo/elementwise.h"

namespace widetopo {
namespace cpu {
namespace {

// Selection on the raw storage: zero bits are the value 0 for every supported dtype.
template <typename U>
void apply_mask_bits(U* p, const bool* m, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t x = b; x < e; ++x) p[x] = core::apply_mask<U>(p[x], m[x]);
  });
}

void apply_masks_cpu(at::TensorList tensors, at::TensorList masks) {
  args::check_apply_masks(tensors, masks, at::kCPU);
  for (size_t j = 0; j < tensors.size(); ++j) {
    const int64_t n = tensors[j].numel();
    if (n == 0) continue;
    const at::Tensor m = masks[j].contiguous();
    Writable w(tensors[j]);
    void* p = w.work.mutable_data_ptr();
    const bool* mp = m.const_data_ptr<bool>();
    switch (w.work.element_size()) {
      case 1: apply_mask_bits(static_cast<uint8_t*>(p), mp, n); break;
      case 2: apply_mask_bits(static_cast<uint16_t*>(p), mp, n); break;
      case 4: apply_mask_bits(static_cast<uint32_t*>(p), mp, n); break;
      default: apply_mask_bits(static_cast<uint64_t*>(p), mp, n); break;
    }
    w.finish();
  }
}

at::Tensor mask_stats_cpu(at::TensorList masks) {
  args::check_mask_stats(masks, at::kCPU);
  const int64_t n = static_cast<int64_t>(masks.size());
  at::Tensor out = at::zeros({n, 3}, at::TensorOptions().dtype(at::kLong));
  int64_t* op_ = out.mutable_data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) {
    if (masks[j].numel() == 0) continue;
    const at::Tensor m = masks[j].contiguous();
    const bool* mp = m.const_data_ptr<bool>();
    if (m.dim() < 2) {
      const int64_t numel = m.numel();
      const int64_t nblocks = (numel + kGrain - 1) / kGrain;
      std::vector<int64_t> part(nblocks, 0);
      at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          int64_t s = 0;
          const int64_t end = std::min(numel, (b + 1) * kGrain);
          for (int64_t x = b * kGrain; x < end; ++x) s += mp[x];
          part[b] = s;
        }
      });
      int64_t kept = 0;
      for (int64_t s : part) kept += s;
      op_[3 * j] = op_[3 * j + 1] = op_[3 * j + 2] = kept;
    } else {
      const OIK d = oik_of(m);
      std::vector<int64_t> out_deg(d.O), in_deg(d.I);
      unit_degrees(mp, d, out_deg.data(), in_deg.data());
      int64_t kept = 0, act_o = 0, act_i = 0;
      for (int64_t v : out_deg) { kept += v; act_o += v > 0; }
      for (int64_t v : in_deg) act_i += v > 0;
      op_[3 * j] = kept;
      op_[3 * j + 1] = act_o;
      op_[3 * j + 2] = act_i;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(widetopo, CPU, m) {
  m.impl("apply_masks_", &apply_masks_cpu);
  m.impl("mask_stats", &mask_stats_cpu);
}

}  // namespace cpu
}  // namespace widetopo
