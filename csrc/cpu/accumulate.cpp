// CPU kernels of the gradient-score helpers:
//   widetopo::accumulate_score_:  S += |a * b * m|  (absolute)  or  S += a * b * m
//   widetopo::masked_sq_norm:     sum_j ||t_j * m_j||^2  (the Hutchinson trace estimate)
// An empty `b` list means b = 1, an empty `masks` list means m = 1.
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

void accumulate_score_cpu(at::TensorList scores, at::TensorList a, at::TensorList b,
                          at::TensorList masks, bool absolute) {
  args::check_accumulate_score(scores, a, b, masks, at::kCPU);
  const bool has_b = !b.empty(), has_m = !masks.empty();
  for (size_t j = 0; j < scores.size(); ++j) {
    if (scores[j].numel() == 0) continue;
    const auto st = scores[j].scalar_type();
    const at::Tensor aj = a[j].to(st).contiguous();
    const at::Tensor bj = has_b ? b[j].to(st).contiguous() : at::Tensor();
    const at::Tensor mj = has_m ? masks[j].contiguous() : at::Tensor();
    Writable w(scores[j]);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "accumulate_score_", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      scalar_t* sp = w.work.mutable_data_ptr<scalar_t>();
      const scalar_t* ap = aj.const_data_ptr<scalar_t>();
      const scalar_t* bp = has_b ? bj.const_data_ptr<scalar_t>() : nullptr;
      const bool* mp = has_m ? mj.const_data_ptr<bool>() : nullptr;
      at::parallel_for(0, w.work.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e) {
          const opmath_t bv = bp ? static_cast<opmath_t>(bp[e]) : opmath_t(1);
          const bool kept = mp ? mp[e] : true;
          sp[e] = static_cast<scalar_t>(core::accumulate_score<opmath_t>(
              static_cast<opmath_t>(sp[e]), static_cast<opmath_t>(ap[e]), bv, kept, absolute));
        }
      });
    });
    w.finish();
  }
}

// Sum in double over fixed blocks of kGrain elements, blocks added in order: the result
// does not depend on the number of threads.
at::Tensor masked_sq_norm_cpu(at::TensorList tensors, at::TensorList masks) {
  const at::ScalarType st = args::check_masked_sq_norm(tensors, masks, at::kCPU);
  const bool has_m = !masks.empty();
  const at::ScalarType out_st = (st == at::kHalf || st == at::kBFloat16) ? at::kFloat : st;
  double total = 0.0;
  for (size_t j = 0; j < tensors.size(); ++j) {
    const int64_t n = tensors[j].numel();
    if (n == 0) continue;
    const at::Tensor t = tensors[j].contiguous();
    const at::Tensor mj = has_m ? masks[j].contiguous() : at::Tensor();
    const int64_t nblocks = (n + kGrain - 1) / kGrain;
    std::vector<double> part(nblocks, 0.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "masked_sq_norm", [&] {
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      const bool* mp = has_m ? mj.const_data_ptr<bool>() : nullptr;
      at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t end = std::min(n, (blk + 1) * kGrain);
          double s = 0.0;
          for (int64_t e = blk * kGrain; e < end; ++e) {
            s += core::masked_square<double>(static_cast<double>(tp[e]), mp ? mp[e] : true);
          }
          part[blk] = s;
        }
      });
    });
    for (double p : part) total += p;
  }
  return at::scalar_tensor(total, at::TensorOptions().dtype(out_st));
}

}  // namespace

TORCH_LIBRARY_IMPL(widetopo, CPU, m) {
  m.impl("accumulate_score_", &accumulate_score_cpu);
  m.impl("masked_sq_norm", &masked_sq_norm_cpu);
}

}  // namespace cpu
}  // namespace widetopo
