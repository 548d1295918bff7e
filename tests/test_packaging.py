"""Packaging checks: the imported packages are the installed distribution `widetopo`
(site-packages, or the source tree of an editable install), the compiled library registers a
CPU kernel for every op, the `widetopo` console script resolves, and the version is consistent.

These catch a stray copy on sys.path (for example the source tree's widetopo_ext, which has no
compiled library in a clean checkout, shadowing the installed one), a package missing from the
wheel, and a stale install after a version bump.
"""
import importlib
import importlib.metadata as md
import json
import os
import subprocess
import sysconfig

import pytest
import torch

import widetopo
import widetopo_ext
from widetopo_ext import _C

DIST = "widetopo"
# The ops the Python side declares (widetopo_ext.OPS), checked against what the compiled library
# reports and registers.
EXPECTED_OPS = set(widetopo_ext.OPS)


def _real(path):
    return os.path.realpath(os.fspath(path))


@pytest.fixture(scope="module")
def dist():
    try:
        return md.distribution(DIST)
    except md.PackageNotFoundError:
        pytest.fail("the distribution 'widetopo' is not installed: install it with "
                    "`pip install --no-build-isolation .` (or -e .), not via PYTHONPATH")


def _editable_root(dist):
    """The source directory of an editable install, or None for a regular install."""
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    info = json.loads(text)
    if not info.get("dir_info", {}).get("editable"):
        return None
    url = info["url"]
    assert url.startswith("file://"), url
    return _real(url[len("file://"):])


@pytest.mark.parametrize("module, source_path", [
    (widetopo, ("python", "widetopo", "__init__.py")),
    (widetopo_ext, ("widetopo_ext", "__init__.py")),
])
def test_packages_come_from_the_installed_distribution(dist, module, source_path):
    imported = _real(module.__file__)
    root = _editable_root(dist)
    if root is not None:
        expected = _real(os.path.join(root, *source_path))
        assert imported == expected, (
            f"{module.__name__} imported from {imported}, but the editable install points at "
            f"{expected}: a stray copy shadows it")
    else:
        expected = _real(dist.locate_file("/".join(source_path[-2:])))
        assert imported == expected, (
            f"{module.__name__} imported from {imported}, not from the installed distribution "
            f"({expected}): a stray copy (e.g. the source tree) is on sys.path")
        assert "site-packages" in imported.split(os.sep) or "dist-packages" in imported.split(os.sep)


def test_compiled_library_belongs_to_the_package(dist):
    library = _real(_C.__file__)
    assert os.path.dirname(library) == os.path.dirname(_real(widetopo_ext.__file__))
    if _editable_root(dist) is None:
        recorded = {_real(dist.locate_file(f)) for f in dist.files or ()}
        assert library in recorded, f"{library} is not a file of the installed distribution"


def test_every_op_has_a_cpu_kernel():
    info = _C.build_info()
    assert set(info["ops"]) == EXPECTED_OPS
    assert info["cpu_kernels"] == {op: True for op in EXPECTED_OPS}
    # Cross-check with the dispatcher itself and the public op namespace.
    for op in EXPECTED_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"widetopo::{op}", "CPU"), op
        assert hasattr(torch.ops.widetopo, op), op


def test_build_info_cuda_fields_are_consistent():
    info = _C.build_info()
    assert set(info["cuda_kernels"]) == EXPECTED_OPS
    assert info["with_cuda"] == any(info["cuda_kernels"].values())
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0], (
        "the library was compiled against another torch than the one imported: rebuild")
    if info["with_cuda"]:
        archs = [a for a in info["cuda_archs"].split(";") if a]
        assert archs, "a CUDA build must report its compiled architectures"
        for arch in archs:
            major, _, minor = arch.replace("+PTX", "").partition(".")
            assert major.isdigit() and minor.isdigit(), arch
    else:
        assert info["cuda_archs"] == ""


def test_version_matches_distribution_metadata(dist):
    assert widetopo.__version__ == dist.version == md.version(DIST)


def test_console_script_resolves(dist):
    scripts = [ep for ep in dist.entry_points if ep.group == "console_scripts"]
    assert [(ep.name, ep.value) for ep in scripts] == [("widetopo", "widetopo.cli:main")]
    main = scripts[0].load()
    assert callable(main)

    # The installer wrote an executable `widetopo` script that runs it.
    candidates = [os.path.join(sysconfig.get_path("scripts", scheme), "widetopo")
                  for scheme in (sysconfig.get_default_scheme(), f"{os.name}_user")]
    script = next((c for c in candidates if os.access(c, os.X_OK)), None)
    assert script is not None, f"no executable widetopo script in {candidates}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120,
                          env=env, cwd=os.path.dirname(script))
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()



# ------------------------------------------------------------------------------ running from the repository root
# `python -m ...`, `python -c ...` and `python -m pytest` put the current directory first on
# sys.path; from the repository root that finds the source tree's widetopo_ext/, which has no
# compiled _C after a non-editable install. The package then hands over to the installed copy.
# Simulated with a temp layout: src/widetopo_ext (the source files, no library) as the current
# directory, site/widetopo_ext (a complete package with the real library) on PYTHONPATH.

import shutil  # noqa: E402
import sys  # noqa: E402

SOURCE_PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "widetopo_ext")


def _layout(tmp_path, with_site=True):
    src = tmp_path / "src" / "widetopo_ext"
    src.mkdir(parents=True)
    for name in os.listdir(SOURCE_PACKAGE):
        if name.endswith(".py"):
            shutil.copy(os.path.join(SOURCE_PACKAGE, name), src / name)
    site = tmp_path / "site" / "widetopo_ext"
    if with_site:
        installed = os.path.dirname(_real(_C.__file__))
        shutil.copytree(installed, site, ignore=shutil.ignore_patterns("__pycache__"))
    return src.parent, site.parent


def _python(code, cwd, pythonpath):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.fspath(pythonpath)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_source_tree_without_library_hands_over_to_the_installed_copy(tmp_path):
    src, site = _layout(tmp_path)
    assert not any(p.name.startswith("_C") for p in (src / "widetopo_ext").iterdir())
    code = ("import sys, widetopo_ext, widetopo_ext._C as C, torch\n"
            "print(widetopo_ext.__file__); print(C.__file__); print(sys.modules['widetopo_ext'] is widetopo_ext)\n"
            "m = [torch.tensor([True, False, True])]\n"
            "print(widetopo_ext.mask_stats(m).tolist())")
    done = _python(code, cwd=src, pythonpath=site)
    assert done.returncode == 0, done.stderr
    init_file, lib, same, stats = done.stdout.splitlines()
    assert _real(init_file) == _real(site / "widetopo_ext" / "__init__.py")
    assert _real(os.path.dirname(lib)) == _real(site / "widetopo_ext")
    assert same == "True" and stats == "[[2, 2, 2]]"


def test_no_library_anywhere_is_a_clear_error(tmp_path):
    src, _ = _layout(tmp_path, with_site=False)
    # only the source tree (and the standard library) is importable: drop site-packages and
    # every other finder
    code = ("import importlib.machinery as m, sys\n"
            "sys.path[:] = [''] + [p for p in sys.path if p and 'site-packages' not in p and 'dist-packages' not in p]\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if f in (m.BuiltinImporter, m.FrozenImporter, m.PathFinder)]\n"
            "import widetopo_ext")
    done = _python(code, cwd=src, pythonpath=tmp_path / "nowhere")
    assert done.returncode != 0
    assert "ImportError: widetopo_ext._C, the compiled op library of widetopo, was not found" in done.stderr
    assert os.fspath(src / "widetopo_ext") in done.stderr and "pip install --no-build-isolation ." in done.stderr
