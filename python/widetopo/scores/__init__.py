"""Saliency scorers: WideTopo (NTK-trace + ITA) and the comparison methods, all on the Scorer
interface of scores/base.py; widetopo.methods registers them under their method names.

    scorer = make_scorer("widetopo", mu1=0.01, mu2=1.0, eps=5e-4, probes=1)
    scores = scorer.score(ctx, batches)      # one tensor per name in ctx.names
"""
from __future__ import annotations

from typing import Tuple

from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores.baselines import MagnitudeScorer, RandomScorer, SNIPScorer, SynFlowScorer
from widetopo.scores.bn import calibrate_batchnorm
from widetopo.scores.ita import ITA_STREAM, ita_score
from widetopo.scores.ntk import NTK_STREAM, ntk_score
from widetopo.scores.widetopo import WideTopoScorer

__all__ = [
    "Scorer", "ScoreContext", "Batch",
    "WideTopoScorer", "SNIPScorer", "SynFlowScorer", "MagnitudeScorer", "RandomScorer",
    "ntk_score", "ita_score", "calibrate_batchnorm",
    "make_scorer", "scorer_options", "NTK_STREAM", "ITA_STREAM",
]

def scorer_options(method: str) -> Tuple[str, ...]:
    """Names of the options of a registered method (widetopo.methods)."""
    from widetopo.methods import get_method

    return get_method(method).option_names


def make_scorer(method: str, **options) -> Scorer:
    """The scorer of the registered `method` (widetopo.methods) built with its options;
    unknown options raise ValueError listing the allowed ones."""
    from widetopo.methods import get_method

    return get_method(method).make_scorer(**options)
