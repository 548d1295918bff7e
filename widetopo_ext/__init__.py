"""widetopo_ext: the compiled op library of widetopo (torch.ops.widetopo.*) with typed wrappers.

    import widetopo_ext
    thr = widetopo_ext.global_threshold(scores, masks, keep)   # writes bool masks in place
    widetopo_ext.reference.global_threshold(...)               # pure-PyTorch statement of the op

Importing this package imports torch, then the compiled extension `widetopo_ext._C`, which
registers the op schemas and CPU (and, when built, CUDA) kernels with the dispatcher; then the
fake implementations / autograd formulas (`_meta`).
"""
import torch  # noqa: F401  (must be imported before _C: the extension links against libtorch)

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "widetopo_ext._C, the compiled op library of widetopo, could not be imported "
        f"({exc}). It is a C++ extension that must be compiled against the torch you have "
        "installed. Build it with:\n"
        "    pip install torch==2.13.0            # first, so the build links that torch\n"
        "    pip install --no-build-isolation .   # from the repository root (or -e . for development)\n"
        "or, for in-tree development, `python setup.py build_ext --inplace`.\n"
        "--no-build-isolation is needed because the extension must link the torch of this "
        "environment, not a throw-away copy pip would download into an isolated build env. "
        "If it was built, check that it was built for this Python and this torch version."
    ) from exc

from . import _meta  # noqa: E402,F401  (register_fake / register_autograd; needs the schemas)
from . import reference  # noqa: E402,F401
from ._ops import (  # noqa: E402
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

__all__ = [
    "build_info",
    "global_threshold",
    "density_decay_",
    "restoration_scores",
    "accumulate_score_",
    "masked_sq_norm",
    "apply_masks_",
    "apply_masks_to_grads_",
    "mask_stats",
    "reference",
    "SCORE_DTYPES",
    "THRESHOLD_MODES",
]


def build_info() -> dict:
    """What was compiled: {'ops', 'cpu_kernels': {op: bool}, 'cuda_kernels': {op: bool},
    'with_cuda', 'cuda_archs', 'torch_version'} (forwarded from the extension)."""
    return _C.build_info()
