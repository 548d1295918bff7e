"""Fake (meta) implementations of every widetopo op and the autograd formula of masked_sq_norm.

The fake implementations give output shapes/dtypes/devices without data, so the ops work under
torch.compile, FakeTensorMode and the meta device. Imported once by widetopo_ext/__init__.py
after the schemas have been registered by widetopo_ext._C.
"""
import torch

from ._ops import DEFAULT_NOISE_SCALE

_HALF_TYPES = (torch.float16, torch.bfloat16)


def _device(tensors, fallback="cpu"):
    return tensors[0].device if len(tensors) else torch.device(fallback)


@torch.library.register_fake("widetopo::global_threshold")
def _global_threshold_fake(scores, masks, keep, rule="exact"):
    # The cut value: 0-d float64 on the scores' device. Masks are written in place.
    return torch.empty((), dtype=torch.float64, device=_device(scores))


@torch.library.register_fake("widetopo::density_decay_")
def _density_decay_fake(scores, masks, exponent):
    return None


@torch.library.register_fake("widetopo::restoration_scores")
def _restoration_scores_fake(masks, noise, noise_scale=DEFAULT_NOISE_SCALE):
    # One contiguous float32 tensor per mask, same shape and device.
    return [torch.empty(m.shape, dtype=torch.float32, device=m.device) for m in masks]


@torch.library.register_fake("widetopo::accumulate_score_")
def _accumulate_score_fake(scores, a, b, masks, absolute=True):
    return None


@torch.library.register_fake("widetopo::masked_sq_norm")
def _masked_sq_norm_fake(tensors, masks):
    # 0-d; float32 accumulation result for 16-bit inputs, the input dtype otherwise.
    dtype = torch.float32
    if len(tensors) and tensors[0].dtype not in _HALF_TYPES:
        dtype = tensors[0].dtype
    return torch.empty((), dtype=dtype, device=_device(tensors))


@torch.library.register_fake("widetopo::apply_masks_")
def _apply_masks_fake(tensors, masks):
    return None


@torch.library.register_fake("widetopo::mask_stats")
def _mask_stats_fake(masks):
    return torch.empty((len(masks), 3), dtype=torch.int64, device=_device(masks))


# ---------------------------------------------------------------------------------------------
# autograd of masked_sq_norm:  d/dt sum (t*m)^2 = 2 * t * m
# ---------------------------------------------------------------------------------------------
def _masked_sq_norm_setup_context(ctx, inputs, output):
    tensors, masks = inputs
    ctx.n_tensors = len(tensors)
    ctx.save_for_backward(*tensors, *masks)


def _masked_sq_norm_backward(ctx, grad):
    """grad_t = 2 * grad * t * m, by selection (matches the forward, which selects pruned entries
    away). Plain differentiable torch ops, so create_graph=True gives double backward - the
    Hutchinson Hessian-vector product differentiates through this."""
    saved = ctx.saved_tensors
    tensors, masks = saved[:ctx.n_tensors], saved[ctx.n_tensors:]
    grads = []
    for j, t in enumerate(tensors):
        g = 2 * grad * t.to(grad.dtype)
        if masks:
            g = torch.where(masks[j], g, torch.zeros((), dtype=g.dtype, device=g.device))
        grads.append(g.to(t.dtype))
    # Same structure as the inputs: one entry per tensor, None for each (bool) mask.
    return grads, [None] * len(masks)


torch.library.register_autograd(
    "widetopo::masked_sq_norm", _masked_sq_norm_backward, setup_context=_masked_sq_norm_setup_context
)
