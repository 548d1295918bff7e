// CPU kernel of widetopo::restoration_scores (docs/design.md §2.3). Float32 output per mask:
//   rank >= 2: kept -> 2; pruned -> (1 - out_density[o]) (1 - in_density[i]) + scale * noise[o, i]
//              out_density[o] = out_deg[o] / (I K), in_density[i] = in_deg[i] / (O K)
//   rank < 2:  kept -> 2; pruned -> 1 (noise ignored).
#include <ATen/ATen.h>
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

std::vector<at::Tensor> restoration_scores_cpu(at::TensorList masks, at::TensorList noise,
                                               double noise_scale) {
  args::check_restoration_scores(masks, noise, noise_scale, at::kCPU);
  const float scale = static_cast<float>(noise_scale);
  std::vector<at::Tensor> out;
  out.reserve(masks.size());
  for (size_t j = 0; j < masks.size(); ++j) {
    const at::Tensor m = masks[j].contiguous();
    at::Tensor s = at::empty(m.sizes(), m.options().dtype(at::kFloat));
    const bool* mp = m.const_data_ptr<bool>();
    float* sp = s.mutable_data_ptr<float>();
    if (m.dim() < 2) {
      at::parallel_for(0, m.numel(), kGrain, [&](int64_t b, int64_t e) {
        for (int64_t x = b; x < e; ++x) sp[x] = core::restoration_score_rank1(mp[x]);
      });
    } else if (m.numel() > 0) {
      const OIK d = oik_of(m);
      std::vector<int64_t> out_deg(d.O), in_deg(d.I);
      unit_degrees(mp, d, out_deg.data(), in_deg.data());
      std::vector<float> out_den(d.O), in_den(d.I);
      const float ik = static_cast<float>(d.I * d.K), ok = static_cast<float>(d.O * d.K);
      for (int64_t o = 0; o < d.O; ++o) out_den[o] = static_cast<float>(out_deg[o]) / ik;
      for (int64_t i = 0; i < d.I; ++i) in_den[i] = static_cast<float>(in_deg[i]) / ok;
      const at::Tensor nz = noise[j].contiguous();
      const float* np = nz.const_data_ptr<float>();
      const int64_t row = d.I * d.K;
      const int64_t grain_rows = std::max<int64_t>(1, kGrain / std::max<int64_t>(row, 1));
      at::parallel_for(0, d.O, grain_rows, [&](int64_t o0, int64_t o1) {
        for (int64_t o = o0; o < o1; ++o) {
          for (int64_t i = 0; i < d.I; ++i) {
            const float n = np[o * d.I + i];
            const int64_t base = o * row + i * d.K;
            for (int64_t k = 0; k < d.K; ++k) {
              sp[base + k] = core::restoration_score(mp[base + k], out_den[o], in_den[i], n, scale);
            }
          }
        }
      });
    }
    out.push_back(s);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(widetopo, CPU, m) { m.impl("restoration_scores", &restoration_scores_cpu); }

}  // namespace cpu
}  // namespace widetopo
