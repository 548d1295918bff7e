"""Typed Python wrappers around torch.ops.widetopo.*: argument checks, then one op call.

Every wrapper checks its arguments before touching any data, so bad input raises a clear
TypeError/ValueError naming the argument and what is allowed, and leaves every tensor unchanged.
Checks that need the data itself (NaN/inf scores) are done by the compiled op, which validates
all tensors before writing anything.

Conventions: arguments called "lists" accept any sequence of tensors (list, tuple, generator);
`None` for the optional `b` / `masks` lists means "all ones" (passed to the op as an empty
list). All tensors of one call must be on the same device. Non-contiguous tensors are fine
(the kernels handle strides). An empty list of tensors is a no-op / gives an empty result
without calling the op (the dispatcher cannot pick a device for an empty list).
"""
import math
import numbers
import operator
from collections.abc import Iterable, Mapping
from typing import List, Optional, Sequence

import torch

#: The compiled ops (torch.ops.widetopo.<op>), in the order csrc/ops.cpp registers them and
#: build_info() lists them; each has a wrapper here and a statement in widetopo_ext.reference.
OPS = (
    "global_threshold",
    "density_decay_",
    "restoration_scores",
    "accumulate_score_",
    "masked_sq_norm",
    "apply_masks_",
    "mask_stats",
)
#: Default scale of the restoration noise (docs/design.md §2.3; the engine option noise_scale).
#: The op schema in csrc/ops.cpp repeats it (tests/test_ops_loading.py checks the two agree).
DEFAULT_NOISE_SCALE = 1e-5

__all__ = [*OPS, "apply_masks_to_grads_"]

SCORE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
THRESHOLD_MODES = ("exact", "official")
_DTYPE_NAMES = "float32, float64, float16 or bfloat16"


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _tensor_list(name: str, value, optional: bool = False) -> List[torch.Tensor]:
    """`value` as a list of tensors; None -> [] when optional."""
    if value is None:
        if optional:
            return []
        raise TypeError(f"{name} must be a list of tensors, got None")
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors (one per parameter), not a single Tensor; wrap it as [t]")
    if isinstance(value, Mapping):
        raise TypeError(f"{name} must be a list of tensors, got a mapping ({type(value).__name__}); "
                        f"pass list(mapping.values()) in the order of the partner list")
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    items = list(value)
    for j, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{j}] must be a torch.Tensor, got {type(t).__name__}")
    return items


def _check_length(name: str, items: Sequence, ref_name: str, ref: Sequence) -> None:
    if len(items) != len(ref):
        raise ValueError(f"{name} must have one tensor per entry of {ref_name}: got {len(items)} vs {len(ref)}")


def _check_shapes(name: str, items: Sequence[torch.Tensor], ref_name: str, ref: Sequence[torch.Tensor]) -> None:
    for j, (t, r) in enumerate(zip(items, ref)):
        if t.shape != r.shape:
            raise ValueError(f"{name}[{j}] has shape {tuple(t.shape)} but {ref_name}[{j}] has shape {tuple(r.shape)}; "
                             f"they must match")


def _check_bool(name: str, items: Sequence[torch.Tensor]) -> None:
    for j, t in enumerate(items):
        if t.dtype != torch.bool:
            raise TypeError(f"{name}[{j}] must be a torch.bool mask, got {t.dtype}")


def _check_float(name: str, items: Sequence[torch.Tensor], dtype: Optional[torch.dtype] = None) -> None:
    """Every tensor in SCORE_DTYPES and, if `dtype` is given, exactly that dtype (one per call)."""
    for j, t in enumerate(items):
        if t.dtype not in SCORE_DTYPES:
            raise TypeError(f"{name}[{j}] has dtype {t.dtype}; allowed: {_DTYPE_NAMES}")
        if dtype is not None and t.dtype != dtype:
            raise TypeError(f"{name}[{j}] has dtype {t.dtype} but the call uses {dtype} "
                            f"(one dtype per call for every float list)")


def _check_device(named_lists) -> Optional[torch.device]:
    """All tensors of all (name, list) pairs on one device; returns it (None if no tensors)."""
    device, first = None, None
    for name, items in named_lists:
        for j, t in enumerate(items):
            if device is None:
                device, first = t.device, f"{name}[{j}]"
            elif t.device != device:
                raise ValueError(f"{name}[{j}] is on {t.device} but {first} is on {device}; "
                                 f"all tensors of one call must be on the same device")
    return device


def _check_writable(name: str, items: Sequence[torch.Tensor]) -> None:
    """Tensors written in place must not have several elements sharing one memory location
    (e.g. from expand()): the result would depend on write order. (The kernels refuse it too.)"""
    for j, t in enumerate(items):
        if torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(f"{name}[{j}] is written in place but several of its elements share one memory "
                             f"location (e.g. a view from expand()); pass a tensor with distinct elements (.clone())")


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _masks_for(name: str, masks, partner_name: str, partners: Sequence[torch.Tensor], optional: bool = False):
    masks = _tensor_list(name, masks, optional=optional)
    if optional and not masks:
        return masks
    _check_length(name, masks, partner_name, partners)
    _check_bool(name, masks)
    _check_shapes(name, masks, partner_name, partners)
    return masks


# ---------------------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------------------
def _threshold_arguments(scores, masks, keep):
    """The local checks of a threshold call (this op and the sharded one): tensor lists, bool masks
    of the scores' shapes, one float dtype and device, writable masks, an integer keep."""
    scores = _tensor_list("scores", scores)
    masks = _masks_for("masks", masks, "scores", scores)
    _check_float("scores", scores, scores[0].dtype if scores else None)
    _check_device([("scores", scores), ("masks", masks)])
    _check_writable("masks", masks)
    if isinstance(keep, bool):
        raise TypeError("keep must be an int, got bool")
    try:
        keep = operator.index(keep)
    except TypeError:
        raise TypeError(f"keep must be an int, got {type(keep).__name__}") from None
    return scores, masks, keep


def global_threshold(scores, masks, keep: int, mode: str = "exact") -> torch.Tensor:
    """Keep the `keep` highest scores over all tensors together and write the bool masks in place.

    mode="exact": exactly `keep` entries kept; ties at the cut go to the entry first in
    (tensor index, row-major flat index) order. Returns the smallest kept score (+inf if keep=0).
    mode="official" (the published code's rule): k = N - keep, prune every score <= the
    (k+1)-th smallest sorted[k]; all pruned when k >= N. Returns sorted[k] (+inf if k >= N).
    Result: 0-d float64. Radix select in O(N) time without concatenating or sorting.
    Raises ValueError for keep outside [0, N]; the op raises RuntimeError naming the tensor
    index for NaN/inf scores (before writing any mask).
    """
    scores, masks, keep = _threshold_arguments(scores, masks, keep)
    n = sum(s.numel() for s in scores)
    if not 0 <= keep <= n:
        raise ValueError(f"keep must be in [0, N] where N = {n} is the total number of scores, got {keep}")
    if not isinstance(mode, str) or mode not in THRESHOLD_MODES:
        raise ValueError(f"mode must be one of {THRESHOLD_MODES}, got {mode!r}")
    if not scores:
        return torch.tensor(math.inf, dtype=torch.float64)
    return torch.ops.widetopo.global_threshold([s.detach() for s in scores], masks, keep, mode)


def density_decay_(scores, masks, exponent: float) -> None:
    """In place, for rank >= 2 tensors: S <- S * (m / max(out_deg * in_deg, 1)) ** exponent.

    out_deg[o] = sum_{i,k} m[o,i,k], in_deg[i] = sum_{o,k} m[o,i,k]; pruned entries become 0.
    WideTopo uses exponent = -log10(density) / compression_factor. Rank < 2 tensors untouched.
    """
    scores = _tensor_list("scores", scores)
    masks = _masks_for("masks", masks, "scores", scores)
    _check_float("scores", scores, scores[0].dtype if scores else None)
    _check_device([("scores", scores), ("masks", masks)])
    _check_writable("scores", scores)
    exponent = _check_real("exponent", exponent)
    if not scores:
        return None
    with torch.no_grad():
        torch.ops.widetopo.density_decay_(scores, masks, exponent)
    return None


def restoration_scores(masks, noise, noise_scale: float = DEFAULT_NOISE_SCALE) -> List[torch.Tensor]:
    """float32 restoration scores, one contiguous tensor per mask (docs/design.md §2.3).

    Kept entries 2; pruned entries of rank >= 2 masks (1 - out_density[o]) * (1 - in_density[i])
    + noise_scale * noise[j][o, i]; pruned entries of rank < 2 masks 1. noise[j] is a float32
    (O, I) tensor for rank >= 2 masks; for rank < 2 masks it is ignored and may be None or empty.
    """
    masks = _tensor_list("masks", masks)
    if noise is None:
        raise TypeError("noise must be a list with one float32 (O, I) tensor per rank >= 2 mask "
                        "(None allowed only as an entry for rank < 2 masks)")
    if isinstance(noise, (torch.Tensor, str, bytes, Mapping)) or not isinstance(noise, Iterable):
        raise TypeError(f"noise must be a list of tensors, got {type(noise).__name__}")
    noise = list(noise)
    _check_length("noise", noise, "masks", masks)
    _check_bool("masks", masks)
    noise_scale = _check_real("noise_scale", noise_scale)
    converted = []
    for j, (m, n) in enumerate(zip(masks, noise)):
        if m.dim() < 2:
            if n is None:
                n = torch.empty(0, dtype=torch.float32, device=m.device)
            elif not isinstance(n, torch.Tensor):
                raise TypeError(f"noise[{j}] must be a torch.Tensor or None, got {type(n).__name__}")
        else:
            if not isinstance(n, torch.Tensor):
                raise TypeError(f"noise[{j}] must be a float32 tensor of shape {tuple(m.shape[:2])} "
                                f"(masks[{j}] has rank {m.dim()}), got {type(n).__name__}")
            if n.shape != m.shape[:2]:
                raise ValueError(f"noise[{j}] must have shape (O, I) = {tuple(m.shape[:2])} to match masks[{j}] "
                                 f"of shape {tuple(m.shape)}, got {tuple(n.shape)}")
        if n.dtype != torch.float32:
            raise TypeError(f"noise[{j}] must be float32, got {n.dtype}")
        converted.append(n)
    _check_device([("masks", masks), ("noise", converted)])
    if not masks:
        return []
    return list(torch.ops.widetopo.restoration_scores(masks, converted, noise_scale))


def accumulate_score_(scores, a, b=None, masks=None, absolute: bool = True) -> None:
    """In place: S += |a * b * m| (absolute=True) or S += a * b * m.

    b=None means b = 1, masks=None means every entry kept. a and b must have the dtype of the
    scores. Not differentiable (inputs are detached).
    """
    scores = _tensor_list("scores", scores)
    a = _tensor_list("a", a)
    b = _tensor_list("b", b, optional=True)
    _check_length("a", a, "scores", scores)
    _check_shapes("a", a, "scores", scores)
    if b:
        _check_length("b", b, "scores", scores)
        _check_shapes("b", b, "scores", scores)
    masks = _masks_for("masks", masks, "scores", scores, optional=True)
    dtype = scores[0].dtype if scores else None
    _check_float("scores", scores, dtype)
    _check_float("a", a, dtype)
    _check_float("b", b, dtype)
    _check_device([("scores", scores), ("a", a), ("b", b), ("masks", masks)])
    _check_writable("scores", scores)
    absolute = _check_flag("absolute", absolute)
    if not scores:
        return None
    with torch.no_grad():
        torch.ops.widetopo.accumulate_score_(scores, [x.detach() for x in a], [y.detach() for y in b], masks, absolute)
    return None


def masked_sq_norm(tensors, masks=None) -> torch.Tensor:
    """sum_j ||t_j * m_j||^2 as a 0-d tensor (float32 for 16-bit inputs, else the input dtype).

    masks=None means all kept. Differentiable w.r.t. `tensors` to any order: the gradient
    2 * grad * t * m is written with torch ops (needed for the Hutchinson HVP).
    """
    tensors = _tensor_list("tensors", tensors)
    masks = _masks_for("masks", masks, "tensors", tensors, optional=True)
    _check_float("tensors", tensors, tensors[0].dtype if tensors else None)
    _check_device([("tensors", tensors), ("masks", masks)])
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    return torch.ops.widetopo.masked_sq_norm(tensors, masks)


def apply_masks_(tensors, masks) -> None:
    """In place: t <- m ? t : 0 (selection, so a pruned NaN/inf becomes 0). Runs under no_grad,
    so leaf parameters that require grad can be passed directly. Any real dtype (float, int or
    bool; dtypes may differ between tensors)."""
    tensors = _tensor_list("tensors", tensors)
    masks = _masks_for("masks", masks, "tensors", tensors)
    for j, t in enumerate(tensors):
        if t.is_complex() or t.is_quantized:
            raise TypeError(f"tensors[{j}] has dtype {t.dtype}; allowed: real floating, integer or bool dtypes")
    _check_device([("tensors", tensors), ("masks", masks)])
    _check_writable("tensors", tensors)
    if not tensors:
        return None
    with torch.no_grad():
        torch.ops.widetopo.apply_masks_(tensors, masks)
    return None


def apply_masks_to_grads_(params, masks) -> None:
    """apply_masks_ on p.grad for every parameter whose .grad is not None (others skipped)."""
    params = _tensor_list("params", params)
    masks = _tensor_list("masks", masks)
    _check_length("masks", masks, "params", params)
    pairs = [(p.grad, m) for p, m in zip(params, masks) if p.grad is not None]
    grads = [g for g, _ in pairs]
    grad_masks = [m for _, m in pairs]
    idx = [j for j, p in enumerate(params) if p.grad is not None]
    # Re-check with the parameter indices in the messages.
    for j, g, m in zip(idx, grads, grad_masks):
        if m.dtype != torch.bool:
            raise TypeError(f"masks[{j}] must be a torch.bool mask, got {m.dtype}")
        if g.shape != m.shape:
            raise ValueError(f"params[{j}].grad has shape {tuple(g.shape)} but masks[{j}] has shape "
                             f"{tuple(m.shape)}; they must match")
    _check_device([("params[*].grad", grads), ("masks", grad_masks)])
    apply_masks_(grads, grad_masks)


def mask_stats(masks) -> torch.Tensor:
    """int64 tensor (len(masks), 3): kept, active output units, active input units per mask.

    rank >= 2: #o with out_deg[o] > 0 and #i with in_deg[i] > 0; rank < 2: (kept, kept, kept).
    """
    masks = _tensor_list("masks", masks)
    _check_bool("masks", masks)
    _check_device([("masks", masks)])
    if not masks:
        return torch.zeros((0, 3), dtype=torch.int64)
    return torch.ops.widetopo.mask_stats(masks)
