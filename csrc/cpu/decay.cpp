// CPU kernel of widetopo::density_decay_ (docs/design.md §2.1): for every score tensor of rank >= 2,
//   S[o,i,k] *= ( m[o,i,k] / max(out_deg[o] * in_deg[i], 1) ) ^ exponent
// with out_deg[o] = sum_{i,k} m and in_deg[i] = sum_{o,k} m. Rank < 2 tensors are untouched.
// Degrees are counted once per tensor, then one parallel elementwise pass applies the factor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "widetopo/elementwise.h"

namespace widetopo {
namespace cpu {
namespace {

void density_decay_cpu(at::TensorList scores, at::TensorList masks, double exponent) {
  args::check_density_decay(scores, masks, exponent, at::kCPU);
  for (size_t j = 0; j < scores.size(); ++j) {
    if (scores[j].dim() < 2 || scores[j].numel() == 0) continue;
    const OIK d = oik_of(scores[j]);
    const at::Tensor m = masks[j].contiguous();
    const bool* mp = m.const_data_ptr<bool>();
    std::vector<int64_t> out_deg(d.O), in_deg(d.I);
    unit_degrees(mp, d, out_deg.data(), in_deg.data());
    // For a kept entry out_deg[o], in_deg[i] >= 1, so the factor splits into per-unit parts:
    // one pow per unit instead of one per element (core::decay_unit_factor).
    std::vector<double> out_f(d.O), in_f(d.I);
    for (int64_t o = 0; o < d.O; ++o) out_f[o] = core::decay_unit_factor(out_deg[o], exponent);
    for (int64_t i = 0; i < d.I; ++i) in_f[i] = core::decay_unit_factor(in_deg[i], exponent);
    Writable w(scores[j]);
    const int64_t row = d.I * d.K;
    const int64_t grain_rows = std::max<int64_t>(1, kGrain / std::max<int64_t>(row, 1));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.work.scalar_type(), "density_decay_", [&] {
      scalar_t* sp = w.work.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, d.O, grain_rows, [&](int64_t o0, int64_t o1) {
        for (int64_t o = o0; o < o1; ++o) {
          if (d.K == 1) {  // 1x1 convolutions and linear layers
            scalar_t* r = sp + o * row;
            const bool* mr = mp + o * row;
            const double fo = out_f[o];
            for (int64_t i = 0; i < d.I; ++i) {
              const double fk = mr[i] ? fo * in_f[i] : 0.0;
              r[i] = static_cast<scalar_t>(static_cast<double>(r[i]) * fk);
            }
            continue;
          }
          for (int64_t i = 0; i < d.I; ++i) {
            const double f = out_f[o] * in_f[i];
            const int64_t base = o * row + i * d.K;
            for (int64_t k = 0; k < d.K; ++k) {
              const double fk = mp[base + k] ? f : 0.0;  // decay_factor(m, out_deg, in_deg, e)
              sp[base + k] = static_cast<scalar_t>(static_cast<double>(sp[base + k]) * fk);
            }
          }
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
