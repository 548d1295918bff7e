"""NTK-trace saliency of WideTopo (Hutchinson estimate), docs/design.md §2.1.

For a scoring batch x and a probe v ~ N(0, I) shaped like the logits:
    g = grad_theta <v, f(x; theta*m)>,  g_p <- g_p * m_p for prunable p (others keep g),
    t = ||g||^2                      (Hutchinson estimate of the NTK trace),
    h = grad_theta t = 2 H g         (Hessian-vector product, double backward),
    S_ntk += | sum_probes h * theta * m |.
Why: t tracks the trainability of the masked network; h * theta * m is the first-order change
of t when a weight is removed.

The forward runs through ctx.forward with leaf copies of ctx.params (which already hold
theta*m for prunable tensors), so the gradient with respect to theta*m differs from the one
with respect to theta only by a factor m, which the final * m applies anyway.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch

import widetopo_ext
from widetopo.scores.base import Batch, ScoreContext
from widetopo.scores._util import as_dtypes, score_zeros
from widetopo.scores.bn import affine_batchnorm, eval_mode

logger = logging.getLogger(__name__)

__all__ = ["ntk_score", "NTK_STREAM"]

#: generator stream of the Hutchinson probes (ctx.generator(batch.index, stream=NTK_STREAM))
NTK_STREAM = 1


def _check_probes(probes) -> int:
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an integer >= 1, got {probes!r}")
    return probes


def _leaf_params(ctx: ScoreContext):
    """Leaf copies (sharing storage) of every floating parameter, requiring grad."""
    return {
        n: (p.detach().requires_grad_(True) if p.is_floating_point() else p.detach())
        for n, p in ctx.params.items()
    }


def ntk_score(
    ctx: ScoreContext,
    batch: Batch,
    probes: int = 1,
    out: Optional[List[torch.Tensor]] = None,
) -> List[torch.Tensor]:
    """Add |sum_probes h * theta * m| of one batch to `out` (created as zeros if None: float64
    for float64 parameters, else float32) and return it, one tensor per name in ctx.names.

    Probes are drawn from ctx.generator(batch.index, stream=NTK_STREAM), one after the other,
    each with torch.randn(logits.shape, dtype=logits.dtype). The forward runs in eval mode with
    the context's current buffers; BatchNorm calibration is the caller's job (WideTopoScorer
    calibrates once per batch for both terms).
    """
    probes = _check_probes(probes)
    prunable = ctx.prunable
    if out is None:
        out = score_zeros(prunable)
    x = ctx.inputs(batch)
    params = _leaf_params(ctx)
    prunable_set = set(ctx.names)
    pr_leaves = [params[n] for n in ctx.names]
    other_names = [n for n, p in params.items() if n not in prunable_set and p.requires_grad]
    all_names = list(ctx.names) + other_names
    all_leaves = pr_leaves + [params[n] for n in other_names]
    gen = ctx.generator(batch.index, stream=NTK_STREAM)

    h_sum: Optional[List[torch.Tensor]] = None
    with eval_mode(ctx.model), affine_batchnorm(ctx.model), torch.enable_grad():
        logits = ctx.forward(params, x)
        for k in range(probes):
            v = torch.randn(logits.shape, generator=gen, dtype=logits.dtype, device=logits.device)
            grads = torch.autograd.grad(
                logits, all_leaves, grad_outputs=v, create_graph=True,
                retain_graph=True, allow_unused=True, materialize_grads=True,
            )
            g_pr = list(grads[: len(ctx.names)])
            g_other = list(grads[len(ctx.names):])
            t = widetopo_ext.masked_sq_norm(g_pr, ctx.masks)
            if g_other:
                t = t + widetopo_ext.masked_sq_norm(g_other, [])
            if t.requires_grad:
                h = torch.autograd.grad(
                    t, pr_leaves, retain_graph=k + 1 < probes,
                    allow_unused=True, materialize_grads=True,
                )
                h = [hi.detach() for hi in h]
            else:  # f is linear in every prunable weight: the Hessian term vanishes
                h = [torch.zeros_like(p) for p in prunable]
            if h_sum is None:
                h_sum = list(h)
            else:
                torch._foreach_add_(h_sum, h)
            del grads, g_pr, g_other, t, h
    widetopo_ext.accumulate_score_(out, as_dtypes(h_sum, out), as_dtypes(prunable, out), ctx.masks, absolute=True)
    logger.debug("ntk_score: batch %d, %d probe(s), %d parameters", batch.index, probes, len(all_names))
    return out
