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
engine all-reduces and hands to score() as ctx.prepass. By default g and Hg live on the
prunable tensors only (the Hessian block of the prunable weights; on a masked network on its
kept entries). hessian='all' takes g and Hg over every floating parameter (biases, BatchNorm
affine parameters too), as the WideTopo port does: Hg on the prunable weights then also gets the
terms H[w, p] g_p of the other parameters p; the scores stay theta * Hg on the prunable weights.
BatchNorm runs in train mode (batch statistics) on the engine's private buffers; other modules
(dropout) stay in eval mode, so the result depends only on the data and the masks.
In round 1, Hg of the first two samples is also computed in a second precision; their relative
difference times each tensor's total goes to ctx.noise_floor, and the engine refuses rounding-
noise scores (NoiseScoresError).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Sequence

import torch

import widetopo_ext
from widetopo.options import Options, any_integer, one_of, option, positive
from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores.baselines import PROBE_SAMPLES, noise_floors, relative_errors, require_targets
from widetopo.scores.bn import batchnorm_train_mode
from widetopo.errors import UnsupportedInputsError
from widetopo.scores.inputs import cast_floating, head
from widetopo.scores.losses import IGNORE_INDEX
from widetopo.scores.widetopo import check_finite
from widetopo.scores._util import as_dtypes, score_zeros

logger = logging.getLogger(__name__)

__all__ = ["GraSPScorer", "GraSPOptions"]


@dataclass(frozen=True)
class GraSPOptions(Options):
    temperature: float = option(200.0, "the logits are divided by this temperature before the loss", positive)
    ignore_index: int = option(IGNORE_INDEX, "target value excluded from the loss (segmentation)", any_integer)
    hessian: str = option(
        "prunable", "the Hessian block of g and Hg: 'prunable' (the prunable weights) or 'all' (every floating "
        "parameter, biases and BatchNorm affine parameters included, as the WideTopo port computes it); the "
        "scores are theta * Hg on the prunable weights either way", one_of("prunable", "all"))


class GraSPScorer(Scorer):
    """GraSP: keep score theta * Hg, signed (see the module docstring); one shot by default."""

    name = "grasp"
    data_dependent = True
    decay = False
    needs_targets = True
    needs_double_backward = True
    reports_noise_floor = True
    Options = GraSPOptions

    def _extra_names(self, ctx: ScoreContext) -> List[str]:
        """With hessian='all': the floating parameters outside the prunable set (in ctx.params order)."""
        if self.options.hessian != "all":
            return []
        prunable = set(ctx.names)
        return [n for n, p in ctx.params.items() if n not in prunable and p.is_floating_point()]

    def _extra_params(self, ctx: ScoreContext) -> List[torch.Tensor]:
        return [ctx.params[n] for n in self._extra_names(ctx)]

    def _loss_and_leaves(self, ctx: ScoreContext, batch: Batch, create_graph: bool, params=None, buffers=None):
        """(gradient of L_b with respect to leaf copies of the masked weights and, with hessian='all',
        of the other floating parameters after them; the leaves). params / buffers: other values
        than the context's (the noise probe's copies in a second precision)."""
        params = dict(ctx.params if params is None else params)
        names = list(ctx.names) + self._extra_names(ctx)
        leaves = [params[n].detach().requires_grad_(True) for n in names]
        params.update(zip(names, leaves))
        x = ctx.inputs(batch)
        if buffers is not None:  # the probe's copies
            x = cast_floating(x, leaves[0].dtype)
        loss = ctx.loss(params, batch, buffers, x=x, ignore_index=self.options.ignore_index,
                        temperature=self.options.temperature)
        grads = torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True,
                                    materialize_grads=True)
        return grads, leaves

    def _hg(self, ctx: ScoreContext, batch: Batch, g_flat: torch.Tensor, params=None, buffers=None):
        """d/dw (g . dL_b/dw) over the leaves of _loss_and_leaves (None if L_b does not depend on them)."""
        grads, leaves = self._loss_and_leaves(ctx, batch, True, params, buffers)
        z = torch.dot(torch.cat([d.reshape(-1) for d in grads]), g_flat.to(grads[0].dtype))
        if not z.requires_grad:  # the loss does not depend on the prunable weights
            return None
        return torch.autograd.grad(z, leaves, allow_unused=True, materialize_grads=True)

    def check_inputs(self, model, batch: Batch, forward_fn, loss_fn) -> None:
        """GraSP divides the logits by T before the loss: a model computing its own loss from the
        batch's `labels` cannot do that."""
        if batch.label_key is not None and loss_fn is None and self.options.temperature != 1:
            raise UnsupportedInputsError(
                f"grasp divides the logits by temperature={self.options.temperature:g} before the loss, which the "
                f"model's own loss from the batch's {batch.label_key!r} cannot do: pass temperature=1 (the model's "
                "loss), a loss_fn(output, target), or the targets under 'targets' (cross entropy of logits / T)"
            )

    def noise_advice(self) -> str:
        return ("a batch of one sample (or of identical samples) makes a train-mode BatchNorm followed by a "
                "global pool output its shift whatever the weights before it; use larger batches of distinct "
                "samples")

    def _relative_errors(self, ctx: ScoreContext, batch: Batch, g_flat: torch.Tensor):
        """Per prunable tensor, the relative rounding error of sum_j |theta_j Hg_j| m_j, measured on
        the first PROBE_SAMPLES samples of `batch`: Hg in the model's dtype against Hg in a second
        precision (float64, or float32 for a float64 model); None when it cannot be measured."""
        dtype = ctx.prunable[0].dtype
        probe = torch.float32 if dtype == torch.float64 else torch.float64
        sub = Batch(batch.index, head(batch.x, PROBE_SAMPLES), batch.y[:PROBE_SAMPLES], batch.label_key)
        cast = lambda t: t.detach().to(probe) if t.is_floating_point() else t.detach().clone()  # noqa: E731
        try:
            own = self._hg(ctx, sub, g_flat, buffers={k: b.clone() for k, b in ctx.buffers.items()})
            other = self._hg(ctx, sub, g_flat, {k: cast(p) for k, p in ctx.params.items()},
                             {k: cast(b) for k, b in ctx.buffers.items()})
        except (RuntimeError, TypeError, ValueError) as exc:  # a module that cannot run in the probe dtype
            logger.debug("grasp: no rounding-noise probe in %s: %s", probe, exc)
            return None
        if own is None or other is None:
            return None
        n = len(ctx.names)
        return relative_errors(own[:n], other[:n], ctx.prunable, ctx.masks, dtype, probe)

    def prepass(self, ctx: ScoreContext, batches: Sequence[Batch]) -> List[torch.Tensor]:
        """g = sum_b dL_b/dw * m over this process's batches (the engine sums the processes); with
        hessian='all' followed by sum_b dL_b/dp of the other floating parameters p."""
        require_targets(batches, self.name)
        n = len(ctx.names)
        g = score_zeros(ctx.prunable)
        extra = [torch.zeros_like(ctx.params[name]) for name in self._extra_names(ctx)]
        with batchnorm_train_mode(ctx.model), torch.enable_grad():
            for batch in batches:
                grads, _ = self._loss_and_leaves(ctx, batch, create_graph=False)
                widetopo_ext.accumulate_score_(g, as_dtypes(grads[:n], g), [], ctx.masks, absolute=False)
                for e, d in zip(extra, grads[n:]):
                    e.add_(d.detach())
        check_finite(g, ctx, self.name)
        return g + extra

    def score(self, ctx: ScoreContext, batches: Sequence[Batch]) -> List[torch.Tensor]:
        """sum_b theta * m * d/dw (g . dL_b/dw), g = ctx.prepass (signed: it sums across processes)."""
        require_targets(batches, self.name)
        n = len(ctx.names)
        if ctx.prepass is None or len(ctx.prepass) != n + len(self._extra_names(ctx)):
            raise RuntimeError(
                "grasp: ctx.prepass must hold the gradient g summed over the whole pruning set (one "
                "tensor per prunable name); the engine sets it from GraSPScorer.prepass before score()"
            )
        prunable = ctx.prunable
        g_flat = torch.cat([g.to(p.dtype).reshape(-1) for g, p in zip(ctx.prepass, prunable)]
                           + [g.to(p.dtype).reshape(-1) for g, p in zip(ctx.prepass[n:], self._extra_params(ctx))])
        out = score_zeros(prunable)
        with batchnorm_train_mode(ctx.model), torch.enable_grad():
            # the rounding-noise probe, in round 1 (see SNIP's)
            relative = self._relative_errors(ctx, batches[0], g_flat) if ctx.round <= 1 else None
            for batch in batches:
                hg = self._hg(ctx, batch, g_flat)
                if hg is None:
                    continue
                widetopo_ext.accumulate_score_(out, as_dtypes(hg[:n], out), as_dtypes(prunable, out), ctx.masks,
                                               absolute=False)
        check_finite(out, ctx, self.name)
        ctx.noise_floor = noise_floors(relative, out)
        return out
