"""Saliency scorers: WideTopo (NTK-trace + ITA) and the Random, Magnitude, SNIP and SynFlow
baselines, all on the Scorer interface of scores/base.py.

    scorer = make_scorer("widetopo", mu1=0.01, mu2=1.0, eps=5e-4, probes=1)
    scores = scorer.score(ctx, batches)      # one tensor per name in ctx.names
"""
from __future__ import annotations

import inspect
from typing import Dict, Tuple, Type

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
    "make_scorer", "scorer_options", "SCORERS", "NTK_STREAM", "ITA_STREAM",
]

#: method name -> scorer class ("widetopo-s" differs from "widetopo" only in the engine's schedule)
SCORERS: Dict[str, Type[Scorer]] = {
    "widetopo": WideTopoScorer,
    "widetopo-s": WideTopoScorer,
    "random": RandomScorer,
    "magnitude": MagnitudeScorer,
    "snip": SNIPScorer,
    "synflow": SynFlowScorer,
}


def _lookup(method: str) -> Type[Scorer]:
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {', '.join(SCORERS)}; got {type(method).__name__}")
    key = method.lower()
    if key not in SCORERS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(SCORERS)}")
    return SCORERS[key]


def scorer_options(method: str) -> Tuple[str, ...]:
    """Names of the keyword options make_scorer(method, ...) accepts."""
    params = inspect.signature(_lookup(method).__init__).parameters
    return tuple(n for n in params if n != "self")


def make_scorer(method: str, **options) -> Scorer:
    """The scorer for `method` ("widetopo", "widetopo-s", "random", "magnitude", "snip",
    "synflow") built with its options; unknown options raise TypeError listing allowed ones."""
    cls = _lookup(method)
    allowed = scorer_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; "
            f"allowed: {', '.join(allowed) if allowed else 'none'}"
        )
    scorer = cls(**options)
    if method.lower() == "widetopo-s":
        scorer.name = "widetopo-s"
    return scorer
