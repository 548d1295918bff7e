// CUDA kernels of the ops that need per-unit degrees of a mask viewed as (O, I, K):
//   out_deg[o] = sum_{i,k} m[o,i,k],  in_deg[i] = sum_{o,k} m[o,i,k]
//   widetopo::density_decay_:     S *= decay_factor(m, out_deg[o], in_deg[i], exponent), rank >= 2,
//                                 evaluated as m ? f(out_deg) f(in_deg) : 0, f = decay_unit_factor
//   widetopo::restoration_scores: float32; restoration_score(m, out_deg/(I K), in_deg/(O K),
//                                 noise[o, i], scale) for rank >= 2, restoration_score_rank1(m)
//   widetopo::mask_stats:         int64 (n, 3): kept, #o with out_deg > 0, #i with in_deg > 0
//                                 (rank < 2: kept, kept, kept)
// Degrees: one multi-tensor pass over the masks into one zeroed int64 buffer for the whole list,
// with warp-aggregated atomics (lanes of a warp holding the same o (resp. i) add their count
// once: consecutive elements share o, and a run of K shares i). No host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

#include "common.cuh"
#include "widetopo/elementwise.h"

namespace widetopo {
namespace cuda {
namespace {

// Adds the kept count of each group of lanes sharing `key` (invalid lanes pass a key of their
// own, e.g. -1, and kept = false) to target[key], once per group.
__device__ __forceinline__ void warp_grouped_add(unsigned long long* target, long long key, bool kept) {
  const unsigned kept_lanes = __ballot_sync(kFullMask, kept);
  const unsigned peers = __match_any_sync(kFullMask, key);
  const int lane = threadIdx.x & 31;
  const int n = __popc(peers & kept_lanes);
  if (n > 0 && lane == __ffs(peers) - 1) atomicAdd(target + key, static_cast<unsigned long long>(n));
}

// ptr[0] = mask, ptr[1] = out_deg, ptr[2] = in_deg (both nullptr for rank < 2 tensors),
// aux0 = I, aux1 = K. If `stats` is set, also adds the kept count of the block to
// stats[index][0] (and to [1], [2] for rank < 2 tensors).
__global__ void __launch_bounds__(kThreads)
    degrees_kernel(const __grid_constant__ ListMeta<3> meta, long long* stats) {
  const BlockTask t = locate_block(meta, kChunk);
  const bool* m = static_cast<const bool*>(meta.ptr[0][t.slot]);
  unsigned long long* out_deg = static_cast<unsigned long long*>(meta.ptr[1][t.slot]);
  unsigned long long* in_deg = static_cast<unsigned long long*>(meta.ptr[2][t.slot]);
  const int64_t I = meta.aux0[t.slot], K = meta.aux1[t.slot], numel = meta.numel[t.slot];
  const bool units = out_deg != nullptr;  // uniform over the block
  long long kept_count = 0;
  for (int64_t base = t.begin; base < t.end; base += kThreads) {  // uniform trip count
    const int64_t e = base + threadIdx.x;
    const bool valid = e < t.end;
    const bool kept = valid && m[e];
    kept_count += kept ? 1 : 0;
    if (units) {
      long long o = -1, i = -1;
      if (valid) {
        const core::UnitIndex u = core::unit_index_of(e, numel, I, K);
        o = u.o;
        i = u.i;
      }
      warp_grouped_add(out_deg, o, kept);
      warp_grouped_add(in_deg, i, kept);
    }
  }
  if (stats != nullptr) {
    kept_count = block_sum<long long>(kept_count);
    if (threadIdx.x == 0 && kept_count > 0) {
      long long* row = stats + 3 * static_cast<int64_t>(meta.index[t.slot]);
      atomicAdd(reinterpret_cast<unsigned long long*>(row), static_cast<unsigned long long>(kept_count));
      if (!units) {
        atomicAdd(reinterpret_cast<unsigned long long*>(row + 1), static_cast<unsigned long long>(kept_count));
        atomicAdd(reinterpret_cast<unsigned long long*>(row + 2), static_cast<unsigned long long>(kept_count));
      }
    }
  }
}

// Degrees of a list of masks; rank >= 2 non-empty masks get O + I words of `deg`.
struct Degrees {
  at::Tensor deg;                      // int64, zero-initialised, sum of (O + I)
  std::vector<int64_t> offset;         // per mask: word offset of out_deg (in_deg follows), or -1
  std::vector<OIK> dims;               // per mask (rank >= 2 only meaningful)
  std::vector<at::Tensor> masks;       // contiguous masks (kept alive)

  unsigned long long* out_deg(size_t j) const {
    return reinterpret_cast<unsigned long long*>(deg.data_ptr<int64_t>() + offset[j]);
  }
  unsigned long long* in_deg(size_t j) const { return out_deg(j) + dims[j].O; }
};

// Counts degrees of every rank >= 2 mask (and, with `stats`, the kept counts of all masks).
Degrees compute_degrees(at::TensorList masks, const at::Device& device, long long* stats,
                        cudaStream_t stream) {
  Degrees d;
  int64_t words = 0;
  d.offset.assign(masks.size(), -1);
  d.dims.assign(masks.size(), OIK{0, 0, 0});
  for (size_t j = 0; j < masks.size(); ++j) {
    d.masks.push_back(masks[j].contiguous());
    if (masks[j].dim() >= 2 && masks[j].numel() > 0) {
      d.dims[j] = oik_of(masks[j]);
      d.offset[j] = words;
      words += d.dims[j].O + d.dims[j].I;
    }
  }
  d.deg = at::zeros({words}, at::TensorOptions().dtype(at::kLong).device(device));
  std::vector<TensorEntry<3>> entries;
  for (size_t j = 0; j < masks.size(); ++j) {
    const bool units = d.offset[j] >= 0;
    if (!units && stats == nullptr) continue;  // rank < 2 masks only matter for the stats
    TensorEntry<3> e;
    e.ptr[0] = const_cast<void*>(d.masks[j].const_data_ptr());
    e.ptr[1] = units ? d.out_deg(j) : nullptr;
    e.ptr[2] = units ? d.in_deg(j) : nullptr;
    e.numel = masks[j].numel();
    e.aux0 = units ? d.dims[j].I : 0;
    e.aux1 = units ? d.dims[j].K : 0;
    e.index = static_cast<int32_t>(j);
    entries.push_back(e);
  }
  multi_tensor_launch<3>(entries, kChunk, [&](const ListMeta<3>& meta, int64_t blocks) {
    degrees_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(meta, stats);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return d;
}

// ---------------------------------------------------------------------------------------------
// density_decay_
// ---------------------------------------------------------------------------------------------
// In place over the whole degree buffer: deg -> core::decay_unit_factor(deg, exponent), stored
// as double in the same 8-byte word. For a kept entry both degrees are >= 1, so
// decay_factor(m, out_deg, in_deg, e) = m ? out_f[o] * in_f[i] : 0: one pow per unit, not per
// element (the CPU kernel does the same, so both round alike).
__global__ void unit_factor_kernel(long long* deg, int64_t n, double exponent) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < n; x += stride) {
    const double f = core::decay_unit_factor(static_cast<int64_t>(deg[x]), exponent);
    deg[x] = __double_as_longlong(f);
  }
}

// ptr[0] = scores, ptr[1] = mask, ptr[2] = out_f, ptr[3] = in_f (double); aux0 = I, aux1 = K.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    decay_kernel(const __grid_constant__ ListMeta<4> meta) {
  const BlockTask t = locate_block(meta, kChunk);
  scalar_t* s = static_cast<scalar_t*>(meta.ptr[0][t.slot]);
  const bool* m = static_cast<const bool*>(meta.ptr[1][t.slot]);
  const double* out_f = static_cast<const double*>(meta.ptr[2][t.slot]);
  const double* in_f = static_cast<const double*>(meta.ptr[3][t.slot]);
  const int64_t I = meta.aux0[t.slot], K = meta.aux1[t.slot], numel = meta.numel[t.slot];
  for (int64_t e = t.begin + threadIdx.x; e < t.end; e += kThreads) {
    const core::UnitIndex u = core::unit_index_of(e, numel, I, K);
    const double f = m[e] ? out_f[u.o] * in_f[u.i] : 0.0;  // = decay_factor(m, out_deg, in_deg, e)
    s[e] = static_cast<scalar_t>(static_cast<double>(s[e]) * f);
  }
}

void density_decay_cuda(at::TensorList scores, at::TensorList masks, double exponent) {
  const at::Device device = call_device(scores, masks);
  args::check_density_decay(scores, masks, exponent, device);
  if (scores.empty()) return;
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = current_stream();
  // Only rank >= 2 masks take part; rank < 2 scores are untouched.
  std::vector<at::Tensor> unit_masks;
  std::vector<size_t> unit_index;
  for (size_t j = 0; j < scores.size(); ++j) {
    if (scores[j].dim() >= 2 && scores[j].numel() > 0) {
      unit_masks.push_back(masks[j]);
      unit_index.push_back(j);
    }
  }
  if (unit_masks.empty()) return;
  const Degrees d = compute_degrees(unit_masks, device, nullptr, stream);
  const int64_t words = d.deg.numel();
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((words + kThreads - 1) / kThreads, 4096));
  unit_factor_kernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<long long*>(d.deg.data_ptr<int64_t>()),
                                                     words, exponent);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  std::vector<Writable> work;
  work.reserve(unit_masks.size());
  std::map<at::ScalarType, std::vector<TensorEntry<4>>> groups;
  for (size_t u = 0; u < unit_masks.size(); ++u) {
    const size_t j = unit_index[u];
    work.emplace_back(scores[j]);
    TensorEntry<4> e;
    e.ptr[0] = work.back().work.mutable_data_ptr();
    e.ptr[1] = const_cast<void*>(d.masks[u].const_data_ptr());
    e.ptr[2] = d.out_deg(u);
    e.ptr[3] = d.in_deg(u);
    e.numel = scores[j].numel();
    e.aux0 = d.dims[u].I;
    e.aux1 = d.dims[u].K;
    e.index = static_cast<int32_t>(j);
    groups[scores[j].scalar_type()].push_back(e);
  }
  for (const auto& g : groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.first, "density_decay_cuda", [&] {
      multi_tensor_launch<4>(g.second, kChunk, [&](const ListMeta<4>& meta, int64_t blocks) {
        decay_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(meta);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  for (auto& w : work) w.finish();
}

// ---------------------------------------------------------------------------------------------
// restoration_scores
// ---------------------------------------------------------------------------------------------
// ptr[0] = out (float), ptr[1] = mask, ptr[2] = out_deg, ptr[3] = in_deg, ptr[4] = noise (O, I);
// aux0 = I, aux1 = K; rank < 2 tensors have ptr[2] = nullptr.
__global__ void __launch_bounds__(kThreads) restoration_kernel(const __grid_constant__ ListMeta<5> meta,
                                                              float noise_scale) {
  const BlockTask t = locate_block(meta, kChunk);
  float* out = static_cast<float*>(meta.ptr[0][t.slot]);
  const bool* m = static_cast<const bool*>(meta.ptr[1][t.slot]);
  const unsigned long long* out_deg = static_cast<const unsigned long long*>(meta.ptr[2][t.slot]);
  if (out_deg == nullptr) {
    for (int64_t e = t.begin + threadIdx.x; e < t.end; e += kThreads) out[e] = core::restoration_score_rank1(m[e]);
    return;
  }
  const unsigned long long* in_deg = static_cast<const unsigned long long*>(meta.ptr[3][t.slot]);
  const float* noise = static_cast<const float*>(meta.ptr[4][t.slot]);
  const int64_t I = meta.aux0[t.slot], K = meta.aux1[t.slot];
  const int64_t O = meta.numel[t.slot] / (I * K);
  const float ik = static_cast<float>(I * K), ok = static_cast<float>(O * K);
  const int64_t numel = meta.numel[t.slot];
  for (int64_t e = t.begin + threadIdx.x; e < t.end; e += kThreads) {
    const core::UnitIndex u = core::unit_index_of(e, numel, I, K);
    const float out_den = static_cast<float>(static_cast<int64_t>(out_deg[u.o])) / ik;
    const float in_den = static_cast<float>(static_cast<int64_t>(in_deg[u.i])) / ok;
    out[e] = core::restoration_score(m[e], out_den, in_den, noise[u.o * I + u.i], noise_scale);
  }
}

std::vector<at::Tensor> restoration_scores_cuda(at::TensorList masks, at::TensorList noise,
                                                double noise_scale) {
  const at::Device device = call_device(masks, noise);
  args::check_restoration_scores(masks, noise, noise_scale, device);
  std::vector<at::Tensor> out;
  out.reserve(masks.size());
  if (masks.empty()) return out;
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = current_stream();
  const Degrees d = compute_degrees(masks, device, nullptr, stream);
  std::vector<at::Tensor> keep_alive;
  std::vector<TensorEntry<5>> entries;
  for (size_t j = 0; j < masks.size(); ++j) {
    out.push_back(at::empty(masks[j].sizes(), at::TensorOptions().dtype(at::kFloat).device(device)));
    if (masks[j].numel() == 0) continue;
    TensorEntry<5> e;
    e.ptr[0] = out.back().mutable_data_ptr();
    e.ptr[1] = const_cast<void*>(d.masks[j].const_data_ptr());
    e.ptr[2] = e.ptr[3] = e.ptr[4] = nullptr;
    e.aux0 = e.aux1 = 0;
    if (d.offset[j] >= 0) {
      const at::Tensor nz = noise[j].contiguous();
      keep_alive.push_back(nz);
      e.ptr[2] = d.out_deg(j);
      e.ptr[3] = d.in_deg(j);
      e.ptr[4] = const_cast<void*>(nz.const_data_ptr());
      e.aux0 = d.dims[j].I;
      e.aux1 = d.dims[j].K;
    }
    e.numel = masks[j].numel();
    e.index = static_cast<int32_t>(j);
    entries.push_back(e);
  }
  const float scale = static_cast<float>(noise_scale);
  multi_tensor_launch<5>(entries, kChunk, [&](const ListMeta<5>& meta, int64_t blocks) {
    restoration_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(meta, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// mask_stats
// ---------------------------------------------------------------------------------------------
// ptr[0] = degrees of one mask (out_deg then in_deg), numel = O + I, aux0 = O.
__global__ void __launch_bounds__(kThreads)
    active_units_kernel(const __grid_constant__ ListMeta<1> meta, long long* stats) {
  const BlockTask t = locate_block(meta, kChunk);
  const long long* deg = static_cast<const long long*>(meta.ptr[0][t.slot]);
  const int64_t O = meta.aux0[t.slot];
  long long act_o = 0, act_i = 0;
  for (int64_t x = t.begin + threadIdx.x; x < t.end; x += kThreads) {
    if (deg[x] > 0) {
      if (x < O) {
        ++act_o;
      } else {
        ++act_i;
      }
    }
  }
  act_o = block_sum<long long>(act_o);
  act_i = block_sum<long long>(act_i);
  if (threadIdx.x == 0) {
    long long* row = stats + 3 * static_cast<int64_t>(meta.index[t.slot]);
    if (act_o > 0) atomicAdd(reinterpret_cast<unsigned long long*>(row + 1), static_cast<unsigned long long>(act_o));
    if (act_i > 0) atomicAdd(reinterpret_cast<unsigned long long*>(row + 2), static_cast<unsigned long long>(act_i));
  }
}

at::Tensor mask_stats_cuda(at::TensorList masks) {
  const at::Device device = call_device(masks);
  args::check_mask_stats(masks, device);
  c10::cuda::CUDAGuard guard(device);
  const int64_t n = static_cast<int64_t>(masks.size());
  at::Tensor out = at::zeros({n, 3}, at::TensorOptions().dtype(at::kLong).device(device));
  if (n == 0) return out;
  cudaStream_t stream = current_stream();
  long long* stats = reinterpret_cast<long long*>(out.data_ptr<int64_t>());
  const Degrees d = compute_degrees(masks, device, stats, stream);
  std::vector<TensorEntry<1>> entries;
  for (size_t j = 0; j < masks.size(); ++j) {
    if (d.offset[j] < 0) continue;
    TensorEntry<1> e;
    e.ptr[0] = d.out_deg(j);
    e.numel = d.dims[j].O + d.dims[j].I;
    e.aux0 = d.dims[j].O;
    e.aux1 = 0;
    e.index = static_cast<int32_t>(j);
    entries.push_back(e);
  }
  multi_tensor_launch<1>(entries, kChunk, [&](const ListMeta<1>& meta, int64_t blocks) {
    active_units_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(meta, stats);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(widetopo, CUDA, m) {
  m.impl("density_decay_", &density_decay_cuda);
  m.impl("restoration_scores", &restoration_scores_cuda);
  m.impl("mask_stats", &mask_stats_cuda);
}

}  // namespace cuda
}  // namespace widetopo
