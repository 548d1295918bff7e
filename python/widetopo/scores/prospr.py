"""ProsPr, prospect pruning (Alizadeh et al., ICLR 2022), docs/design.md §5.7.

A mask variable c = 1 multiplies every prunable weight. From theta_0 = theta * m * c (m the
current mask) take M plain SGD steps on one pruning batch (x, y), keeping the graph:

    theta_{t+1} = (theta_t - eta * dL(x; theta_t)/dtheta_t) * m,     t = 0 .. M-1

(every trainable parameter steps - biases and BatchNorm affine too - no momentum, no weight
decay; BatchNorm in train mode on the engine's private buffers, other modules in eval mode).
The score is the meta-gradient through the whole trajectory (full second order):

    S = | sum_b dL(x_b; theta_M^(b)) / dc |

Why: it ranks a weight by how much the loss after a few steps of training depends on keeping
it, not only by the loss at initialisation (M = 0 is SNIP: |theta * dL/dtheta|).
Each pruning batch runs its own trajectory (the paper: one batch of 128, reused for every step
and for the final loss); the signed meta-gradients are summed over batches and processes and
|.| is taken in finalize, so the result does not depend on how batches are split.
first_order=True treats d theta_M / d theta_0 as the identity: S = |sum_b theta * m * dL(theta_M)/dtheta_M|.
Cost per batch: about 3 (M + 1) forward+backward passes (M + 1 without second order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

import widetopo_ext
from widetopo.options import Options, any_integer, boolean, integer, option, positive
from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores.baselines import require_targets
from widetopo.scores.bn import batchnorm_train_mode
from widetopo.scores.losses import IGNORE_INDEX
from widetopo.scores.widetopo import check_finite
from widetopo.scores._util import as_dtypes, score_zeros

__all__ = ["ProsPrScorer", "ProsPrOptions"]


@dataclass(frozen=True)
class ProsPrOptions(Options):
    steps: int = option(3, "M: plain SGD steps of the inner trajectory (0 = SNIP with BatchNorm in train mode)",
                        integer(0))
    lr: float = option(0.1, "eta: learning rate of the inner SGD steps", positive)
    first_order: bool = option(False, "treat d theta_M / d theta_0 as the identity (no second order)", boolean)
    ignore_index: int = option(IGNORE_INDEX, "target value excluded from the loss (segmentation)", any_integer)


class ProsPrScorer(Scorer):
    """ProsPr: |d L(theta_M) / d c| through M SGD steps (see the module docstring); one shot."""

    name = "prospr"
    data_dependent = True
    decay = False
    needs_targets = True
    Options = ProsPrOptions

    @property
    def needs_double_backward(self) -> bool:
        return self.options.steps > 0 and not self.options.first_order

    def _trainable(self, ctx: ScoreContext) -> List[str]:
        """Names of the parameters the inner steps update: the prunable ones and every other
        floating parameter of the model that requires grad."""
        prunable = set(ctx.names)
        flags = {n: p.requires_grad for n, p in ctx.model.named_parameters()}
        return [n for n, p in ctx.params.items()
                if p.is_floating_point() and (n in prunable or flags.get(n, False))]

    def _meta_gradient(self, ctx: ScoreContext, batch: Batch) -> List[torch.Tensor]:
        """dL(x; theta_M)/dc for one batch (first order: theta * m * dL/dtheta_M)."""
        opts = self.options
        x = ctx.inputs(batch)
        second = self.needs_double_backward
        c = [torch.ones_like(p).requires_grad_(True) for p in ctx.prunable]
        trainable = self._trainable(ctx)
        params: Dict[str, torch.Tensor] = dict(ctx.params)
        if second:  # theta_0 = theta * m * c; the other trainable parameters are leaves of the trajectory
            params.update({n: params[n].detach().requires_grad_(True) for n in trainable})
            params.update({n: p * ci for n, p, ci in zip(ctx.names, ctx.prunable, c)})
        masks = dict(zip(ctx.names, ctx.masks))
        for _ in range(opts.steps):
            current = [params[n] if second else params[n].detach().requires_grad_(True) for n in trainable]
            if not second:
                params.update(zip(trainable, current))
            loss = ctx.loss(params, batch, x=x, ignore_index=opts.ignore_index)
            grads = torch.autograd.grad(loss, current, create_graph=second, allow_unused=True,
                                        materialize_grads=True)
            for n, p, g in zip(trainable, current, grads):
                step = p - opts.lr * g
                params[n] = step * masks[n] if n in masks else step
        if not second:  # first order (and M = 0): theta_0 * m * dL/dtheta_M, theta_0 = theta * m
            leaves = [params[n].detach().requires_grad_(True) for n in ctx.names]
            params.update(zip(ctx.names, leaves))
            loss = ctx.loss(params, batch, x=x, ignore_index=opts.ignore_index)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
            return [g * t0 for g, t0 in zip(grads, ctx.prunable)]
        loss = ctx.loss(params, batch, x=x, ignore_index=opts.ignore_index)
        return list(torch.autograd.grad(loss, c, allow_unused=True, materialize_grads=True))

    def score(self, ctx: ScoreContext, batches: Sequence[Batch]) -> List[torch.Tensor]:
        """sum_b dL_b(theta_M)/dc * m over `batches`, signed (finalize takes |.|)."""
        require_targets(batches, self.name)
        out = score_zeros(ctx.prunable)
        with batchnorm_train_mode(ctx.model), torch.enable_grad():
            for batch in batches:
                grads = self._meta_gradient(ctx, batch)
                widetopo_ext.accumulate_score_(out, as_dtypes(grads, out), [], ctx.masks, absolute=False)
        check_finite(out, ctx, self.name)
        return out

    def finalize(self, ctx: ScoreContext, scores: List[torch.Tensor]) -> List[torch.Tensor]:
        """|sum over all batches and processes of the meta-gradients|."""
        torch._foreach_abs_(scores)
        return scores
