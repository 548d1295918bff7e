// CUDA kernel of widetopo::global_threshold: keep the `keep` highest scores over a list of
// tensors and write the bool masks in place.
//
// Selection: most-significant-digit-first radix select on the order-preserving keys of
// widetopo/radix.h, 8-bit digits (2 / 4 / 8 passes for 16 / 32 / 64-bit scores). Each pass is
//   1. histogram_kernel (multi-tensor): every block builds a 256-bin histogram of the digit of
//      the keys that match the prefix fixed so far, in shared memory (warp-aggregated atomics,
//      so long runs of equal scores - e.g. all pruned scores = 0 - do not serialise), and adds
//      its non-zero bins to a global 256-bin histogram with atomics. Pass 1 also checks that
//      every score is finite and records the smallest offending tensor index;
//   2. select_kernel (one block): finds the bin holding the keep-th largest key and updates
//      the device-side state (prefix, remaining rank).
// After the last pass the prefix is the key of the cut value c, and r = keep - #(key > c) is
// the number of ties (key == c) still to keep. Both modes cut at the keep-th largest score:
// "official" prunes every score <= sorted_ascending[N - keep], which is the same value.
// Ties ("exact", only when not all ties are kept, decided on the device): tie_count_kernel
// counts ties per (tensor, chunk) block, scan_kernel turns the counts into an exclusive prefix
// sum (one block), and write_masks_kernel keeps a tie while its rank in (tensor, flat index)
// order is < r (block-wide ballot scan within a chunk).
//
// Synchronisation: all state stays on the device between kernels; the host waits once, at the
// end, for a 48-byte copy of the state (the error flag). If any score is non-finite, the
// mask-writing kernel writes nothing and the op raises - the caller's masks are unchanged.
// Extra memory: 48 B state + passes * 256 * 8 B histograms + 8 B per chunk (exact mode).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <climits>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common.cuh"
#include "widetopo/radix.h"

namespace widetopo {
namespace cuda {
namespace {

constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
static_assert(kBins == kThreads, "one histogram bin per thread");
constexpr int64_t kSelectChunk = 32768;  // elements per (tensor, chunk) block
constexpr int kScanThreads = 1024;
constexpr long long kNoError = LLONG_MAX;

// Device-side state of the select, at the start of the int64 workspace.
struct SelectState {
  unsigned long long prefix;  // key digits fixed so far (the cut key after the last pass)
  long long remaining;        // rank of the cut from the top among keys matching the prefix
  long long bad_tensor;       // smallest index of a tensor with a non-finite score, or kNoError
  long long ties_total;       // entries with key == cut (after the last pass)
  long long all_ties_kept;    // remaining == ties_total: no tie ordering needed
  long long failed;           // internal: no bin found (only possible with non-finite scores)
};
constexpr int64_t kStateWords = 8;
static_assert(sizeof(SelectState) <= kStateWords * 8, "state does not fit");

enum WriteMode : int { kWriteNone = 0, kWriteOfficial = 1, kWriteExact = 2 };

// Raw-bit view of each score dtype.
template <typename T>
struct KeyTraits;
template <>
struct KeyTraits<float> {
  using U = uint32_t;
  static constexpr U kExponentMask = 0x7F800000u;
  __device__ static double to_double(U b) { return static_cast<double>(__uint_as_float(b)); }
};
template <>
struct KeyTraits<double> {
  using U = uint64_t;
  static constexpr U kExponentMask = 0x7FF0000000000000ull;
  __device__ static double to_double(U b) { return __longlong_as_double(static_cast<long long>(b)); }
};
template <>
struct KeyTraits<c10::Half> {
  using U = uint16_t;
  static constexpr U kExponentMask = 0x7C00u;
  __device__ static double to_double(U b) {
    return static_cast<double>(static_cast<float>(c10::Half(b, c10::Half::from_bits())));
  }
};
template <>
struct KeyTraits<c10::BFloat16> {
  using U = uint16_t;
  static constexpr U kExponentMask = 0x7F80u;
  __device__ static double to_double(U b) {
    return static_cast<double>(__uint_as_float(static_cast<uint32_t>(b) << 16));
  }
};

__global__ void init_state_kernel(SelectState* st, unsigned long long* hist, int64_t hist_words,
                                  long long keep) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x < hist_words) hist[x] = 0ull;
  if (x == 0) {
    st->prefix = 0ull;
    st->remaining = keep;
    st->bad_tensor = kNoError;
    st->ties_total = 0;
    st->all_ties_kept = 0;
    st->failed = 0;
  }
}

// One histogram pass over every (tensor, chunk) block; see the file comment.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const __grid_constant__ ListMeta<2> meta, SelectState* st,
                     unsigned long long* hist, int shift, bool check_finite) {
  using Tr = KeyTraits<scalar_t>;
  using U = typename Tr::U;
  __shared__ unsigned int local[kBins];
  local[threadIdx.x] = 0u;
  __syncthreads();

  const U prefix = static_cast<U>(st->prefix);
  const int fixed_shift = shift + kDigitBits;  // bits at or above it are fixed
  const BlockTask t = locate_block(meta, kSelectChunk);
  const U* p = static_cast<const U*>(meta.ptr[0][t.slot]);
  const int lane = threadIdx.x & 31;
  bool bad = false;
  // `base` is uniform over the block, so every warp runs the same iterations (full-mask sync).
  for (int64_t base = t.begin; base < t.end; base += kThreads) {
    const int64_t e = base + threadIdx.x;
    int bin = kBins;  // not counted
    if (e < t.end) {
      const U bits = p[e];
      if (check_finite && !core::bits_finite<U>(bits, Tr::kExponentMask)) {
        bad = true;
      } else {
        const U key = core::order_key<U>(bits);
        if (core::key_matches_prefix<U>(key, prefix, fixed_shift)) {
          bin = static_cast<int>(core::key_digit<U>(key, shift, kDigitBits));
        }
      }
    }
    const unsigned peers = __match_any_sync(kFullMask, bin);
    if (bin != kBins && lane == __ffs(peers) - 1) atomicAdd(&local[bin], static_cast<unsigned>(__popc(peers)));
  }
  if (bad) atomicMin(&st->bad_tensor, static_cast<long long>(meta.index[t.slot]));
  __syncthreads();
  const unsigned c = local[threadIdx.x];
  if (c != 0u) atomicAdd(&hist[threadIdx.x], static_cast<unsigned long long>(c));
}

// Fixes the digit of this pass: the bin where the count from the top reaches `remaining`.
template <typename scalar_t>
__global__ void __launch_bounds__(kBins)
    select_kernel(SelectState* st, const unsigned long long* hist, int shift, bool last,
                  double* cut_out) {
  using U = typename KeyTraits<scalar_t>::U;
  __shared__ unsigned long long h[kBins];
  h[threadIdx.x] = hist[threadIdx.x];
  __syncthreads();
  if (threadIdx.x != 0) return;
  long long remaining = st->remaining;
  unsigned long long above = 0ull;
  int b = kBins - 1;
  for (; b >= 0; --b) {
    if (above + h[b] >= static_cast<unsigned long long>(remaining)) break;
    above += h[b];
  }
  if (b < 0) {
    st->failed = 1;
    b = 0;
  } else {
    remaining -= static_cast<long long>(above);
  }
  st->prefix |= static_cast<unsigned long long>(b) << shift;
  st->remaining = remaining;
  if (last) {
    st->ties_total = static_cast<long long>(h[b]);
    st->all_ties_kept = (static_cast<unsigned long long>(remaining) == h[b]) ? 1 : 0;
    *cut_out = KeyTraits<scalar_t>::to_double(core::key_to_bits<U>(static_cast<U>(st->prefix)));
  }
}

// Ties (key == cut) per (tensor, chunk) block, written at the block's global chunk id.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    tie_count_kernel(const __grid_constant__ ListMeta<2> meta, const SelectState* st,
                     long long* tie_counts) {
  using U = typename KeyTraits<scalar_t>::U;
  if (st->all_ties_kept != 0 || st->bad_tensor != kNoError) return;  // uniform over the grid
  const U cut = static_cast<U>(st->prefix);
  const BlockTask t = locate_block(meta, kSelectChunk);
  const U* p = static_cast<const U*>(meta.ptr[0][t.slot]);
  long long n = 0;
  for (int64_t e = t.begin + threadIdx.x; e < t.end; e += kThreads) {
    n += core::order_key<U>(p[e]) == cut ? 1 : 0;
  }
  n = block_sum<long long>(n);
  if (threadIdx.x == 0) tie_counts[meta.chunk_base + blockIdx.x] = n;
}

// In place exclusive prefix sum of `n` counts, one block of kScanThreads threads: each thread
// scans a contiguous segment, segment totals are scanned in shared memory.
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(long long* data, int64_t n, const SelectState* st) {
  if (st->all_ties_kept != 0 || st->bad_tensor != kNoError) return;
  __shared__ long long s[kScanThreads];
  const int64_t per = (n + kScanThreads - 1) / kScanThreads;
  const int64_t b = static_cast<int64_t>(threadIdx.x) * per;
  const int64_t e = b + per < n ? b + per : n;
  long long sum = 0;
  for (int64_t i = b; i < e; ++i) sum += data[i];
  s[threadIdx.x] = sum;
  __syncthreads();
  for (int off = 1; off < kScanThreads; off <<= 1) {
    const long long v = threadIdx.x >= static_cast<unsigned>(off) ? s[threadIdx.x - off] : 0;
    __syncthreads();
    s[threadIdx.x] += v;
    __syncthreads();
  }
  long long run = s[threadIdx.x] - sum;  // exclusive
  for (int64_t i = b; i < e; ++i) {
    const long long v = data[i];
    data[i] = run;
    run += v;
  }
}

// Writes every mask; writes nothing if a score was non-finite.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    write_masks_kernel(const __grid_constant__ ListMeta<2> meta, const SelectState* st,
                       const long long* tie_offsets, int mode) {
  using U = typename KeyTraits<scalar_t>::U;
  if (st->bad_tensor != kNoError) return;  // uniform over the grid
  const BlockTask t = locate_block(meta, kSelectChunk);
  const U* p = static_cast<const U*>(meta.ptr[0][t.slot]);
  bool* m = static_cast<bool*>(meta.ptr[1][t.slot]);
  if (mode == kWriteNone) {
    for (int64_t e = t.begin + threadIdx.x; e < t.end; e += kThreads) m[e] = false;
    return;
  }
  const U cut = static_cast<U>(st->prefix);
  if (mode == kWriteOfficial) {
    for (int64_t e = t.begin + threadIdx.x; e < t.end; e += kThreads) m[e] = core::order_key<U>(p[e]) > cut;
    return;
  }
  if (st->all_ties_kept != 0) {
    for (int64_t e = t.begin + threadIdx.x; e < t.end; e += kThreads) m[e] = core::order_key<U>(p[e]) >= cut;
    return;
  }
  // exact with a partial tie run: tie rank = ties before this chunk + ties before e in it.
  __shared__ int warp_ties[kWarps];
  const long long remaining = st->remaining;
  long long seen = tie_offsets[meta.chunk_base + blockIdx.x];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t base = t.begin; base < t.end; base += kThreads) {  // uniform trip count
    const int64_t e = base + threadIdx.x;
    const bool valid = e < t.end;
    const U key = valid ? core::order_key<U>(p[e]) : U(0);
    const bool tie = valid && key == cut;
    const unsigned ballot = __ballot_sync(kFullMask, tie);
    if (lane == 0) warp_ties[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int c = warp_ties[w];
      total += c;
      if (w < warp) before += c;
    }
    const long long rank = seen + before + __popc(ballot & ((1u << lane) - 1u));
    if (valid) m[e] = key > cut || (tie && rank < remaining);
    seen += total;
    __syncthreads();  // warp_ties is rewritten in the next iteration
  }
}

template <typename scalar_t>
void run_threshold(const std::vector<TensorEntry<2>>& entries, int64_t keep, bool exact,
                   const at::Device& device, at::Tensor& cut) {
  using U = typename KeyTraits<scalar_t>::U;
  constexpr int kKeyBits = static_cast<int>(sizeof(U) * 8);
  constexpr int kPasses = kKeyBits / kDigitBits;
  cudaStream_t stream = current_stream();
  const int64_t chunks = count_chunks(entries, kSelectChunk);
  const int64_t hist_words = int64_t(kPasses) * kBins;
  const bool select = keep > 0;
  const int64_t tie_words = (exact && select) ? chunks : 0;
  at::Tensor ws = at::empty({kStateWords + hist_words + tie_words},
                            at::TensorOptions().dtype(at::kLong).device(device));
  int64_t* base = ws.data_ptr<int64_t>();
  SelectState* st = reinterpret_cast<SelectState*>(base);
  unsigned long long* hist = reinterpret_cast<unsigned long long*>(base + kStateWords);
  long long* ties = reinterpret_cast<long long*>(base + kStateWords + hist_words);
  double* cut_ptr = cut.data_ptr<double>();

  init_state_kernel<<<static_cast<unsigned>((hist_words + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      st, hist, hist_words, static_cast<long long>(keep));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // keep == 0: one pass for the finite check only.
  const int passes = select ? kPasses : 1;
  for (int p = 0; p < passes; ++p) {
    const int shift = kKeyBits - kDigitBits * (p + 1);
    unsigned long long* h = hist + int64_t(p) * kBins;
    multi_tensor_launch<2>(entries, kSelectChunk, [&](const ListMeta<2>& meta, int64_t blocks) {
      histogram_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(meta, st, h, shift, p == 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (select) {
      select_kernel<scalar_t><<<1, kBins, 0, stream>>>(st, h, shift, p == kPasses - 1, cut_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (exact && select) {
    multi_tensor_launch<2>(entries, kSelectChunk, [&](const ListMeta<2>& meta, int64_t blocks) {
      tie_count_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(meta, st, ties);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    scan_kernel<<<1, kScanThreads, 0, stream>>>(ties, chunks, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int mode = !select ? kWriteNone : (exact ? kWriteExact : kWriteOfficial);
  multi_tensor_launch<2>(entries, kSelectChunk, [&](const ListMeta<2>& meta, int64_t blocks) {
    write_masks_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(meta, st, ties, mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // The only host synchronisation of the op: the state, for the error flag.
  const at::Tensor host = ws.narrow(0, 0, kStateWords).to(at::kCPU);
  SelectState s;
  std::memcpy(&s, host.const_data_ptr<int64_t>(), sizeof(SelectState));
  TORCH_CHECK(s.bad_tensor == kNoError, "widetopo::global_threshold: scores[", s.bad_tensor,
              "] contains a non-finite value (NaN or +-inf); scores must be finite");
  TORCH_INTERNAL_ASSERT(!select || s.failed == 0, "widetopo::global_threshold: radix select lost the cut");
}

at::Tensor global_threshold_cuda(at::TensorList scores, at::TensorList masks, int64_t keep,
                                 c10::string_view rule) {
  const at::Device device = call_device(scores, masks);
  const args::ThresholdCall call = args::check_global_threshold(scores, masks, keep, rule, device);
  const at::ScalarType st = call.dtype;
  const int64_t N = call.numel;

  c10::cuda::CUDAGuard guard(device);
  const auto dopts = at::TensorOptions().dtype(at::kDouble).device(device);
  const double inf = std::numeric_limits<double>::infinity();
  if (N == 0) return at::scalar_tensor(inf, dopts);

  std::vector<at::Tensor> work_scores;
  std::vector<Writable> work_masks;
  work_scores.reserve(scores.size());
  work_masks.reserve(masks.size());
  std::vector<TensorEntry<2>> entries;
  for (size_t j = 0; j < scores.size(); ++j) {
    work_scores.push_back(scores[j].contiguous());
    work_masks.emplace_back(masks[j]);
  }
  for (size_t j = 0; j < scores.size(); ++j) {
    TensorEntry<2> e;
    e.ptr[0] = const_cast<void*>(work_scores[j].const_data_ptr());
    e.ptr[1] = work_masks[j].work.mutable_data_ptr<bool>();
    e.numel = work_scores[j].numel();
    e.aux0 = e.aux1 = 0;
    e.index = static_cast<int32_t>(j);
    entries.push_back(e);
  }
  at::Tensor cut = keep > 0 ? at::empty({}, dopts) : at::scalar_tensor(inf, dopts);
  const bool exact = call.exact;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "global_threshold_cuda", [&] {
    run_threshold<scalar_t>(entries, keep, exact, device, cut);
  });
  for (auto& w : work_masks) w.finish();
  return cut;
}

}  // namespace

TORCH_LIBRARY_IMPL(widetopo, CUDA, m) { m.impl("global_threshold", &global_threshold_cuda); }

}  // namespace cuda
}  // namespace widetopo
