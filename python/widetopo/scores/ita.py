"""ITA ("implicit target alignment", NAD in the official code) saliency, docs/design.md §2.1.

With dx ~ N(0, I) like x, dtheta_p ~ N(0, I) like every prunable theta_p, eps_x = eps_theta:
    o_s = f(x; theta*m),            p_s = f(x + eps_x dx; theta*m)
    o_t = f(x; theta'),             p_t = f(x + eps_x dx; theta'),
    theta'_p = c_p * m_p,  c_p = theta_p*m_p + eps_theta dtheta_p   (constant)
    Delta = (p_t - o_t) - (p_s - o_s),   A = sum_samples ||Delta||^2 / (eps_x eps_theta)
    S_ita += |dA/dm| * [m != 0],
with m a continuous variable; only the outermost * m carries gradient (theta*m and c_p are
constants), so d theta'_p / d m_p = c_p. Non-prunable parameters are not perturbed.
Why: A is a finite-difference estimate of how much a random weight perturbation changes the
network's input sensitivity; its mask gradient ranks weights by their effect on it.

Speed: BatchNorm is in eval mode, so samples are independent and x, x + eps_x dx are evaluated
as one concatenated batch per parameter set (2 forwards instead of 4). On CUDA the forwards
run with TF32 disabled (TF32 rounding would swamp this finite difference).
"""
from __future__ import annotations

import contextlib
import logging
from typing import List, Optional

import torch

import widetopo_ext
from widetopo.scores.base import Batch, ScoreContext
from widetopo.scores._util import as_dtypes, score_zeros
from widetopo.scores.bn import affine_batchnorm, eval_mode, uses_batch_statistics
from widetopo.scores.inputs import Inputs, concat, num_samples

logger = logging.getLogger(__name__)

__all__ = ["ita_score", "ITA_STREAM", "no_tf32"]

#: generator stream of the ITA perturbations (ctx.generator(batch.index, stream=ITA_STREAM))
ITA_STREAM = 2


@contextlib.contextmanager
def no_tf32(device: torch.device):
    """Disable TF32 matmuls/convolutions while inside (CUDA only); restore the flags after."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


_HALF = (torch.float16, torch.bfloat16)


def _upcast(tensors):
    """16-bit floating tensors of a name -> tensor dict as float32 (others unchanged)."""
    return {n: (t.float() if t.dtype in _HALF else t) for n, t in tensors.items()}


def _check_eps(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def ita_score(
    ctx: ScoreContext,
    batch: Batch,
    eps: float = 5e-4,
    out: Optional[List[torch.Tensor]] = None,
    eps_x: Optional[float] = None,
    eps_theta: Optional[float] = None,
    batched: bool = True,
) -> List[torch.Tensor]:
    """Add |dA/dm| * [m != 0] of one batch to `out` (zeros if None: float64 for float64
    parameters, else float32) and return it, one tensor per name in ctx.names.

    eps sets both eps_x and eps_theta unless they are given. Random draws come from
    ctx.generator(batch.index, stream=ITA_STREAM) in this order: dx = randn(x.shape,
    dtype=x.dtype) (x: the signal, i.e. the embedding output for token ids, docs/design.md §2.5), then dtheta_p = randn(theta_p.shape, dtype=theta_p.dtype) for p in
    ctx.names order. Runs in eval mode with the context's current buffers (calibration is the
    caller's job). 16-bit models are evaluated in float32 (draws then made in float32 too).
    batched=True evaluates x and x + eps_x*dx as one batch per parameter set, which is exact
    only when samples do not interact in eval mode; batched=False runs four separate forwards
    (for models that mix samples, e.g. attention or normalisation across the batch).
    """
    eps_x = _check_eps("eps_x", eps if eps_x is None else eps_x)
    eps_theta = _check_eps("eps_theta", eps if eps_theta is None else eps_theta)
    if out is None:
        out = score_zeros(ctx.prunable)
    x = ctx.inputs(batch)
    base, buffers = ctx.params, ctx.buffers
    with torch.no_grad():
        signal = ctx.signal(x)  # x itself, or the embedding output for token ids (§2.5): dx is shaped like it
    if signal.dtype in _HALF or any(p.dtype in _HALF for p in base.values()):
        # a 16-bit finite difference at eps = 5e-4 is rounding noise: evaluate in float32
        base, buffers = _upcast(base), _upcast(buffers)
        x = x.float() if isinstance(x, torch.Tensor) and x.dtype in _HALF else x
        if isinstance(x, Inputs):
            x = Inputs((k, v.float() if isinstance(v, torch.Tensor) and v.dtype in _HALF else v) for k, v in x.items())
        signal = signal.float()
    prunable = [base[n] for n in ctx.names]
    gen = ctx.generator(batch.index, stream=ITA_STREAM)
    dx = torch.randn(signal.shape, generator=gen, dtype=signal.dtype, device=signal.device)
    c = [torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device) for p in prunable]
    # c_p = theta_p*m_p + eps_theta*dtheta_p (prunable params already hold theta*m)
    torch._foreach_mul_(c, eps_theta)
    torch._foreach_add_(c, prunable)

    # m as a continuous variable; the mask is applied on top of theta*m and c_p
    m = [mk.to(p.dtype).requires_grad_(True) for mk, p in zip(ctx.masks, prunable)]
    src = torch._foreach_mul(prunable, m)
    tgt = torch._foreach_mul(c, m)
    params_s = dict(base)
    params_t = dict(base)
    params_s.update(zip(ctx.names, src))
    params_t.update(zip(ctx.names, tgt))

    xp = ctx.with_signal(x, lambda e: e + eps_x * dx)
    n = num_samples(x)
    with eval_mode(ctx.model), affine_batchnorm(ctx.model), no_tf32(dx.device), torch.enable_grad():
        if not batched or uses_batch_statistics(ctx.model):
            # BatchNorm without running statistics couples the samples: no concatenation
            o_s, p_s = ctx.forward(params_s, x, buffers), ctx.forward(params_s, xp, buffers)
            o_t, p_t = ctx.forward(params_t, x, buffers), ctx.forward(params_t, xp, buffers)
        else:
            xx = concat(x, xp)
            o_s, p_s = ctx.forward(params_s, xx, buffers).split(n, dim=0)
            o_t, p_t = ctx.forward(params_t, xx, buffers).split(n, dim=0)
        delta = (p_t - o_t) - (p_s - o_s)
        a = delta.pow(2).sum() / (eps_x * eps_theta)
        if a.requires_grad:
            grads = torch.autograd.grad(a, m, allow_unused=True, materialize_grads=True)
        else:
            grads = [torch.zeros_like(p) for p in prunable]
    widetopo_ext.accumulate_score_(out, as_dtypes(grads, out), [], ctx.masks, absolute=True)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("ita_score: batch %d, A = %.6g", batch.index, float(a.detach()))
    return out
