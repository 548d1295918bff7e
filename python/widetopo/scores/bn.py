"""BatchNorm calibration and evaluation-mode handling for scoring forwards.

WideTopo scores the network with BatchNorm as a fixed affine map (eval mode) whose statistics
are those of the scoring batch itself: reset the running statistics, set momentum to 1, run one
train-mode forward without gradients (running stats <- this batch's mean and unbiased variance),
then evaluate in eval mode. Eval mode makes the samples of a batch independent, which is what
lets the ITA term evaluate x and x + eps*dx as one concatenated batch.

Only the scorer's private buffer copies (ScoreContext.buffers) are written; module attributes
that are changed temporarily (training flags, momentum) are restored, also on error.

In eval mode a BatchNorm layer is the affine map y = x * s + b with
s = weight / sqrt(running_var + eps), b = bias - running_mean * s. `affine_batchnorm` runs it
in that form (differentiable in weight and bias): the forward values are those of the CPU
batch_norm kernel, and its first and second derivatives are two elementwise ops instead of
batch_norm's general backward (whose double backward made up ~15 % of an NTK-trace HVP).
"""
from __future__ import annotations

import contextlib
import logging
import types
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from widetopo.scores.inputs import num_samples, sample_shape

logger = logging.getLogger(__name__)

__all__ = ["affine_batchnorm", "calibrate_batchnorm", "eval_mode", "batchnorm_modules", "uses_batch_statistics",
           "batchnorm_train_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode for the duration; restore each module's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def batchnorm_modules(model: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """(qualified name, module) of every BatchNorm module (BatchNorm1d/2d/3d, SyncBatchNorm)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def uses_batch_statistics(model: nn.Module) -> bool:
    """True if some BatchNorm normalises with batch statistics even in eval mode
    (track_running_stats=False); then samples of a batch are not independent."""
    return any(m.running_mean is None or m.running_var is None for _, m in batchnorm_modules(model))


_STOCK_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def _affine_forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm as x * s + b (falls back to the module's own forward otherwise)."""
    mean, var, weight, bias = self.running_mean, self.running_var, self.weight, self.bias
    if (
        self.training or mean is None or var is None or x.dim() < 2
        or any(t is not None and t.dtype != x.dtype for t in (mean, var, weight, bias))
    ):
        return type(self).forward(self, x)
    self._check_input_dim(x)
    scale = torch.rsqrt(var + self.eps)
    if weight is not None:
        scale = weight * scale
    shift = -(mean * scale) if bias is None else bias - mean * scale
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


@contextlib.contextmanager
def affine_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """While inside, BatchNorm modules with the stock forward (BatchNorm1d/2d/3d, SyncBatchNorm)
    compute eval mode as y = x * s + b, s = weight / sqrt(running_var + eps),
    b = bias - running_mean * s. Same values, cheaper (double) backward; train mode, missing
    running statistics and mixed dtypes use the module's own forward. Re-entrant; the instance
    attributes it sets are removed on exit, also on error."""
    patched = []
    try:
        for _, module in batchnorm_modules(model):
            if "forward" not in vars(module) and type(module).forward in _STOCK_FORWARDS:
                module.forward = types.MethodType(_affine_forward, module)
                patched.append(module)
        yield model
    finally:
        for module in patched:
            vars(module).pop("forward", None)


def _prefixed(name: str, attr: str) -> str:
    return f"{name}.{attr}" if name else attr


@torch.no_grad()
def calibrate_batchnorm(ctx, x) -> int:
    """Set the context's BatchNorm running statistics to the statistics of batch `x`.

    For every BatchNorm module with running statistics: running_mean <- 0, running_var <- 1,
    num_batches_tracked <- 0 in ctx.buffers, momentum <- 1, then one forward of
    f(x; ctx.params) with those modules in train mode (every other module in eval mode, so
    dropout draws nothing), without gradients. Afterwards running_mean / running_var hold this
    batch's mean and unbiased variance. SyncBatchNorm modules compute local statistics here (no
    cross-process reduction). Module flags and momenta are restored as found, also on error;
    the model's own buffers are never written (functional_call swaps in ctx.buffers).

    Returns the number of calibrated modules (no forward is run when it is 0).
    """
    model = ctx.model
    targets = []
    for name, module in batchnorm_modules(model):
        if not module.track_running_stats:
            continue
        keys = [_prefixed(name, a) for a in ("running_mean", "running_var")]
        missing = [k for k in keys if k not in ctx.buffers]
        if missing:
            raise KeyError(
                f"calibrate_batchnorm: ctx.buffers has no entry {missing[0]!r} for BatchNorm module "
                f"{name!r}; ctx.buffers must hold every buffer of ctx.model"
            )
        targets.append((name, module))
    if not targets:
        return 0

    buffers: Dict[str, torch.Tensor] = ctx.buffers
    for name, _ in targets:
        buffers[_prefixed(name, "running_mean")].zero_()
        buffers[_prefixed(name, "running_var")].fill_(1.0)
        nbt = buffers.get(_prefixed(name, "num_batches_tracked"))
        if nbt is not None:
            nbt.zero_()

    saved = [(m, m.momentum) for _, m in targets]
    synced = [m for _, m in targets if isinstance(m, nn.SyncBatchNorm) and "forward" not in vars(m)]
    with eval_mode(model):
        try:
            for _, module in targets:
                module.momentum = 1.0
                module.train()
            for module in synced:
                # local statistics: a SyncBatchNorm would all-reduce them across processes, which
                # hangs when ranks score different numbers of batches and mixes their data
                module.forward = types.MethodType(_BatchNorm.forward, module)
            try:
                ctx.forward(ctx.params, x, buffers)
            except ValueError as exc:
                if "Expected more than 1 value per channel" not in str(exc):
                    raise
                raise ValueError(
                    f"BatchNorm calibration needs more than one value per channel, but a pruning batch has "
                    f"{num_samples(x)} sample(s) of shape {sample_shape(x)}: drop the incomplete last batch "
                    "(DataLoader(..., drop_last=True)) or choose max_samples so that every batch has at "
                    "least 2 samples"
                ) from None
        finally:
            for module, momentum in saved:
                module.momentum = momentum
            for module in synced:
                vars(module).pop("forward", None)
    return len(targets)


@contextlib.contextmanager
def batchnorm_train_mode(model: nn.Module) -> Iterator[nn.Module]:
    """While inside, BatchNorm modules are in train mode (they normalise with the statistics of
    the batch, as the loss-based methods GraSP and iterative SNIP score) and every other module
    is in eval mode, so dropout draws nothing and the scores depend only on the run's seed.

    SyncBatchNorm modules use the local BatchNorm forward (each batch is scored whole on one
    process, so its statistics are the batch's own; no collective that could hang when ranks
    score different numbers of batches). Running statistics updated by these forwards go to
    whatever buffers the forward is given (ctx.buffers: private). Flags and forwards are
    restored as found, also on error."""
    synced = [m for _, m in batchnorm_modules(model) if isinstance(m, nn.SyncBatchNorm) and "forward" not in vars(m)]
    with eval_mode(model):
        try:
            for _, module in batchnorm_modules(model):
                module.train()
            for module in synced:
                module.forward = types.MethodType(_BatchNorm.forward, module)
            yield model
        finally:
            for module in synced:
                vars(module).pop("forward", None)
