"""The WideTopo saliency: S = mu1 * S_ntk + mu2 * S_ita, summed over the scoring batches.

Per batch: one BatchNorm calibration (shared by both terms), then the NTK-trace Hutchinson
term (ntk.py) and the ITA term (ita.py), each accumulated per batch with its absolute value.
Density-aware decay is applied by the engine after the cross-process sum (decay = True), so
the sum over batches stays split-invariant.
"""
from __future__ import annotations

import logging
from typing import List, Sequence

import torch

from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores._util import score_zeros
from widetopo.scores.bn import calibrate_batchnorm, eval_mode
from widetopo.scores.ita import _check_eps, ita_score
from widetopo.scores.ntk import _check_probes, ntk_score

logger = logging.getLogger(__name__)

__all__ = ["WideTopoScorer", "check_finite"]


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


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class WideTopoScorer(Scorer):
    """WideTopo (and WideTopo-S: same scorer, shorter schedule) saliency.

    Options: mu1 (NTK weight, 0.01), mu2 (ITA weight, 1.0), eps (eps_x = eps_theta, 5e-4),
    probes (Hutchinson probes per batch, 1).
    """

    name = "widetopo"
    data_dependent = True
    decay = True
    needs_targets = False

    def __init__(self, mu1: float = 0.01, mu2: float = 1.0, eps: float = 5e-4, probes: int = 1):
        self.mu1 = _check_weight("mu1", mu1)
        self.mu2 = _check_weight("mu2", mu2)
        self.eps = _check_eps("eps", eps)
        self.probes = _check_probes(probes)

    def __repr__(self) -> str:
        return f"WideTopoScorer(mu1={self.mu1}, mu2={self.mu2}, eps={self.eps}, probes={self.probes})"

    def score(self, ctx: ScoreContext, batches: Sequence[Batch]) -> List[torch.Tensor]:
        """mu1 * sum_b |sum_probes h_b * theta * m| + mu2 * sum_b |dA_b/dm| * [m != 0]."""
        prunable = ctx.prunable
        s_ntk = score_zeros(prunable)
        s_ita = score_zeros(prunable)
        with eval_mode(ctx.model):
            for batch in batches:
                calibrate_batchnorm(ctx, batch.x.to(ctx.device))
                if self.mu1 != 0:
                    ntk_score(ctx, batch, probes=self.probes, out=s_ntk)
                if self.mu2 != 0:
                    ita_score(ctx, batch, eps=self.eps, out=s_ita)
        torch._foreach_mul_(s_ntk, self.mu1)
        torch._foreach_mul_(s_ita, self.mu2)
        torch._foreach_add_(s_ntk, s_ita)
        check_finite(s_ntk, ctx, self.name)
        return s_ntk
