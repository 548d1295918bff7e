// CPU kernel of widetopo::density_decay_ (DESIGN 2.1): for every score tensor of rank >= 2,
//   S[o,i,k] *= ( m[o,i,k] / max(out_deg[o] * in_deg[i], 1) ) ^ exponent
// with out_deg[o] = sum_{i,k} m and in_deg[i] = sum_{o,k} m. Rank < 2 tensors are untouched.
// Degrees are counted once per tensor, then one parallel elementwise pass applies the factor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "widetopo/elementwise.h"

namespace widetopo {
namespace cpu {
namespace {

void density_decay_cpu(at::TensorList scores, at::TensorList masks, double exponent) {
  constexpr const char* op = "density_decay_";
  check_same_length(scores, masks, op, "scores", "masks");
  TORCH_CHECK(std::isfinite(exponent), "widetopo::density_decay_: exponent must be finite, got ",
              exponent);
  for (size_t j = 0; j < scores.size(); ++j) {
    check_cpu(scores[j], op, "scores", j);
    check_score_dtype(scores[j], op, "scores", j);
    check_mask(masks[j], scores[j], op, "masks", "scores", j);
  }
  for (size_t j = 0; j < scores.size(); ++j) {
    if (scores[j].dim() < 2 || scores[j].numel() == 0) continue;
    const OIK d = oik_of(scores[j]);
    const at::Tensor m = masks[j].contiguous();
    const bool* mp = m.const_data_ptr<bool>();
    std::vector<int64_t> out_deg(d.O), in_deg(d.I);
    unit_degrees(mp, d, out_deg.data(), in_deg.data());
    Writable w(scores[j]);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.work.scalar_type(), "density_decay_", [&] {
      scalar_t* sp = w.work.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, w.work.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e) {
          const core::UnitIndex u = core::unit_index(e, d.I, d.K);
          const double f = core::decay_factor(mp[e], out_deg[u.o], in_deg[u.i], exponent);
          sp[e] = static_cast<scalar_t>(static_cast<double>(sp[e]) * f);
        }
      });
    });
    w.finish();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(widetopo, CPU, m) { m.impl("density_decay_", &density_decay_cpu); }

}  // namespace cpu
}  // namespace widetopo
