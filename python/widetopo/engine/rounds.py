"""One scoring round (docs/design.md §2.1): score -> sum over processes -> finalize -> check,
then select: density-aware decay (if the method uses it), protect pruned entries, keep K
(globally, or per layer for methods with per-layer quotas; methods that keep whole kernels or
graphs build the masks themselves: selection "mask", Scorer.choose_masks), theta <- theta * m.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

import widetopo_ext
from widetopo.errors import NoiseScoresError, NonFiniteScoresError, ZeroScoresError  # noqa: F401  (re-exported)
from widetopo.distributed import collectives as dist_utils
from widetopo.distributed import owners as shard_plan
from widetopo.sparsity import topology
from widetopo.scores._util import score_dtype, score_zeros
from widetopo.scores.base import Batch, ScoreContext, Scorer

__all__ = ["NonFiniteScoresError", "ZeroScoresError", "NoiseScoresError", "NOISE_MARGIN", "compute_scores",
           "select_masks"]

#: a tensor's score total within this many times its rounding error (the scorer's noise floor)
#: is rounding noise. Measured total/floor: rounding noise 0.6-4.7 (most tensors of a noisy round
#: ~1); healthy rounds ~1e15 (PX, float64) and >= 176 (GraSP, SNIP in float32 on a CIFAR
#: ResNet-20; the low end: GraSP's Hg of early layers)
NOISE_MARGIN = 16.0


def _check_not_noise(scorer: Scorer, ctx: ScoreContext, scores: List[torch.Tensor], device: torch.device,
                     owner: Optional[Sequence[int]] = None) -> None:
    """Refuse a round where a tensor's score total sum_j |S_j| (kept entries, > 0) is at most
    NOISE_MARGIN times its rounding error, the noise floor the scorer reported in ctx.noise_floor
    (per tensor, per process; summed over processes here). Cost: one norm per tensor and, with
    several processes, one small all_reduce. Scorers without reports_noise_floor are not checked."""
    if not scorer.reports_noise_floor or not scores:
        return
    n = len(scores)
    floor = ctx.noise_floor
    if floor is None:  # this process scored no batch
        floor = [0.0] * n
    if len(floor) != n:
        raise RuntimeError(f"scorer {scorer.name!r}: ctx.noise_floor must hold one float per prunable tensor "
                           f"({n}), got {len(floor)}")
    rank = dist_utils.rank_world()[0]
    totals = [float(t) if o == rank else 0.0 for t, o in zip(
        torch._foreach_norm([s.masked_fill(m.logical_not(), 0) for s, m in zip(scores, ctx.masks)], 1),
        owner or [rank] * n)]
    flags = torch.tensor([list(floor), totals], dtype=torch.float64, device=device)
    if scorer.data_dependent:
        dist_utils.all_reduce_sum_([flags[0]])
    if owner is not None:
        dist_utils.all_reduce_sum_([flags[1]])
    for name, f, t in zip(ctx.names, flags[0].tolist(), flags[1].tolist()):
        if 0.0 < t <= NOISE_MARGIN * f:
            raise NoiseScoresError(
                f"the {scorer.name!r} scores of {name!r} in round {ctx.round} are rounding noise (their total "
                f"{t:.3g} is within {NOISE_MARGIN:g} times its rounding error {f:.3g}): "
                f"{scorer.noise_advice()}"
            )


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


def _owned(items: Sequence, owner: Optional[Sequence[int]], rank: int) -> list:
    return list(items) if owner is None else [x for x, o in zip(items, owner) if o == rank]


def compute_scores(scorer: Scorer, ctx: ScoreContext, mine: Sequence[Batch], device: torch.device,
                   phase: str, owner: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
    """The finalized scores of one round, identical on every process: prepass (summed over
    processes) -> score (summed over processes when data-dependent) -> finalize.
    owner (sharded scores, widetopo.distributed.owners): score j is summed into rank owner[j] only; the
    other ranks' copies of it are partial sums that select_masks ignores."""
    working = ctx.prunable
    what = f"scoring round {ctx.round} ({phase})"
    if has_prepass(scorer):
        with dist_utils.fail_together(device, what):
            pre = scorer.prepass(ctx, mine)  # over no batch: zeros of the same shapes
            if not isinstance(pre, (list, tuple)):
                raise TypeError(f"scorer {scorer.name!r}: prepass() must return a list of tensors, "
                                f"got {type(pre).__name__}")
            for j, t in enumerate(pre):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"scorer {scorer.name!r}: prepass()[{j}] must be a tensor, got {type(t).__name__}")
            pre = [t.detach().contiguous() for t in pre]
        if scorer.data_dependent:
            dist_utils.all_reduce_sum_(pre)
        ctx.prepass = pre
    ctx.noise_floor = None
    with dist_utils.fail_together(device, what):
        if mine:
            scores = _check_list(scorer, "score()", scorer.score(ctx, mine), ctx.names, working)
        else:  # no batch on this rank (an empty per-rank part, or more ranks than batches): zeros
            scores = score_zeros(working)
    if scorer.data_dependent:
        if owner is None:
            dist_utils.all_reduce_sum_(scores)
        else:
            shard_plan.reduce_to_owners_(scores, owner)
    scores = _check_list(scorer, "finalize()", scorer.finalize(ctx, scores), ctx.names, working)
    if owner is None:
        _check_finite(scorer, ctx, scores, phase)
    else:
        rank = dist_utils.rank_world()[0]
        with dist_utils.fail_together(device, what):
            _check_finite(scorer, ctx, [s if o == rank else s.new_zeros(()) for s, o in zip(scores, owner)], phase)
    _check_not_noise(scorer, ctx, scores, device, owner)
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


def _check_not_all_zero(scorer: Scorer, ctx: ScoreContext, scores: List[torch.Tensor], keep: int, kept: int,
                        owner: Optional[Sequence[int]] = None) -> None:
    """All-zero scores over the kept weights leave the choice of `keep` among them arbitrary."""
    if keep >= kept or not scores:
        return
    rank = dist_utils.rank_world()[0]
    mine = [s.masked_fill(m.logical_not(), 0) for s, m, o in zip(scores, ctx.masks, owner or [rank] * len(scores))
            if o == rank]
    peak = max([float(n) for n in torch._foreach_norm(mine, float("inf"))] if mine else [0.0])
    if owner is not None:
        flag = torch.tensor([peak], dtype=torch.float64, device=scores[0].device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        peak = float(flag)
    if peak == 0.0:
        raise ZeroScoresError(
            f"every kept weight scored 0 with {scorer.name!r} in round {ctx.round}: the ranking is "
            "arbitrary (e.g. every target equals ignore_index, or the output does not depend on "
            "the prunable weights); check the data and the method"
        )


def _nonzero_kept(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], owner) -> int:
    """Kept entries with a nonzero score, over every rank's own tensors when scores are sharded."""
    count = sum(int(torch.count_nonzero(s.ne(0).logical_and_(m))) for s, m in zip(scores, masks))  # bool temporaries
    if owner is not None:
        flag = torch.tensor([count], dtype=torch.int64, device=scores[0].device if scores else "cpu")
        torch.distributed.all_reduce(flag)
        count = int(flag)
    return count


def _check_decay_underflow(scorer: Scorer, ctx: ScoreContext, before: int, after: int, keep: int,
                           compression_factor: float, density: float) -> None:
    """The decay multiplies by (m / (out_deg * in_deg))^(c / gamma); with a small gamma that factor
    underflows to 0, and a cut among scores that are all 0 would follow the tie rule, not the method."""
    if after < min(keep, before):
        raise ZeroScoresError(
            f"round {ctx.round} of {scorer.name!r}: the density-aware decay (exponent -log10(density)/"
            f"compression_factor = {-math.log10(density) / compression_factor:.3g}) underflowed "
            f"{before - after} kept scores to 0, leaving {after} nonzero for {keep} places; the cut would "
            f"follow the tie rule. Use a larger compression_factor (got {compression_factor:g}; published: 5)"
        )


def select_masks(scorer: Scorer, ctx: ScoreContext, scores: List[torch.Tensor], keep: int, mode: str,
                 compression_factor: float, kept: int, n_prunable: int, layouts=None,
                 owner: Optional[Sequence[int]] = None) -> None:
    """Write the round's masks into ctx.masks (in place) and apply them to ctx.prunable.
    layouts: the unit topology of each tensor (widetopo.sparsity.topology) for the density decay.
    owner: sharded scores (widetopo.distributed.owners): each rank selects its own tensors, the
    threshold is the sharded global top-k, and owners broadcast the masks."""
    all_masks = ctx.masks
    if scorer.selection == "mask":  # same inputs on every rank (data-free scores): no sharding needed
        # (no collective inside: a rank whose choose_masks raises makes every rank raise)
        with dist_utils.fail_together(ctx.device, f"selecting the masks of round {ctx.round}"):
            _set_chosen_masks(scorer, ctx, scores, keep)
        return
    _check_not_all_zero(scorer, ctx, scores, keep, kept, owner)
    rank = dist_utils.rank_world()[0]
    full_layouts = layouts if layouts is not None else [topology.DENSE] * len(all_masks)
    masks, own_layouts = _owned(all_masks, owner, rank), _owned(full_layouts, owner, rank)
    own_scores = _owned(scores, owner, rank)
    if scorer.decay and kept > 0:  # (kept == 0: everything is pruned already)
        before = _nonzero_kept(own_scores, masks, owner)
        topology.density_decay_(own_scores, masks, own_layouts, -math.log10(kept / n_prunable) / compression_factor)
        _check_decay_underflow(scorer, ctx, before, _nonzero_kept(own_scores, masks, owner), keep,
                               compression_factor, kept / n_prunable)
    if kept < n_prunable:
        protect_pruned(own_scores, masks)
    if owner is not None:
        _select_sharded(scorer, ctx, scores, keep, mode, owner, rank)
        shard_plan.broadcast_masks_(all_masks, owner)
        widetopo_ext.apply_masks_(ctx.prunable, all_masks)
        return
    masks = all_masks
    if scorer.selection == "layerwise":
        quotas = _checked_quotas(scorer, ctx, keep)
        for s, m, q in zip(scores, masks, quotas):
            widetopo_ext.global_threshold([s], [m], q, "exact")
    elif scorer.selection == "global":
        widetopo_ext.global_threshold(scores, masks, keep, mode)
    else:
        raise ValueError(f"scorer {scorer.name!r}: selection must be 'global', 'layerwise' or 'mask', got {scorer.selection!r}")
    widetopo_ext.apply_masks_(ctx.prunable, masks)


def _set_chosen_masks(scorer: Scorer, ctx: ScoreContext, scores: List[torch.Tensor], keep: int) -> None:
    """selection = "mask": the scorer's masks, checked (bool, shapes, no revived weight), then applied."""
    chosen = scorer.choose_masks(ctx, scores, keep)
    if not isinstance(chosen, (list, tuple)) or len(chosen) != len(ctx.masks):
        raise RuntimeError(f"scorer {scorer.name!r}: choose_masks must return {len(ctx.masks)} bool masks")
    for name, c, m in zip(ctx.names, chosen, ctx.masks):
        if not isinstance(c, torch.Tensor) or c.dtype != torch.bool or c.shape != m.shape:
            raise RuntimeError(f"scorer {scorer.name!r}: choose_masks gave {name!r} a "
                               f"{getattr(c, 'dtype', type(c).__name__)} mask; expected bool of shape {tuple(m.shape)}")
        if bool((c & ~m).any()):
            raise RuntimeError(f"scorer {scorer.name!r}: choose_masks revived pruned weights of {name!r}")
    with torch.no_grad():
        for m, c in zip(ctx.masks, chosen):
            m.copy_(c)
    widetopo_ext.apply_masks_(ctx.prunable, ctx.masks)


def _checked_quotas(scorer: Scorer, ctx: ScoreContext, keep: int) -> List[int]:
    masks = ctx.masks
    quotas = [int(q) for q in scorer.layer_quotas(ctx, keep)]
    if len(quotas) != len(masks) or sum(quotas) != keep or any(q < 0 or q > m.numel() for q, m in zip(quotas, masks)):
        raise RuntimeError(
            f"scorer {scorer.name!r}: layer_quotas must give one count per prunable tensor, each in "
            f"[0, numel], summing to {keep}; got {quotas}"
        )
    return quotas


def _select_sharded(scorer: Scorer, ctx: ScoreContext, scores, keep: int, mode: str, owner, rank: int) -> None:
    """Selection on this rank's own tensors; masks of the other tensors are left to their owners."""
    from widetopo.distributed.sharded import sharded_global_threshold

    own = [j for j, o in enumerate(owner) if o == rank]
    if scorer.selection == "layerwise":
        quotas = _checked_quotas(scorer, ctx, keep)
        for j in own:
            widetopo_ext.global_threshold([scores[j]], [ctx.masks[j]], quotas[j], "exact")
    elif scorer.selection == "global":
        index = [(j, 0, scores[j].numel()) for j in own]
        sharded_global_threshold([scores[j] for j in own], [ctx.masks[j] for j in own], keep, mode, index=index)
    else:
        raise ValueError(f"scorer {scorer.name!r}: selection must be 'global', 'layerwise' or 'mask', got {scorer.selection!r}")
