"""PAGS (Hoang et al., NeurIPS 2023): a population of SNIP masks ranked by how close each
layer's mask graph is to a Ramanujan expander; docs/design.md §5.10.

Member j (j = 0 .. P-1) is the SNIP mask |theta * dL/dtheta| (top K over the kept weights,
exact K) computed with BatchNorm in train mode on a random half (ceil(n/2) samples, at least 2
when available) of the union of pruning batches j mod B and (j+1) mod B (one batch when B = 1),
drawn with ctx.generator(j, PAGS_STREAM). Its fitness is

    D = sum over layers l with kept > min_kept and density > min_density of sqrt(dr_l^2 + lam_l^2)

for the layer's mask flattened to the bipartite graph M in {0,1}^(C_out x C_in*k) (dim 0
against the rest):

    dr  = sqrt(d_L - 1) + sqrt(d_R - 1) - s2(M)       Ramanujan gap; d_L, d_R = average degree of
                                                       the non-isolated rows / columns
    lam = s1(|theta * M|) - s2(|theta * M|)            weighted spectral gap

with s1 >= s2 the two largest singular values. The adjacency [[0, M^T], [M, 0]] has eigenvalues
+-s_i (and zeros), so its *third* largest |eigenvalue| is s2; the singular values come from the
eigenvalues of the short side's Gram matrix (float64), never from an eigensolve of the much
larger adjacency. The member with the largest D is kept (ties: the earlier member).

gap="port" reproduces the WideTopo port: the second largest |eigenvalue| of the adjacency (= s1)
stands for s2, so lam = 0, and dr = 2 sqrt(d - 1) - s1(M) with d the average degree over every
node of the graph (layers where d < 1 give NaN there and are skipped).

Why: expander-like (Ramanujan) masks keep information flowing through sparse layers; SNIP alone
ignores the mask's graph structure, so PAGS samples many SNIP masks and keeps the best-connected.
The engine takes the chosen mask as it is (selection "mask"): exactly K weights. score() has no
per-weight saliency (it returns the current mask; widetopo.saliency gives that).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

import widetopo_ext
from widetopo.options import Options, any_integer, boolean, integer, nonnegative, one_of, option
from widetopo.scores.inputs import concat, num_samples, take
from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores.baselines import snip_sum
from widetopo.scores.bn import batchnorm_train_mode
from widetopo.scores.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)

__all__ = ["PAGSOptions", "PAGSScorer", "top_singular_values", "layer_distance", "mask_distance",
           "PAGS_STREAM"]

#: generator stream of the members' sample draws
PAGS_STREAM = 7


def top_singular_values(a: torch.Tensor) -> Tuple[float, float]:
    """(s1, s2), the two largest singular values of the 2-D tensor `a` (s2 = 0 if it has one),
    from the eigenvalues of the short side's Gram matrix in float64."""
    a = a.to(torch.float64)
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    ev = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    s1 = float(ev[-1]) if ev.numel() else 0.0
    s2 = float(ev[-2]) if ev.numel() > 1 else 0.0
    return s1, s2


def layer_distance(mask: torch.Tensor, weight: torch.Tensor, gap: str = "paper") -> Tuple[float, float]:
    """(dr, lam) of one layer (module docstring); `mask` and `weight` of rank >= 2, flattened to
    (shape[0], rest). gap="port": the WideTopo port's dr and lam = 0 (dr is NaN when d < 1)."""
    m = mask.reshape(mask.shape[0], -1).to(torch.float64)
    kept = float(m.sum())
    if gap == "port":
        d = 2.0 * kept / (m.shape[0] + m.shape[1])
        s1, _ = top_singular_values(m)
        return (2.0 * math.sqrt(d - 1.0) - s1 if d >= 1.0 else math.nan), 0.0
    rows = int((m.sum(1) > 0).sum())
    cols = int((m.sum(0) > 0).sum())
    if kept == 0:
        return 0.0, 0.0
    d_left, d_right = kept / rows, kept / cols
    _, s2 = top_singular_values(m)
    w1, w2 = top_singular_values(weight.reshape(m.shape).to(torch.float64).abs() * m)
    return math.sqrt(d_left - 1.0) + math.sqrt(d_right - 1.0) - s2, w1 - w2


def mask_distance(masks: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], gap: str = "paper",
                  min_kept: int = 1000, min_density: float = 1e-3) -> float:
    """D = sum of sqrt(dr^2 + lam^2) over the layers of rank >= 2 with kept > min_kept and
    kept / numel > min_density (NaN layers of gap="port" count 0)."""
    total = 0.0
    for m, w in zip(masks, weights):
        kept = int(m.sum())
        if m.dim() < 2 or kept <= min_kept or kept / m.numel() <= min_density:
            continue
        dr, lam = layer_distance(m, w, gap)
        value = math.hypot(dr, lam)
        if math.isfinite(value):
            total += value
    return total


@dataclass(frozen=True)
class PAGSOptions(Options):
    population: int = option(1000, "number P of SNIP masks drawn (each on its own random half of two batches)",
                             integer(1))
    gap: str = option("paper", "'paper': s2 = second singular value of the mask (third |eigenvalue| of the "
                      "bipartite adjacency), dr with left/right degrees; 'port': the WideTopo port's second "
                      "|eigenvalue| (= s1, so lam = 0) and dr = 2 sqrt(d - 1) - s1", one_of("paper", "port"))
    min_kept: int = option(1000, "layers count in the fitness only with more kept weights than this", integer(0))
    min_density: float = option(1e-3, "... and a density above this", nonnegative)
    half: bool = option(True, "each member sees a random half of its two batches (False: both whole)", boolean)
    ignore_index: int = option(IGNORE_INDEX, "target value excluded from the loss (segmentation)", any_integer)


class PAGSScorer(Scorer):
    """PAGS over SNIP (module docstring); selection "mask": score() keeps the batches,
    choose_masks() draws the population for the round's K. Under torch.distributed every
    process is handed the whole pruning set (a data-free scorer without first_batch_only: gathered
    from per-rank parts, widetopo.distributed.data_split) and computes the whole population itself."""

    name = "pags"
    selection = "mask"
    data_dependent = False  # members need whole batch pairs: every process scores the whole set, no sum
    decay = False
    needs_targets = True
    Options = PAGSOptions

    def _member_batch(self, ctx: ScoreContext, batches: Sequence[Batch], j: int) -> Batch:
        n = len(batches)
        pair = [batches[j % n]] if n == 1 else [batches[j % n], batches[(j + 1) % n]]
        x = (pair[0].x if len(pair) == 1 else concat(pair[0].x, pair[1].x)).to(ctx.device)  # dict batches too
        y = torch.cat([b.y for b in pair]).to(ctx.device)
        if self.options.half:
            n = num_samples(x)
            count = min(n, max(2, (n + 1) // 2))
            pick = torch.randperm(n, generator=ctx.generator(j, PAGS_STREAM), device=ctx.device)[:count]
            x, y = take(x, pick), y[pick]
        return Batch(j, x, y, pair[0].label_key)

    def score(self, ctx: ScoreContext, batches: Sequence[Batch]) -> List[torch.Tensor]:
        """No per-weight score: the current mask (1 kept, 0 pruned); keeps the batches for
        choose_masks, which draws the population once the round's K is known."""
        if not batches:
            raise ValueError(f"{self.name} draws its population from the pruning batches: pass at least one")
        ctx.extra["pags_batches"] = list(batches)
        return [m.to(torch.float64 if p.dtype == torch.float64 else torch.float32) for m, p in
                zip(ctx.masks, ctx.prunable)]

    def choose_masks(self, ctx: ScoreContext, scores: List[torch.Tensor], keep: int) -> List[torch.Tensor]:
        """The member mask (exactly min(keep, kept) weights) with the largest fitness D."""
        batches = ctx.extra.get("pags_batches")
        if batches is None:
            raise RuntimeError("pags: choose_masks needs the batches that score() keeps (internal error)")
        keep = min(keep, int(sum(int(m.sum()) for m in ctx.masks)))
        opts = self.options
        best: Optional[Tuple[float, int, List[torch.Tensor]]] = None
        member = [torch.empty(m.shape, dtype=torch.bool, device=m.device) for m in ctx.masks]
        for j in range(opts.population):
            s = snip_sum(ctx, [self._member_batch(ctx, batches, j)], self.name, opts.ignore_index,
                         batchnorm_train_mode)
            torch._foreach_abs_(s)
            ranked = [t.masked_fill(m.logical_not(), -1.0) for t, m in zip(s, ctx.masks)]  # kept weights first
            widetopo_ext.global_threshold(ranked, member, keep, "exact")
            d = mask_distance(member, ctx.prunable, opts.gap, opts.min_kept, opts.min_density)
            if best is None or d > best[0]:
                best = (d, j, [m.clone() for m in member])
        d, j, chosen = best
        logger.debug("%s: member %d of %d has the largest fitness %.6g (round %d)", self.name, j,
                     opts.population, d, ctx.round)
        return chosen
