// Shared pieces of the CUDA kernels (device-side helpers live here, not in csrc/include):
//  - call_device: the device an op's arguments are checked against (the checks themselves,
//    OIK and Writable are shared with the CPU backend: csrc/common/arguments.h);
//  - the multi-tensor launch: up to ListMeta<D>::kMaxTensors tensors per launch, their
//    addresses / sizes passed by value as one kernel argument (__grid_constant__), grid over
//    (tensor, chunk) pairs. A block finds its tensor by a binary search of the cumulative
//    chunk counts, so one huge tensor and hundreds of tiny ones cost the same per element;
//  - block reductions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "../common/arguments.h"

namespace widetopo {
namespace cuda {

constexpr int kThreads = 256;             // threads per block of every multi-tensor kernel
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kChunk = 16384;         // elements per (tensor, chunk) block, elementwise ops
constexpr int64_t kMaxGridX = 2147483647; // CUDA limit of gridDim.x

// ---------------------------------------------------------------------------------------------
// argument checks
// ---------------------------------------------------------------------------------------------
// The device of a call: that of the first tensor of its main list. Only reached through the
// CUDA dispatch key, so some argument is a CUDA tensor; args::check_* do the rest.
inline at::Device call_device(at::TensorList main, at::TensorList other = {}) {
  if (!main.empty() && main[0].defined()) return main[0].device();
  if (!other.empty() && other[0].defined()) return other[0].device();
  return at::Device(at::kCUDA, c10::cuda::current_device());
}

using args::OIK;
using args::oik_of;
using args::Writable;

// ---------------------------------------------------------------------------------------------
// multi-tensor launch
// ---------------------------------------------------------------------------------------------
// Tensors per launch so that the argument struct stays below the classic 4 KB kernel-parameter
// limit: per tensor D pointers + numel + chunk_end + 2 aux words + index.
template <int D>
struct ListMetaSize {
  static constexpr int kPerTensor = D * 8 + 4 * 8 + 4;
  static constexpr int kFit = (4096 - 64) / kPerTensor;
  static constexpr int value = kFit < 64 ? kFit : 64;
};

template <int D>
struct ListMeta {
  static constexpr int kMaxTensors = ListMetaSize<D>::value;
  void* ptr[D][kMaxTensors];           // D data pointers per tensor (nullptr when unused)
  int64_t numel[kMaxTensors];          // elements of the tensor
  int64_t chunk_end[kMaxTensors];      // cumulative chunk count of this launch, inclusive
  int64_t aux0[kMaxTensors];           // op-specific (e.g. I of an (O, I, K) tensor)
  int64_t aux1[kMaxTensors];           // op-specific (e.g. K)
  int64_t chunk_base;                  // global id of this launch's first chunk
  int32_t index[kMaxTensors];          // position of the tensor in the op's argument list
  int32_t count;                       // tensors in this launch
};
static_assert(sizeof(ListMeta<1>) <= 4096, "kernel argument too large");
static_assert(sizeof(ListMeta<2>) <= 4096, "kernel argument too large");
static_assert(sizeof(ListMeta<3>) <= 4096, "kernel argument too large");
static_assert(sizeof(ListMeta<4>) <= 4096, "kernel argument too large");
static_assert(sizeof(ListMeta<5>) <= 4096, "kernel argument too large");

// Host-side description of one tensor of a multi-tensor launch.
template <int D>
struct TensorEntry {
  void* ptr[D];
  int64_t numel;
  int64_t aux0;
  int64_t aux1;
  int32_t index;
};

inline int64_t chunks_of(int64_t numel, int64_t chunk) { return (numel + chunk - 1) / chunk; }

// Total number of (tensor, chunk) blocks of a list (empty tensors contribute none).
template <int D>
int64_t count_chunks(const std::vector<TensorEntry<D>>& entries, int64_t chunk) {
  int64_t total = 0;
  for (const auto& e : entries) total += chunks_of(e.numel, chunk);
  return total;
}

// Packs `entries` (in order) into launches and calls launch(meta, blocks) for each; chunk ids
// (meta.chunk_base + blockIdx.x) are global over the whole list and follow (tensor, flat index)
// order. Empty tensors are skipped. Nothing is launched for an empty list.
template <int D, typename F>
void multi_tensor_launch(const std::vector<TensorEntry<D>>& entries, int64_t chunk, const F& launch) {
  ListMeta<D> meta;
  meta.count = 0;
  meta.chunk_base = 0;
  int64_t global = 0, in_launch = 0;
  for (const auto& e : entries) {
    if (e.numel == 0) continue;
    const int64_t c = chunks_of(e.numel, chunk);
    TORCH_CHECK(c <= kMaxGridX, "widetopo: tensor ", e.index, " is too large for one launch");
    if (meta.count == ListMeta<D>::kMaxTensors || in_launch + c > kMaxGridX) {
      launch(meta, in_launch);
      meta.count = 0;
      meta.chunk_base = global;
      in_launch = 0;
    }
    const int s = meta.count++;
    for (int d = 0; d < D; ++d) meta.ptr[d][s] = e.ptr[d];
    meta.numel[s] = e.numel;
    meta.aux0[s] = e.aux0;
    meta.aux1[s] = e.aux1;
    meta.index[s] = e.index;
    in_launch += c;
    global += c;
    meta.chunk_end[s] = in_launch;
  }
  if (meta.count > 0) launch(meta, in_launch);
}

// The (tensor, chunk) pair of this block: slot in the launch and the element range [begin, end).
struct BlockTask {
  int slot;
  int64_t begin;
  int64_t end;
};

template <int D>
__device__ __forceinline__ BlockTask locate_block(const ListMeta<D>& meta, int64_t chunk) {
  const int64_t b = static_cast<int64_t>(blockIdx.x);
  int lo = 0, hi = meta.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (meta.chunk_end[mid] <= b) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int64_t first = lo > 0 ? meta.chunk_end[lo - 1] : 0;
  BlockTask t;
  t.slot = lo;
  t.begin = (b - first) * chunk;
  const int64_t end = t.begin + chunk;
  t.end = end < meta.numel[lo] ? end : meta.numel[lo];
  return t;
}

// Sum over the block (blockDim.x == kThreads); the result is valid in thread 0 only.
// Every thread of the block must call it. Fixed reduction order: deterministic.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_sums[kWarps];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  }
  __syncthreads();
  return total;
}

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

}  // namespace cuda
}  // namespace widetopo
