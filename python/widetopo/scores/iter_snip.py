"""Iterative SNIP (de Jorge et al., ICLR 2021), docs/design.md §5.4.

Per round, with w = theta * m the current masked weights:
    S = | theta * d/dtheta sum_b L_b(theta * m) | = | sum_b w * dL_b/dw * m |,
L_b the mean cross entropy of batch b (per position for segmentation logits). The gradient goes
through the mask, so pruned entries score exactly 0 and a weight pruned in one round can never
outscore a kept one later: the masks of the rounds are nested. BatchNorm runs in train mode
(batch statistics) on the engine's private buffers, as one-shot SNIP's default does (so SNIP is
this method with one round); other modules (dropout) stay in eval mode so the scores depend on
nothing but the data and the masks.

Why: SNIP's saliency is the first-order change of the loss when a weight is removed; recomputing
it on the already-pruned network over many rounds (T = 100) accounts for the weights removed
before, which one-shot SNIP cannot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from widetopo.options import Options, any_integer, option
from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores.baselines import snip_sum
from widetopo.scores.bn import batchnorm_train_mode
from widetopo.scores.losses import IGNORE_INDEX

__all__ = ["IterSNIPScorer", "IterSNIPOptions"]


@dataclass(frozen=True)
class IterSNIPOptions(Options):
    ignore_index: int = option(IGNORE_INDEX, "target value excluded from the loss (segmentation)", any_integer)


class IterSNIPScorer(Scorer):
    """Iterative SNIP: |sum_b theta * dL_b/dtheta| at theta * m, BatchNorm in train mode.

    score() returns the signed sum over its batches; finalize() takes the absolute value after
    the engine has summed every process's batches (split-invariant)."""

    name = "iter-snip"
    data_dependent = True
    decay = False
    needs_targets = True
    needs_double_backward = False
    Options = IterSNIPOptions

    reports_noise_floor = True

    def score(self, ctx: ScoreContext, batches: Sequence[Batch]) -> List[torch.Tensor]:
        return snip_sum(ctx, batches, self.name, self.options.ignore_index, batchnorm_train_mode,
                        probe=ctx.round <= 1)

    def noise_advice(self) -> str:
        return ("a batch of one sample (or of identical samples) makes a train-mode BatchNorm followed by a "
                "global pool output its shift whatever the weights before it; use larger batches of distinct "
                "samples")

    def finalize(self, ctx: ScoreContext, scores: List[torch.Tensor]) -> List[torch.Tensor]:
        torch._foreach_abs_(scores)
        return scores
