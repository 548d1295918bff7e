// Operator schemas of the widetopo library and the Python module init.
//
// Backends register kernels with one TORCH_LIBRARY_IMPL per dispatch key:
// csrc/cpu/*.cpp (CPU, always built) and csrc/cuda/*.cu (CUDA, built when available).
// Every op takes lists of tensors so that a whole model is handled in one call.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#ifndef WIDETOPO_CUDA_ARCHS
#define WIDETOPO_CUDA_ARCHS ""
#endif

namespace widetopo {

static const std::vector<std::string>& op_names() {
  static const std::vector<std::string> names = {
      "global_threshold", "density_decay_", "restoration_scores", "accumulate_score_",
      "masked_sq_norm",   "apply_masks_",   "mask_stats"};
  return names;
}

TORCH_LIBRARY(widetopo, m) {
  // Keep the `keep` highest scores over all tensors together and write the bool masks.
  // rule "exact": exactly `keep` entries kept; ties at the cut are broken in favour of the
  // entry that comes first in (tensor index, row-major flat index) order.
  // rule "official": with k = N - keep, prune every score <= the (k+1)-th smallest
  // (0-indexed sorted[k]); everything is pruned when k >= N.
  // (The Python wrapper calls this argument `mode`; the schema avoids that name because
  // torch's auto_functionalize passes its own positional `mode` to the handler.)
  // Returns the cut value (0-d float64): the smallest kept score ("exact"; +inf when keep == 0),
  // or sorted[k] ("official"; +inf when k >= N).
  m.def("global_threshold(Tensor[] scores, Tensor(a!)[] masks, int keep, str rule=\"exact\") -> Tensor");
  // In place: S <- S * (m / max(out_deg * in_deg, 1))^exponent for rank >= 2 tensors.
  m.def("density_decay_(Tensor(a!)[] scores, Tensor[] masks, float exponent) -> ()");
  // Restoration scores (float32), one tensor per mask; noise[j] has shape (O, I) for rank >= 2
  // masks and is ignored (may be empty) for rank < 2 masks.
  m.def("restoration_scores(Tensor[] masks, Tensor[] noise, float noise_scale=1e-05) -> Tensor[]");
  // In place: S += |a * b * m| (absolute) or S += a * b * m. An empty `b` list means b = 1,
  // an empty `masks` list means m = 1.
  m.def("accumulate_score_(Tensor(a!)[] scores, Tensor[] a, Tensor[] b, Tensor[] masks, bool absolute=True) -> ()");
  // sum_j ||tensors[j] * masks[j]||^2 as a 0-d tensor; an empty `masks` list means m = 1.
  m.def("masked_sq_norm(Tensor[] tensors, Tensor[] masks) -> Tensor");
  // In place: t <- m ? t : 0 for every tensor of the list.
  m.def("apply_masks_(Tensor(a!)[] tensors, Tensor[] masks) -> ()");
  // int64 tensor of shape (len(masks), 3): kept count, active output units, active input units.
  m.def("mask_stats(Tensor[] masks) -> Tensor");
}

static bool has_kernel(const std::string& name, c10::DispatchKey key) {
  auto handle = c10::Dispatcher::singleton().findSchema({"widetopo::" + name, ""});
  return handle.has_value() && handle->hasKernelForDispatchKey(key);
}

}  // namespace widetopo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "widetopo compiled ops (registered under torch.ops.widetopo)";
  m.def(
      "build_info",
      []() {
        pybind11::dict info;
        pybind11::dict cpu, cuda;
        for (const auto& name : widetopo::op_names()) {
          cpu[pybind11::str(name)] = widetopo::has_kernel(name, c10::DispatchKey::CPU);
          cuda[pybind11::str(name)] = widetopo::has_kernel(name, c10::DispatchKey::CUDA);
        }
        bool any_cuda = false;
        for (const auto& name : widetopo::op_names()) {
          any_cuda = any_cuda || widetopo::has_kernel(name, c10::DispatchKey::CUDA);
        }
        info["ops"] = pybind11::cast(widetopo::op_names());
        info["cpu_kernels"] = cpu;
        info["cuda_kernels"] = cuda;
        info["with_cuda"] = any_cuda;
        info["cuda_archs"] = std::string(WIDETOPO_CUDA_ARCHS);
        info["torch_version"] = std::string(TORCH_VERSION);
        return info;
      },
      "Which backends have kernels for each widetopo op, and the CUDA architectures compiled.");
}
