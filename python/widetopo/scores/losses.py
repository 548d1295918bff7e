"""The task loss of the loss-based methods (SNIP, GraSP, iterative SNIP).

Classification logits (N, C) against class indices (N,), or dense-prediction logits
(N, C, d1, ...) against per-position indices (N, d1, ...): mean cross entropy over every
sample / position whose target is not `ignore_index` (torch.nn.functional.cross_entropy).
A batch whose every target is ignored contributes 0 (not NaN); if that is true of the whole
pruning set, the engine refuses the all-zero scores (widetopo.engine.rounds.ZeroScoresError).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from widetopo.constants import IGNORE_INDEX

__all__ = ["task_loss", "IGNORE_INDEX"]


def task_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX,
              reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of `logits` against `target`; per-pixel for segmentation logits."""
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"targets must hold class indices (an integer tensor), got {target.dtype}")
    if logits.dim() < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"targets of shape {tuple(target.shape)} do not fit logits of shape {tuple(logits.shape)}: "
            "expected (N,) for (N, C) logits, or (N, d1, ...) for (N, C, d1, ...) logits"
        )
    target = target.long()
    if reduction == "mean" and not bool((target != ignore_index).any()):
        # every target ignored: no signal (0 with zero gradient) rather than torch's NaN
        return (logits * 0).sum()
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
