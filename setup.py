"""Build of widetopo: the compiled op library `widetopo_ext._C` and the `widetopo` package.

Metadata and dependencies live in pyproject.toml; this file only describes the extension and
the package layout (python/widetopo and widetopo_ext).

CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) are always compiled. CUDA kernels (csrc/cuda/*.cu)
are compiled when torch was built with CUDA and nvcc is found, or when FORCE_CUDA=1;
USE_CUDA=0 turns them off. TORCH_CUDA_ARCH_LIST selects the architectures (without it and
without a visible GPU, a default list for the CUDA version is used); the compiled list is
baked into the library and reported by `widetopo_ext._C.build_info()["cuda_archs"]`.

Build with `pip install --no-build-isolation .` (or `-e .`): the extension must be compiled
against the torch that is installed and will import it (the C++ ABI is not stable across torch
releases), and an isolated build would download another torch just to build.
"""
import os
import re
import sys

from setuptools import find_namespace_packages, setup


def _say(message):
    # setup.py runs before setuptools configures logging; stderr shows under `pip install -v`.
    print("widetopo setup: " + message, file=sys.stderr)


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_off(name):
    return os.environ.get(name, "").strip().lower() in ("0", "false", "no", "off")


def _find_cuda_home():
    """Set CUDA_HOME when torch's own guess would go wrong.

    torch takes the toolkit from `which nvcc` when CUDA_HOME/CUDA_PATH are unset; if that nvcc
    is a wrapper script (e.g. /usr/local/bin/nvcc) the guess (/usr/local) has no CUDA headers.
    nvcc itself knows its toolkit: `nvcc --dryrun -E -x cu /dev/null` prints
    `#$ TOP=<toolkit>/bin/..`.
    """
    import shutil
    import subprocess

    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime.h")):
        return
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return
    match = re.search(r"^#\$ TOP=(.*)$", out, re.M)
    if match:
        top = os.path.realpath(match.group(1).strip())
        if os.path.exists(os.path.join(top, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = top


if not _env_off("USE_CUDA"):
    _find_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - depends on the build environment
    sys.exit(
        "widetopo: building needs torch importable in the build environment ({}).\n"
        "pip builds in an isolated environment without torch unless it is given "
        "--no-build-isolation.\nInstall torch first, then build without isolation so the "
        "extension is compiled against that torch:\n"
        "    pip install torch==2.13.0\n"
        "    pip install --no-build-isolation .".format(exc)
    )

ROOT = os.path.dirname(os.path.abspath(__file__))

# Default architectures when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (torch would
# otherwise fail to pick any). CUDA >= 12.8 knows Blackwell (10.0, 12.0); CUDA 13 dropped < 7.5.
_DEFAULT_ARCHS = {
    (13, 0): "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX",
    (12, 8): "7.0;7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX",
    (0, 0): "7.0;7.5;8.0;8.6;8.9;9.0+PTX",
}


def _use_cuda():
    if _env_off("USE_CUDA"):
        return False
    if _env_flag("FORCE_CUDA"):
        if CUDA_HOME is None:
            sys.exit("widetopo: FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME "
                     "to the directory holding bin/nvcc.")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _cuda_version():
    match = re.match(r"(\d+)\.(\d+)", torch.version.cuda or "")
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _cuda_archs():
    """Fix TORCH_CUDA_ARCH_LIST (choosing a default if needed) and return the compiled list.

    The returned string ("8.0;9.0", "+PTX" where PTX is embedded) is derived from the same
    -gencode flags that torch's BuildExtension passes to nvcc, so it states what was built.
    """
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not requested and not (torch.cuda.is_available() and torch.cuda.device_count() > 0):
        version = _cuda_version()
        key = max(k for k in _DEFAULT_ARCHS if k <= version)
        os.environ["TORCH_CUDA_ARCH_LIST"] = _DEFAULT_ARCHS[key]
        _say("TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: building for "
             + _DEFAULT_ARCHS[key])
    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags

        flags = _get_cuda_arch_flags()
    except Exception:  # private helper; fall back to the requested list
        return os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    sass, ptx = set(), set()
    for flag in flags:
        match = re.search(r"arch=compute_(\d+)a?,code=(sm|compute)_(\d+)", flag)
        if match:
            (sass if match.group(2) == "sm" else ptx).add(int(match.group(3)))
    archs = []
    for num in sorted(sass | ptx):
        name = "%d.%d" % (num // 10, num % 10)
        archs.append(name + "+PTX" if num in ptx else name)
    return ";".join(archs)


def _sources(pattern):
    import glob

    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 for
    # torch >= 2.10), and a second -std would conflict. -g0 drops the debug info that
    # Python's CFLAGS ask for (3x smaller library, faster build); WIDETOPO_DEBUG=1 keeps it.
    cxx = ["-O0", "-g"] if _env_flag("WIDETOPO_DEBUG") else ["-O3", "-g0"]
    # No fused multiply-adds on the host (GCC contracts a * b + c when the target has FMA):
    # the CPU and CUDA kernels must round every product alike (csrc/include/widetopo/elementwise.h).
    cxx.append("-ffp-contract=off")
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for's OpenMP backend is inline in ATen's headers: it only runs in
        # parallel when the extension itself is compiled and linked with OpenMP.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if _use_cuda():
        archs = _cuda_archs()
        # The arch list is a C string macro for ops.cpp only (a host .cpp file): passing it to
        # nvcc as well would expose the ';' to nvcc's own sub-shells.
        cxx.append('-DWIDETOPO_CUDA_ARCHS="%s"' % archs)
        _say("building CPU and CUDA kernels, archs %s (CUDA_HOME=%s)" % (archs, CUDA_HOME))
        return CUDAExtension(
            "widetopo_ext._C",
            sources + _sources("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link,
        )
    _say("building CPU kernels only (CUDA: %s)" % (
        "off (USE_CUDA=0)" if _env_off("USE_CUDA") else "no CUDA torch or no nvcc"))
    return CppExtension(
        "widetopo_ext._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


def _version():
    """Single source of the version: python/widetopo/__init__.py (read, not imported)."""
    with open(os.path.join(ROOT, "python", "widetopo", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    if not match:
        sys.exit("widetopo: no __version__ in python/widetopo/__init__.py")
    return match.group(1)


# find_namespace_packages so that a subpackage directory without __init__.py is still shipped
# (an editable install would import it, a wheel built with find_packages would silently lack it).
_EXCLUDE = ["*.__pycache__", "*.__pycache__.*"]
PACKAGES = find_namespace_packages(
    where="python", include=["widetopo", "widetopo.*"], exclude=_EXCLUDE
) + find_namespace_packages(where=ROOT, include=["widetopo_ext", "widetopo_ext.*"], exclude=_EXCLUDE)

setup(
    version=_version(),
    packages=PACKAGES,
    package_dir={"": "python", "widetopo_ext": "widetopo_ext"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
