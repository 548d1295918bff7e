"""Build of widetopo: the compiled op library `widetopo_ext._C` and the `widetopo` package.

CPU kernels are always compiled. CUDA kernels (csrc/cuda/*.cu) are compiled when torch was
built with CUDA and nvcc is found, or when FORCE_CUDA=1; USE_CUDA=0 turns them off.
Build with `pip install --no-build-isolation .` so the extension links the installed torch.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _use_cuda():
    if os.environ.get("USE_CUDA", "").strip() == "0":
        return False
    if _env_flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -fopenmp: at::parallel_for only runs in parallel when the caller is compiled with OpenMP
    # (torch's CPU parallel backend); without it every kernel would run on one thread.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    define_macros = []
    if _use_cuda():
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        define_macros.append(("WIDETOPO_CUDA_ARCHS", '"%s"' % archs))
        return CUDAExtension(
            "widetopo_ext._C",
            sources + rel("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link,
        )
    return CppExtension(
        "widetopo_ext._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    packages=["widetopo_ext"] + find_packages("python"),
    package_dir={"widetopo_ext": "widetopo_ext", "": "python"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
