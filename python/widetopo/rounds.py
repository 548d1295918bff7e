"""One scoring round (docs/design.md §2.1): score -> sum over processes -> finalize -> check,
then select: density-aware decay (if the method uses it), protect pruned entries, keep K
(globally, or per layer for methods with per-layer quotas), theta <- theta * m.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch

import widetopo_ext
from widetopo import distributed as dist_utils
from widetopo.scores.base import Batch, ScoreContext, Scorer

__all__ = ["NonFiniteScoresError", "ZeroScoresError", "compute_scores", "select_masks", "score_dtype"]


class NonFiniteScoresError(RuntimeError):
    """A scorer produced NaN or inf scores."""


class ZeroScoresError(RuntimeError):
    """Every kept weight scored 0: any mask would be an arbitrary choice."""


def score_dtype(p: torch.Tensor) -> torch.dtype:
    """Scores are summed, decayed and thresholded in float64 for float64 parameters, else in
    float32 (also for 16-bit models), so every process all-reduces the same dtype."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _zeros_like_scores(working: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [torch.zeros(p.shape, dtype=score_dtype(p), device=p.device) for p in working]


def _check_list(scorer: Scorer, what: str, scores, names: Sequence[str], working: Sequence[torch.Tensor]):
    """Scores as contiguous tensors of the score dtype, on the parameters' device, never
    aliasing a parameter; a clear TypeError for anything else."""
    if not isinstance(scores, (list, tuple)) or len(scores) != len(working):
        raise TypeError(
            f"scorer {scorer.name!r} must return from {what} a list of {len(working)} score tensors "
            f"(one per prunable parameter), got {type(scores).__name__}"
            + (f" of length {len(scores)}" if isinstance(scores, (list, tuple)) else "")
        )
    out = []
    for name, s, p in zip(names, scores, working):
        if not isinstance(s, torch.Tensor) or not s.is_floating_point() or s.shape != p.shape:
            raise TypeError(
                f"scorer {scorer.name!r}: the score of {name!r} must be a floating tensor of shape "
                f"{tuple(p.shape)}, got {getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}"
            )
        s = s.detach()
        if s.device != p.device or s.dtype != score_dtype(p):
            s = s.to(device=p.device, dtype=score_dtype(p))
        if not s.is_contiguous():
            s = s.contiguous()
        if s.data_ptr() == p.data_ptr():
            s = s.clone()
        out.append(s)
    return out


def _check_finite(scorer: Scorer, ctx: ScoreContext, scores: List[torch.Tensor], phase: str) -> None:
    if not scores:
        return
    finite = torch.stack([torch.isfinite(s).all() for s in scores])
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise NonFiniteScoresError(
            f"scorer {scorer.name!r} produced non-finite (NaN or inf) scores for layer "
            f"{ctx.names[bad]!r} in round {ctx.round} ({phase}); check the data and the model's outputs"
        )


def compute_scores(scorer: Scorer, ctx: ScoreContext, mine: Sequence[Batch], device: torch.device,
                   phase: str) -> List[torch.Tensor]:
    """The finalized scores of one round, identical on every process: prepass (summed over
    processes) -> score (summed over processes when data-dependent) -> finalize."""
    working = ctx.prunable
    what = f"scoring round {ctx.round} ({phase})"
    if has_prepass(scorer):
        with dist_utils.fail_together(device, what):
            pre = scorer.prepass(ctx, mine)  # over no batch: zeros of the same shapes
            if not isinstance(pre, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in pre):
                raise TypeError(f"scorer {scorer.name!r}: prepass() must return a list of tensors, "
                                f"got {type(pre).__name__}")
            pre = [t.detach().contiguous() for t in pre]
        if scorer.data_dependent:
            dist_utils.all_reduce_sum_(pre)
        ctx.prepass = pre
    with dist_utils.fail_together(device, what):
        if mine:
            scores = _check_list(scorer, "score()", scorer.score(ctx, mine), ctx.names, working)
        else:  # more processes than batches: this rank contributes nothing to the sum
            scores = _zeros_like_scores(working)
    if scorer.data_dependent:
        dist_utils.all_reduce_sum_(scores)
    scores = _check_list(scorer, "finalize()", scorer.finalize(ctx, scores), ctx.names, working)
    _check_finite(scorer, ctx, scores, phase)
    return scores


def has_prepass(scorer: Scorer) -> bool:
    """Whether the scorer overrides Scorer.prepass (known alike on every process)."""
    return type(scorer).prepass is not Scorer.prepass


def protect_pruned(scores: List[torch.Tensor], masks: List[torch.Tensor]) -> None:
    """Give pruned entries the lowest finite score and every kept entry a strictly higher
    one, so no threshold (with any tie rule) can revive a pruned weight - even when kept
    weights score 0 like the pruned ones. (Kept scores below finfo.min/2 are clamped there.)"""
    by_dtype = {}
    for s in scores:
        by_dtype.setdefault(s.dtype, []).append(s)
    for dtype, group in by_dtype.items():
        torch._foreach_clamp_min_(group, torch.finfo(dtype).min / 2)
    for s, m in zip(scores, masks):
        s.masked_fill_(m.logical_not(), torch.finfo(s.dtype).min)


def _check_not_all_zero(scorer: Scorer, ctx: ScoreContext, scores: List[torch.Tensor], keep: int, kept: int) -> None:
    """All-zero scores over the kept weights leave the choice of `keep` among them arbitrary."""
    if keep >= kept or not scores:
        return
    peak = max(float(n) for n in torch._foreach_norm([s.masked_fill(m.logical_not(), 0) for s, m in
                                                       zip(scores, ctx.masks)], float("inf")))
    if peak == 0.0:
        raise ZeroScoresError(
            f"every kept weight scored 0 with {scorer.name!r} in round {ctx.round}: the ranking is "
            "arbitrary (e.g. every target equals ignore_index, or the output does not depend on "
            "the prunable weights); check the data and the method"
        )


def select_masks(scorer: Scorer, ctx: ScoreContext, scores: List[torch.Tensor], keep: int, mode: str,
                 compression_factor: float, kept: int, n_prunable: int) -> None:
    """Write the round's masks into ctx.masks (in place) and apply them to ctx.prunable."""
    masks = ctx.masks
    _check_not_all_zero(scorer, ctx, scores, keep, kept)
    if scorer.decay and kept > 0:  # (kept == 0: everything is pruned already)
        widetopo_ext.density_decay_(scores, masks, -math.log10(kept / n_prunable) / compression_factor)
    if kept < n_prunable:
        protect_pruned(scores, masks)
    if scorer.selection == "layerwise":
        quotas = [int(q) for q in scorer.layer_quotas(ctx, keep)]
        if len(quotas) != len(masks) or sum(quotas) != keep or any(
            q < 0 or q > m.numel() for q, m in zip(quotas, masks)
        ):
            raise RuntimeError(
                f"scorer {scorer.name!r}: layer_quotas must give one count per prunable tensor, each in "
                f"[0, numel], summing to {keep}; got {quotas}"
            )
        for s, m, q in zip(scores, masks, quotas):
            widetopo_ext.global_threshold([s], [m], q, "exact")
    elif scorer.selection == "global":
        widetopo_ext.global_threshold(scores, masks, keep, mode)
    else:
        raise ValueError(f"scorer {scorer.name!r}: selection must be 'global' or 'layerwise', got {scorer.selection!r}")
    widetopo_ext.apply_masks_(ctx.prunable, masks)
