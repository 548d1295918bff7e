"""SynFlow-L2 (Gebhart, Saxena & Schrater, 2021): the path-norm of SynFlow with squared weights.

Every parameter (and floating buffer) is squared, the net is evaluated in eval mode on an
all-ones input shaped like one sample, h = sum f(1; theta^2), and

    S = |theta| * dh/d(theta^2)       (score_form="abs", the form of the public implementations)
    S = theta^2 * dh/d(theta^2)       (score_form="square")

masked (pruned entries score 0). Data-free; float64 with SynFlow's per-layer power-of-two
rescaling when even float64 over- or underflows (widetopo.scores.baselines.synflow_scores).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from widetopo.options import Options, one_of, option, optional, shape
from widetopo.scores.baselines import SynFlowScorer

__all__ = ["SynFlowL2Scorer", "SynFlowL2Options"]


@dataclass(frozen=True)
class SynFlowL2Options(Options):
    input_shape: Optional[Tuple[int, ...]] = option(
        None, "shape of one input sample (default: from the first batch)", optional(shape))
    score_form: str = option("abs", "'abs': S = |theta| * dh/d(theta^2); 'square': S = theta^2 * dh/d(theta^2)",
                             one_of("abs", "square"))


class SynFlowL2Scorer(SynFlowScorer):
    """S = |theta|^q * dh/d(theta^2), h = sum f(1; theta^2), q = 1 ("abs") or 2 ("square")."""

    name = "synflow-l2"
    Options = SynFlowL2Options
    power = 2

    def multiplier_power(self) -> int:
        return 1 if self.options.score_form == "abs" else 2
