"""The WideTopo saliency: S = mu1 * S_ntk + mu2 * S_ita, summed over the scoring batches.

Per batch: one BatchNorm calibration (shared by both terms), then the NTK-trace Hutchinson
term (ntk.py) and the ITA term (ita.py), each accumulated per batch with its absolute value.
Density-aware decay is applied by the engine after the cross-process sum (decay = True), so
the sum over batches stays split-invariant.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Sequence

import torch

from widetopo.options import Options, between, boolean, integer, option
from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores._util import score_zeros
from widetopo.scores.bn import calibrate_batchnorm, eval_mode
from widetopo.scores.ita import ita_score
from widetopo.scores.ntk import ntk_score

logger = logging.getLogger(__name__)

__all__ = ["WideTopoScorer", "WideTopoOptions", "check_finite"]


def check_finite(scores: Sequence[torch.Tensor], ctx: ScoreContext, method: str) -> None:
    """Raise FloatingPointError naming the first layer (and the round) with a NaN/inf score."""
    if not scores:
        return
    ok = torch.stack([torch.isfinite(s).all() for s in scores]).tolist()
    for name, good in zip(ctx.names, ok):
        if not good:
            raise FloatingPointError(
                f"{method} scores of layer {name!r} are not finite (NaN or inf) in round "
                f"{ctx.round} (density {ctx.density:.6g}); check the data and the model's outputs "
                "for NaN/inf"
            )


@dataclass(frozen=True)
class WideTopoOptions(Options):
    mu1: float = option(0.01, "weight of the NTK-trace term S_ntk", between(0.0, 1e6))
    mu2: float = option(1.0, "weight of the ITA term S_ita", between(0.0, 1e6))
    eps: float = option(5e-4, "finite-difference step of ITA (eps_x = eps_theta)", between(1e-7, 1.0))
    probes: int = option(1, "Hutchinson probes per batch", integer(1))
    ita_batched: bool = option(True, "evaluate x and x + eps*dx as one batch (False: separately, for models "
                                     "whose samples interact in eval mode)", boolean)


class WideTopoScorer(Scorer):
    """WideTopo (and WideTopo-S: same scorer, shorter schedule) saliency:
    S = mu1 * S_ntk + mu2 * S_ita, with density-aware decay applied by the engine."""

    name = "widetopo"
    data_dependent = True
    decay = True
    needs_targets = False
    Options = WideTopoOptions

    perturbs_inputs_options = "pass mu2=0 (no ITA term)"

    @property
    def perturbs_inputs(self) -> bool:
        """The ITA term perturbs the input (the embedding output for token ids)."""
        return self.options.mu2 != 0

    @property
    def needs_double_backward(self) -> bool:
        """The NTK-trace term differentiates a gradient; with mu1 = 0 only ITA remains."""
        return self.options.mu1 != 0

    def score(self, ctx: ScoreContext, batches: Sequence[Batch]) -> List[torch.Tensor]:
        """mu1 * sum_b |sum_probes h_b * theta * m| + mu2 * sum_b |dA_b/dm| * [m != 0]."""
        opts = self.options
        prunable = ctx.prunable
        s_ntk = score_zeros(prunable)
        s_ita = score_zeros(prunable)
        with eval_mode(ctx.model):
            for batch in batches:
                calibrate_batchnorm(ctx, ctx.inputs(batch))
                if opts.mu1 != 0:
                    ntk_score(ctx, batch, probes=opts.probes, out=s_ntk)
                if opts.mu2 != 0:
                    ita_score(ctx, batch, eps=opts.eps, out=s_ita, batched=opts.ita_batched)
        torch._foreach_mul_(s_ntk, opts.mu1)
        torch._foreach_mul_(s_ita, opts.mu2)
        torch._foreach_add_(s_ntk, s_ita)
        check_finite(s_ntk, ctx, self.name)
        return s_ntk
