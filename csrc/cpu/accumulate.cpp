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
  constexpr const char* op = "accumulate_score_";
  check_same_length(scores, a, op, "scores", "a");
  const bool has_b = !b.empty(), has_m = !masks.empty();
  if (has_b) check_same_length(scores, b, op, "scores", "b (or an empty list)");
  if (has_m) check_same_length(scores, masks, op, "scores", "masks (or an empty list)");
  for (size_t j = 0; j < scores.size(); ++j) {
    check_cpu(scores[j], op, "scores", j);
    check_writable(scores[j], op, "scores", j);
    check_score_dtype(scores[j], op, "scores", j);
    check_cpu(a[j], op, "a", j);
    check_score_dtype(a[j], op, "a", j);
    check_same_shape(a[j], scores[j], op, "a", "scores", j);
    if (has_b) {
      check_cpu(b[j], op, "b", j);
      check_score_dtype(b[j], op, "b", j);
      check_same_shape(b[j], scores[j], op, "b", "scores", j);
    }
    if (has_m) check_mask(masks[j], scores[j], op, "masks", "scores", j);
  }
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
  constexpr const char* op = "masked_sq_norm";
  const bool has_m = !masks.empty();
  if (has_m) check_same_length(tensors, masks, op, "tensors", "masks (or an empty list)");
  at::ScalarType st = at::kFloat;
  for (size_t j = 0; j < tensors.size(); ++j) {
    check_cpu(tensors[j], op, "tensors", j);
    check_score_dtype(tensors[j], op, "tensors", j);
    if (j == 0) st = tensors[0].scalar_type();
    TORCH_CHECK(tensors[j].scalar_type() == st, "widetopo::masked_sq_norm: tensors[", j,
                "] has dtype ", tensors[j].scalar_type(), " but tensors[0] has dtype ", st,
                "; all tensors of one call must share a dtype");
    if (has_m) check_mask(masks[j], tensors[j], op, "masks", "tensors", j);
  }
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
