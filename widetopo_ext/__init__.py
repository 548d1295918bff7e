"""widetopo_ext: the compiled op library of widetopo (torch.ops.widetopo.*) with typed wrappers.

    import widetopo_ext
    thr = widetopo_ext.global_threshold(scores, masks, keep)   # writes bool masks in place
    widetopo_ext.reference.global_threshold(...)               # pure-PyTorch statement of the op

Importing this package imports torch, then the compiled extension `widetopo_ext._C`, which
registers the op schemas and CPU (and, when built, CUDA) kernels with the dispatcher; then the
fake implementations / autograd formulas (`_meta`).

Run from the repository root after a non-editable install, Python finds this source-tree copy
first (the current directory leads sys.path for `python -m ...` and `python -c ...`), and it has
no compiled `_C`. Then this module hands over to the installed copy: it executes that package
(its own Python files with its own `_C`, so the two always match) in its place in sys.modules.
"""
import importlib.machinery
import importlib.util
import os
import sys


def _has_library(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, "_C" + suffix)) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _installed_copy(here: str, paths, finders):
    """The folder of another widetopo_ext that has a compiled _C: on `paths` (sys.path) first,
    then from the other meta-path finders (an editable install's finder); None if there is none."""
    here = os.path.realpath(here)
    for entry in paths:
        folder = os.path.join(entry or os.getcwd(), "widetopo_ext")
        if os.path.realpath(folder) != here and os.path.isfile(os.path.join(folder, "__init__.py")) and _has_library(folder):
            return folder
    for finder in finders:
        if finder is importlib.machinery.PathFinder or not hasattr(finder, "find_spec"):
            continue
        try:
            spec = finder.find_spec("widetopo_ext", None)
        except Exception:  # a third-party finder that cannot answer: not ours
            continue
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            if os.path.realpath(folder) != here and _has_library(folder):
                return folder
    return None


def _hand_over(folder: str) -> None:
    """Execute the installed package at `folder` as `widetopo_ext` (the import system returns
    whatever sys.modules holds once this module's code has run)."""
    spec = importlib.util.spec_from_file_location(__name__, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(__name__, None)  # a failed import leaves nothing half-initialised behind
        raise


_HERE = os.path.dirname(os.path.abspath(__file__))
_BUILD_HELP = (
    "It is a C++ extension that must be compiled against the torch you have installed. Build it with:\n"
    "    pip install torch==2.13.0            # first, so the build links that torch\n"
    "    pip install --no-build-isolation .   # from the repository root (or -e . for development)\n"
    "or, for in-tree development, `python setup.py build_ext --inplace`.\n"
    "--no-build-isolation is needed because the extension must link the torch of this "
    "environment, not a throw-away copy pip would download into an isolated build env."
)

if not _has_library(_HERE):
    _OTHER = _installed_copy(_HERE, sys.path, sys.meta_path)
    if _OTHER is None:
        raise ImportError(
            f"widetopo_ext._C, the compiled op library of widetopo, was not found: {_HERE} (imported from "
            "the current directory or PYTHONPATH) has none, and no installed widetopo_ext with one is on "
            "sys.path. " + _BUILD_HELP
        )
    _hand_over(_OTHER)
else:
    import torch  # noqa: F401  (must be imported before _C: the extension links against libtorch)

    try:
        from . import _C
    except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
        raise ImportError(
            f"widetopo_ext._C, the compiled op library of widetopo, could not be imported ({exc}). "
            + _BUILD_HELP + " If it was built, check that it was built for this Python and this torch version."
        ) from exc


    from . import _meta  # noqa: E402,F401  (register_fake / register_autograd; needs the schemas)
    from . import reference  # noqa: E402,F401
    from ._ops import (  # noqa: E402
        DEFAULT_NOISE_SCALE,
        OPS,
        SCORE_DTYPES,
        THRESHOLD_MODES,
        accumulate_score_,
        apply_masks_,
        apply_masks_to_grads_,
        density_decay_,
        global_threshold,
        mask_stats,
        masked_sq_norm,
        restoration_scores,
    )

    __all__ = ["build_info", *OPS, "apply_masks_to_grads_", "reference", "OPS", "DEFAULT_NOISE_SCALE",
               "SCORE_DTYPES", "THRESHOLD_MODES"]

    def build_info() -> dict:
        """What was compiled: {'ops', 'cpu_kernels': {op: bool}, 'cuda_kernels': {op: bool},
        'with_cuda', 'cuda_archs', 'torch_version'} (forwarded from the extension)."""
        return _C.build_info()
