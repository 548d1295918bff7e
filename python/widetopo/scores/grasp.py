"""GraSP, gradient signal preservation (Wang, Zhang & Grosse, ICLR 2020), docs/design.md §5.3.

With w = theta * m the masked prunable weights, L_b = task_loss(f(x_b; w) / T, y_b) the mean
cross entropy of batch b at temperature T (200):
    g  = sum_b dL_b/dw * m                       (stopped; over ALL batches and processes)
    Hg = sum_b d/dw (g . dL_b/dw) * m            (double backward: Hessian times g)
    S  = theta * Hg, signed; the weights with the LOWEST S are pruned, so S itself is the
         "keep" score (higher = keep) returned here.
Why: removing weight j (a step -theta_j along coordinate j) changes the gradient norm g.g by
about -2 theta_j (Hg)_j. A large theta * Hg means removing the weight shrinks the gradient flow
a lot (keep it); a very negative one means removing it even increases the flow (prune it). The
paper writes the score as -theta * Hg and removes its top fraction: the same ranking.
No normalisation: dividing by a signed sum (as one public port does) flips the ranking when the
sum is negative.

g must be complete before Hg is formed, so it is the `prepass` hook: per-process sums that the
engine all-reduces and hands to score() as ctx.prepass. g and Hg live on the prunable tensors
only (the Hessian block of the prunable weights); on a masked network on its kept entries.
BatchNorm runs in train mode (batch statistics) on the engine's private buffers; other modules
(dropout) stay in eval mode, so the result depends only on the data and the masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

import widetopo_ext
from widetopo.options import Options, any_integer, option, positive
from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores.baselines import require_targets
from widetopo.scores.bn import batchnorm_train_mode
from widetopo.scores.losses import IGNORE_INDEX, task_loss
from widetopo.scores.widetopo import check_finite
from widetopo.scores._util import as_dtypes, score_zeros

__all__ = ["GraSPScorer", "GraSPOptions"]


@dataclass(frozen=True)
class GraSPOptions(Options):
    temperature: float = option(200.0, "the logits are divided by this temperature before the loss", positive)
    ignore_index: int = option(IGNORE_INDEX, "target value excluded from the loss (segmentation)", any_integer)


class GraSPScorer(Scorer):
    """GraSP: keep score theta * Hg, signed (see the module docstring); one shot by default."""

    name = "grasp"
    data_dependent = True
    decay = False
    needs_targets = True
    needs_double_backward = True
    Options = GraSPOptions

    def _loss_and_leaves(self, ctx: ScoreContext, batch: Batch, create_graph: bool):
        """(gradient of L_b with respect to leaf copies of the masked weights, the leaves)."""
        leaves = [p.detach().requires_grad_(True) for p in ctx.prunable]
        params = dict(ctx.params)
        params.update(zip(ctx.names, leaves))
        logits = ctx.forward(params, batch.x.to(ctx.device))
        loss = task_loss(logits / self.options.temperature, batch.y.to(ctx.device), self.options.ignore_index)
        grads = torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True,
                                    materialize_grads=True)
        return grads, leaves

    def prepass(self, ctx: ScoreContext, batches: Sequence[Batch]) -> List[torch.Tensor]:
        """g = sum_b dL_b/dw * m over this process's batches (the engine sums the processes)."""
        require_targets(batches, self.name)
        g = score_zeros(ctx.prunable)
        with batchnorm_train_mode(ctx.model), torch.enable_grad():
            for batch in batches:
                grads, _ = self._loss_and_leaves(ctx, batch, create_graph=False)
                widetopo_ext.accumulate_score_(g, as_dtypes(grads, g), [], ctx.masks, absolute=False)
        check_finite(g, ctx, self.name)
        return g

    def score(self, ctx: ScoreContext, batches: Sequence[Batch]) -> List[torch.Tensor]:
        """sum_b theta * m * d/dw (g . dL_b/dw), g = ctx.prepass (signed: it sums across processes)."""
        require_targets(batches, self.name)
        if ctx.prepass is None or len(ctx.prepass) != len(ctx.names):
            raise RuntimeError(
                "grasp: ctx.prepass must hold the gradient g summed over the whole pruning set (one "
                "tensor per prunable name); the engine sets it from GraSPScorer.prepass before score()"
            )
        prunable = ctx.prunable
        g_flat = torch.cat([g.to(p.dtype).reshape(-1) for g, p in zip(ctx.prepass, prunable)])
        out = score_zeros(prunable)
        with batchnorm_train_mode(ctx.model), torch.enable_grad():
            for batch in batches:
                grads, leaves = self._loss_and_leaves(ctx, batch, create_graph=True)
                z = torch.dot(torch.cat([d.reshape(-1) for d in grads]), g_flat)
                if not z.requires_grad:  # the loss does not depend on the prunable weights
                    continue
                hg = torch.autograd.grad(z, leaves, allow_unused=True, materialize_grads=True)
                widetopo_ext.accumulate_score_(out, as_dtypes(hg, out), as_dtypes(prunable, out), ctx.masks,
                                               absolute=False)
        check_finite(out, ctx, self.name)
        return out
