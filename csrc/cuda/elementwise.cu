// CUDA kernels of the per-element ops (multi-tensor launches, see common.cuh):
//   widetopo::accumulate_score_:  S += |a * b * m|  (absolute)  or  S += a * b * m
//   widetopo::masked_sq_norm:     sum_j ||t_j * m_j||^2 (0-d; float32 for 16-bit inputs)
//   widetopo::apply_masks_:       t <- m ? t : 0 (selection on the raw bits: NaN/inf -> 0 too)
// An empty `b` list means b = 1, an empty `masks` list means m = 1. No host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <map>
#include <vector>

#include "common.cuh"
#include "widetopo/elementwise.h"

namespace widetopo {
namespace cuda {
namespace {

constexpr int kReduceThreads = 1024;

// ---------------------------------------------------------------------------------------------
// accumulate_score_
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(const __grid_constant__ ListMeta<4> meta, bool absolute) {
  using opmath_t = at::opmath_type<scalar_t>;
  const BlockTask t = locate_block(meta, kChunk);
  scalar_t* s = static_cast<scalar_t*>(meta.ptr[0][t.slot]);
  const scalar_t* a = static_cast<const scalar_t*>(meta.ptr[1][t.slot]);
  const scalar_t* b = static_cast<const scalar_t*>(meta.ptr[2][t.slot]);  // nullptr: b = 1
  const bool* m = static_cast<const bool*>(meta.ptr[3][t.slot]);          // nullptr: m = 1
  for (int64_t e = t.begin + threadIdx.x; e < t.end; e += kThreads) {
    const opmath_t bv = b ? static_cast<opmath_t>(b[e]) : opmath_t(1);
    const bool kept = m ? m[e] : true;
    s[e] = static_cast<scalar_t>(core::accumulate_score<opmath_t>(
        static_cast<opmath_t>(s[e]), static_cast<opmath_t>(a[e]), bv, kept, absolute));
  }
}

void accumulate_score_cuda(at::TensorList scores, at::TensorList a, at::TensorList b,
                           at::TensorList masks, bool absolute) {
  const bool has_b = !b.empty(), has_m = !masks.empty();
  const at::Device device = call_device(scores, a);
  args::check_accumulate_score(scores, a, b, masks, device);
  if (scores.empty()) return;
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = current_stream();

  // Working copies: a, b converted to the score dtype, contiguous. They are released after
  // the launches were enqueued, which the caching allocator makes safe on this stream.
  std::vector<Writable> work;
  std::vector<at::Tensor> keep_alive;
  work.reserve(scores.size());
  std::map<at::ScalarType, std::vector<TensorEntry<4>>> groups;  // one launch set per dtype
  for (size_t j = 0; j < scores.size(); ++j) {
    work.emplace_back(scores[j]);
    if (scores[j].numel() == 0) continue;
    const auto st = scores[j].scalar_type();
    const at::Tensor aj = a[j].to(st).contiguous();
    const at::Tensor bj = has_b ? b[j].to(st).contiguous() : at::Tensor();
    const at::Tensor mj = has_m ? masks[j].contiguous() : at::Tensor();
    TensorEntry<4> e;
    e.ptr[0] = work.back().work.mutable_data_ptr();
    e.ptr[1] = const_cast<void*>(aj.const_data_ptr());
    e.ptr[2] = has_b ? const_cast<void*>(bj.const_data_ptr()) : nullptr;
    e.ptr[3] = has_m ? const_cast<void*>(mj.const_data_ptr()) : nullptr;
    e.numel = scores[j].numel();
    e.aux0 = e.aux1 = 0;
    e.index = static_cast<int32_t>(j);
    groups[st].push_back(e);
    keep_alive.push_back(aj);
    if (has_b) keep_alive.push_back(bj);
    if (has_m) keep_alive.push_back(mj);
  }
  for (const auto& g : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.first, "accumulate_score_cuda", [&] {
      multi_tensor_launch<4>(g.second, kChunk, [&](const ListMeta<4>& meta, int64_t blocks) {
        accumulate_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(meta, absolute);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  for (auto& w : work) w.finish();
}

// ---------------------------------------------------------------------------------------------
// masked_sq_norm: per-block partial sums in double (one slot per global chunk), then one block
// adds them in a fixed order - deterministic, no atomics on floats.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sq_norm_partial_kernel(const __grid_constant__ ListMeta<2> meta, double* partials) {
  const BlockTask t = locate_block(meta, kChunk);
  const scalar_t* x = static_cast<const scalar_t*>(meta.ptr[0][t.slot]);
  const bool* m = static_cast<const bool*>(meta.ptr[1][t.slot]);  // nullptr: m = 1
  double s = 0.0;
  for (int64_t e = t.begin + threadIdx.x; e < t.end; e += kThreads) {
    s += core::masked_square<double>(static_cast<double>(x[e]), m ? m[e] : true);
  }
  s = block_sum<double>(s);
  if (threadIdx.x == 0) partials[meta.chunk_base + blockIdx.x] = s;
}

template <typename out_t>
__global__ void __launch_bounds__(kReduceThreads)
    sum_partials_kernel(const double* partials, int64_t n, out_t* out) {
  __shared__ double s[kReduceThreads];
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) v += partials[i];
  s[threadIdx.x] = v;
  __syncthreads();
  for (int width = kReduceThreads / 2; width > 0; width >>= 1) {
    if (threadIdx.x < static_cast<unsigned>(width)) s[threadIdx.x] += s[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = static_cast<out_t>(s[0]);
}

at::Tensor masked_sq_norm_cuda(at::TensorList tensors, at::TensorList masks) {
  const bool has_m = !masks.empty();
  const at::Device device = call_device(tensors, masks);
  const at::ScalarType st = args::check_masked_sq_norm(tensors, masks, device);
  const at::ScalarType out_st = (st == at::kHalf || st == at::kBFloat16) ? at::kFloat : st;
  c10::cuda::CUDAGuard guard(device);
  const auto out_opts = at::TensorOptions().dtype(out_st).device(device);
  std::vector<at::Tensor> keep_alive;
  std::vector<TensorEntry<2>> entries;
  for (size_t j = 0; j < tensors.size(); ++j) {
    if (tensors[j].numel() == 0) continue;
    const at::Tensor t = tensors[j].contiguous();
    const at::Tensor mj = has_m ? masks[j].contiguous() : at::Tensor();
    TensorEntry<2> e;
    e.ptr[0] = const_cast<void*>(t.const_data_ptr());
    e.ptr[1] = has_m ? const_cast<void*>(mj.const_data_ptr()) : nullptr;
    e.numel = t.numel();
    e.aux0 = e.aux1 = 0;
    e.index = static_cast<int32_t>(j);
    entries.push_back(e);
    keep_alive.push_back(t);
    if (has_m) keep_alive.push_back(mj);
  }
  const int64_t chunks = count_chunks(entries, kChunk);
  if (chunks == 0) return at::zeros({}, out_opts);
  cudaStream_t stream = current_stream();
  at::Tensor partials = at::empty({chunks}, at::TensorOptions().dtype(at::kDouble).device(device));
  at::Tensor out = at::empty({}, out_opts);
  double* pp = partials.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "masked_sq_norm_cuda", [&] {
    multi_tensor_launch<2>(entries, kChunk, [&](const ListMeta<2>& meta, int64_t blocks) {
      sq_norm_partial_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(meta, pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (out_st == at::kDouble) {
    sum_partials_kernel<double><<<1, kReduceThreads, 0, stream>>>(pp, chunks, out.data_ptr<double>());
  } else {
    sum_partials_kernel<float><<<1, kReduceThreads, 0, stream>>>(pp, chunks, out.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------------------------------------
// apply_masks_: selection on the raw storage (zero bits are the value 0 for every dtype).
// ---------------------------------------------------------------------------------------------
template <typename U>
__global__ void __launch_bounds__(kThreads) apply_masks_kernel(const __grid_constant__ ListMeta<2> meta) {
  const BlockTask t = locate_block(meta, kChunk);
  U* x = static_cast<U*>(meta.ptr[0][t.slot]);
  const bool* m = static_cast<const bool*>(meta.ptr[1][t.slot]);
  for (int64_t e = t.begin + threadIdx.x; e < t.end; e += kThreads) {
    x[e] = core::apply_mask<U>(x[e], m[e]);
  }
}

void apply_masks_cuda(at::TensorList tensors, at::TensorList masks) {
  const at::Device device = call_device(tensors, masks);
  args::check_apply_masks(tensors, masks, device);
  if (tensors.empty()) return;
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = current_stream();
  std::vector<Writable> work;
  std::vector<at::Tensor> keep_alive;
  work.reserve(tensors.size());
  std::vector<TensorEntry<2>> by_size[4];  // element size 1, 2, 4, 8
  for (size_t j = 0; j < tensors.size(); ++j) {
    work.emplace_back(tensors[j]);
    if (tensors[j].numel() == 0) continue;
    const at::Tensor mj = masks[j].contiguous();
    keep_alive.push_back(mj);
    TensorEntry<2> e;
    e.ptr[0] = work.back().work.mutable_data_ptr();
    e.ptr[1] = const_cast<void*>(mj.const_data_ptr());
    e.numel = tensors[j].numel();
    e.aux0 = e.aux1 = 0;
    e.index = static_cast<int32_t>(j);
    const int64_t es = tensors[j].element_size();
    by_size[es == 1 ? 0 : es == 2 ? 1 : es == 4 ? 2 : 3].push_back(e);
  }
  auto launch_all = [&](const std::vector<TensorEntry<2>>& entries, auto tag) {
    using U = decltype(tag);
    multi_tensor_launch<2>(entries, kChunk, [&](const ListMeta<2>& meta, int64_t blocks) {
      apply_masks_kernel<U><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(meta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  };
  launch_all(by_size[0], uint8_t(0));
  launch_all(by_size[1], uint16_t(0));
  launch_all(by_size[2], uint32_t(0));
  launch_all(by_size[3], uint64_t(0));
  for (auto& w : work) w.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(widetopo, CUDA, m) {
  m.impl("accumulate_score_", &accumulate_score_cuda);
  m.impl("masked_sq_norm", &masked_sq_norm_cuda);
  m.impl("apply_masks_", &apply_masks_cuda);
}

}  // namespace cuda
}  // namespace widetopo
