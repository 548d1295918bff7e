"""Pure-PyTorch reference implementations of the widetopo ops.

This module is the readable statement of what every op computes. It is written straight from
the formulas in docs/design.md (§2, §7), independently of the compiled kernels, and is what the
tests compare the kernels against. It is deliberately simple and not fast: it may concatenate and
sort (the compiled ops never do).

Signatures match the wrappers in `widetopo_ext` (lists of tensors, `None` for "all ones" where the
wrappers allow it). Only the minimal input checks needed to state the semantics are done here
(NaN/inf and `keep` range for the threshold); the argument checking lives in the wrappers.

Layout for tensors of rank >= 2: dim 0 = output units O, dim 1 = input units I, the remaining
dims flattened = kernel K, so a tensor is viewed as (O, I, K).
"""
import math
from typing import List, Optional, Sequence

import torch

from ._ops import DEFAULT_NOISE_SCALE, OPS

__all__ = [*OPS, "apply_masks_to_grads_"]

_HALF_TYPES = (torch.float16, torch.bfloat16)


def _as_oik(t: torch.Tensor) -> torch.Tensor:
    """View (copy if needed) a rank >= 2 tensor as (O, I, K)."""
    o, i = t.shape[0], t.shape[1]
    k = math.prod(t.shape[2:])
    return t.reshape(o, i, k)


def _degrees(m: torch.Tensor):
    """out_deg[o] = sum_{i,k} m[o,i,k],  in_deg[i] = sum_{o,k} m[o,i,k]  (int64)."""
    m3 = _as_oik(m).to(torch.int64)
    return m3.sum(dim=(1, 2)), m3.sum(dim=(0, 2))


def _device_of(tensors: Sequence[torch.Tensor]) -> torch.device:
    return tensors[0].device if len(tensors) else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# 1. global threshold
# ---------------------------------------------------------------------------------------------
def global_threshold(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], keep: int,
                     mode: str = "exact") -> torch.Tensor:
    """Keep the `keep` highest scores over all tensors together; write the bool masks in place.

    exact:    stable descending sort of the concatenation (tensor index, row-major flat index);
              the first `keep` entries are kept, so ties at the cut go to the entry that comes
              first. Returns the smallest kept score (+inf when keep == 0).
    official: k = N - keep; every score <= sorted_ascending[k] is pruned, all when k >= N.
              Returns sorted_ascending[k] (+inf when k >= N).
    The result is a 0-d float64 tensor.
    """
    for j, s in enumerate(scores):
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores[{j}] contains NaN or inf; scores must be finite")
    n = sum(s.numel() for s in scores)
    if not 0 <= keep <= n:
        raise ValueError(f"keep must be in [0, N] = [0, {n}], got {keep}")
    device = _device_of(scores)
    inf = torch.tensor(math.inf, dtype=torch.float64, device=device)
    if n == 0:
        return inf
    # float64 holds every float16/bfloat16/float32 value exactly, so the order is unchanged.
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scores])
    if mode == "exact":
        order = torch.sort(flat, descending=True, stable=True).indices
        kept = torch.zeros(n, dtype=torch.bool, device=device)
        kept[order[:keep]] = True
        threshold = flat[order[keep - 1]] if keep > 0 else inf
    elif mode == "official":
        k = n - keep
        if k >= n:
            kept = torch.zeros(n, dtype=torch.bool, device=device)
            threshold = inf
        else:
            threshold = torch.sort(flat).values[k]
            kept = flat > threshold
    else:
        raise ValueError(f"mode must be 'exact' or 'official', got {mode!r}")
    start = 0
    for s, m in zip(scores, masks):
        m.copy_(kept[start:start + s.numel()].reshape(m.shape))
        start += s.numel()
    return threshold.clone().to(torch.float64)


# ---------------------------------------------------------------------------------------------
# 2. density decay
# ---------------------------------------------------------------------------------------------
def density_decay_(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], exponent: float) -> None:
    """S[o,i,k] *= (m[o,i,k] / max(out_deg[o] * in_deg[i], 1)) ** exponent for rank >= 2 tensors.

    Pruned entries get factor 0 (also for exponent 0), kept ones max(out_deg*in_deg, 1)^-exponent.
    Rank < 2 tensors are untouched. The factor is computed in float64.
    """
    for s, m in zip(scores, masks):
        if s.dim() < 2 or s.numel() == 0:
            continue
        out_deg, in_deg = _degrees(m)
        denom = (out_deg[:, None] * in_deg[None, :]).clamp(min=1).to(torch.float64)
        factor = torch.where(_as_oik(m), denom.pow(-exponent)[:, :, None], 0.0)
        new = _as_oik(s).to(torch.float64) * factor
        s.copy_(new.reshape(s.shape).to(s.dtype))


# ---------------------------------------------------------------------------------------------
# 3. restoration scores
# ---------------------------------------------------------------------------------------------
def restoration_scores(masks: Sequence[torch.Tensor], noise: Sequence[Optional[torch.Tensor]],
                       noise_scale: float = DEFAULT_NOISE_SCALE) -> List[torch.Tensor]:
    """Scores for mask restoration (docs/design.md §2.3), float32, one contiguous tensor per mask.

    kept entries: 2. Pruned entries of rank >= 2 tensors:
        (1 - out_density[o]) * (1 - in_density[i]) + noise_scale * noise[o, i],
        out_density[o] = out_deg[o] / (I*K),  in_density[i] = in_deg[i] / (O*K).
    Pruned entries of rank < 2 tensors: 1 (their noise is ignored).
    """
    out = []
    for m, n in zip(masks, noise):
        if m.dim() < 2:
            out.append(torch.where(m, 2.0, 1.0).to(torch.float32).contiguous())
            continue
        if m.numel() == 0:
            out.append(torch.empty(m.shape, dtype=torch.float32, device=m.device))
            continue
        o, i = m.shape[0], m.shape[1]
        k = math.prod(m.shape[2:])
        out_deg, in_deg = _degrees(m)
        out_density = (out_deg.to(torch.float64) / (i * k)).to(torch.float32)
        in_density = (in_deg.to(torch.float64) / (o * k)).to(torch.float32)
        pruned = (1.0 - out_density)[:, None] * (1.0 - in_density)[None, :] + noise_scale * n.to(torch.float32)
        score = torch.where(_as_oik(m), 2.0, pruned[:, :, None].to(torch.float32))
        out.append(score.reshape(m.shape).to(torch.float32).contiguous())
    return out


# ---------------------------------------------------------------------------------------------
# 4. score accumulation
# ---------------------------------------------------------------------------------------------
def accumulate_score_(scores: Sequence[torch.Tensor], a: Sequence[torch.Tensor],
                      b: Optional[Sequence[torch.Tensor]] = None, masks: Optional[Sequence[torch.Tensor]] = None,
                      absolute: bool = True) -> None:
    """S += |a * b * m| (absolute) or S += a * b * m; b = None/[] means 1, masks = None/[] means 1.

    The product is taken by selection (pruned entries contribute exactly 0, even if a*b is NaN),
    in float32 for 16-bit scores and in the score dtype otherwise.
    """
    b = list(b) if b else [None] * len(scores)
    masks = list(masks) if masks else [None] * len(scores)
    for s, x, y, m in zip(scores, a, b, masks):
        math_t = torch.float32 if s.dtype in _HALF_TYPES else s.dtype
        p = x.to(math_t)
        if y is not None:
            p = p * y.to(math_t)
        if m is not None:
            p = torch.where(m, p, torch.zeros((), dtype=math_t, device=p.device))
        if absolute:
            p = p.abs()
        s.copy_((s.to(math_t) + p).to(s.dtype))


# ---------------------------------------------------------------------------------------------
# 5. masked squared norm
# ---------------------------------------------------------------------------------------------
def masked_sq_norm(tensors: Sequence[torch.Tensor], masks: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """sum_j ||t_j * m_j||^2 as a 0-d tensor (float32 for 16-bit inputs, else the input dtype).

    Accumulated in float64; differentiable (plain torch ops), pruned entries selected away.
    """
    if len(tensors) == 0:
        return torch.zeros((), dtype=torch.float32)
    out_t = torch.float32 if tensors[0].dtype in _HALF_TYPES else tensors[0].dtype
    masks = list(masks) if masks else [None] * len(tensors)
    total = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
    for t, m in zip(tensors, masks):
        v = t.to(torch.float64)
        if m is not None:
            v = torch.where(m, v, torch.zeros((), dtype=torch.float64, device=v.device))
        total = total + v.pow(2).sum()
    return total.to(out_t)


# ---------------------------------------------------------------------------------------------
# 6. mask application
# ---------------------------------------------------------------------------------------------
def apply_masks_(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """t <- m ? t : 0 in place (selection: a pruned NaN/inf becomes exactly 0)."""
    with torch.no_grad():
        for t, m in zip(tensors, masks):
            t.copy_(torch.where(m, t, torch.zeros((), dtype=t.dtype, device=t.device)))


def apply_masks_to_grads_(params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """apply_masks_ on p.grad for every parameter whose .grad is not None."""
    pairs = [(p.grad, m) for p, m in zip(params, masks) if p.grad is not None]
    apply_masks_([g for g, _ in pairs], [m for _, m in pairs])


# ---------------------------------------------------------------------------------------------
# 7. mask statistics
# ---------------------------------------------------------------------------------------------
def mask_stats(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 (n, 3): kept, active output units, active input units per mask.

    rank >= 2: active outputs = #{o: out_deg[o] > 0}, active inputs = #{i: in_deg[i] > 0}.
    rank < 2: (kept, kept, kept). Empty tensors give zeros.
    """
    rows = []
    for m in masks:
        kept = int(m.sum())
        if m.dim() >= 2:
            out_deg, in_deg = _degrees(m)
            rows.append([kept, int((out_deg > 0).sum()), int((in_deg > 0).sum())])
        else:
            rows.append([kept, kept, kept])
    return torch.tensor(rows, dtype=torch.int64, device=_device_of(masks)).reshape(len(rows), 3)
