"""Baseline saliencies on the same Scorer interface as WideTopo: Random, Magnitude, SNIP, SynFlow.

Every scorer gives pruned entries (m = 0) the score 0 and kept entries a score >= 0, so an
engine that thresholds globally never revives a pruned weight ahead of a kept one.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import widetopo_ext
from widetopo.options import Options, any_integer, boolean, format_shape, one_of, option, optional, shape
from widetopo.scores.inputs import cast_floating, head
from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores.losses import IGNORE_INDEX
from widetopo.scores._util import as_dtypes, score_zeros
from widetopo.scores.bn import batchnorm_train_mode, calibrate_batchnorm, eval_mode
from widetopo.scores.widetopo import check_finite

logger = logging.getLogger(__name__)

__all__ = ["RandomScorer", "MagnitudeScorer", "SNIPScorer", "SynFlowScorer", "synflow_scores",
           "RandomOptions", "SNIPOptions", "SynFlowOptions", "snip_sum", "require_targets"]


@dataclass(frozen=True)
class RandomOptions(Options):
    distribution: str = option("uniform", "draw per weight: 'uniform' (1 - U[0,1)) or 'normal' (|z|)",
                               one_of("uniform", "normal"))


class RandomScorer(Scorer):
    """Random saliency: one draw per weight from ctx.generator(0) (depends on seed and round).

    distribution="uniform": 1 - U[0, 1) in (0, 1];  "normal": |z|, z ~ N(0, 1). Both give a
    uniformly random ranking of the kept weights; pruned weights score 0.
    """

    name = "random"
    data_dependent = False
    first_batch_only = True  # reads no batch
    decay = False
    needs_targets = False
    Options = RandomOptions

    def score(self, ctx: ScoreContext, batches: Sequence[Batch] = ()) -> List[torch.Tensor]:
        prunable = ctx.prunable
        gen = ctx.generator(0)
        out = score_zeros(prunable)
        if self.options.distribution == "uniform":
            draws = [torch.rand(s.shape, generator=gen, dtype=s.dtype, device=s.device) for s in out]
            torch._foreach_neg_(draws)
            torch._foreach_add_(draws, 1.0)
        else:
            draws = [torch.randn(s.shape, generator=gen, dtype=s.dtype, device=s.device) for s in out]
        widetopo_ext.accumulate_score_(out, draws, [], ctx.masks, absolute=True)
        return out


class MagnitudeScorer(Scorer):
    """|theta * m|: keep the largest weights."""

    name = "magnitude"
    data_dependent = False
    first_batch_only = True  # reads no batch
    decay = False
    needs_targets = False

    def score(self, ctx: ScoreContext, batches: Sequence[Batch] = ()) -> List[torch.Tensor]:
        prunable = ctx.prunable
        out = score_zeros(prunable)
        widetopo_ext.accumulate_score_(out, as_dtypes(prunable, out), [], ctx.masks, absolute=True)
        return out


@dataclass(frozen=True)
class SNIPOptions(Options):
    batchnorm: str = option(
        "train", "BatchNorm in the scoring forward: 'train' (the batch's statistics, on the engine's copy of "
        "the buffers, as the official SNIP configurations run it) or 'eval' (the running statistics)",
        one_of("train", "eval"))
    calibrate_bn: bool = option(False, "with batchnorm='eval': calibrate BatchNorm statistics on each batch "
                                "first", boolean)
    ignore_index: int = option(IGNORE_INDEX, "target value excluded from the loss (segmentation)",
                               any_integer)

    def __post_init__(self):
        super().__post_init__()
        if self.calibrate_bn and self.batchnorm != "eval":
            raise ValueError(
                "calibrate_bn=True needs batchnorm='eval' (train mode normalises with each batch's own "
                f"statistics already), got batchnorm={self.batchnorm!r}"
            )


def require_targets(batches: Sequence[Batch], method: str) -> None:
    """ValueError naming the first batch without targets (before any work is done)."""
    for batch in batches:
        if batch.y is None:
            raise ValueError(
                f"{method} needs targets, but batch {batch.index} has none; pass (input, target) "
                "batches as data"
            )


def _loss_grads(ctx: ScoreContext, params: Dict[str, torch.Tensor], buffers, batch: Batch, x,
                ignore_index: int) -> Tuple[torch.Tensor, ...]:
    """dL/dw of L = ctx.loss of `batch` (its targets and label key) on inputs x, for the prunable
    entries of `params` (task_loss of the logits, the model's own loss, or the run's loss_fn)."""
    params = dict(params)
    leaves = [params[n].detach().requires_grad_(True) for n in ctx.names]
    params.update(zip(ctx.names, leaves))
    with torch.enable_grad():
        loss = ctx.loss(params, batch, buffers, x=x, ignore_index=ignore_index)
        return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


#: samples of the first batch that the rounding-noise probe recomputes (in two precisions)
PROBE_SAMPLES = 2


def relative_errors(own, other, weights, masks, dtype: torch.dtype, probe: torch.dtype) -> List[float]:
    """Per tensor, the relative rounding error sum_j |w_j| |own_j - other_j| m_j / sum_j |w_j own_j| m_j
    of `own` (computed in `dtype`) measured against `other` (the same computed in `probe`), times
    eps(dtype)/eps(probe) when the probe is the coarser one; 0 where the total is 0."""
    factor = min(1.0, torch.finfo(dtype).eps / torch.finfo(probe).eps)
    out = []
    for a, b, w, m in zip(own, other, weights, masks):
        a, w = a.to(torch.float64), w.detach().abs().to(torch.float64) * m
        total, err = float((a.abs() * w).sum()), float(((b.to(torch.float64) - a).abs() * w).sum())
        out.append(err / total * factor if total > 0 and math.isfinite(err) else 0.0)
    return out


def _relative_errors(ctx: ScoreContext, batch: Batch, x, ignore_index: int) -> Optional[List[float]]:
    """Per prunable tensor, the relative rounding error of sum_j |theta_j dL/dw_j| m_j, measured on
    the first PROBE_SAMPLES samples of a batch (all of a one-sample batch: the trap's case): the
    gradient in the model's dtype against the same in a second precision (float64, or float32 for
    a float64 model). None (no check) when the model cannot run in the probe dtype."""
    dtype = ctx.prunable[0].dtype if ctx.names else torch.float32
    if not dtype.is_floating_point:
        return None
    probe = torch.float32 if dtype == torch.float64 else torch.float64
    x = head(x, PROBE_SAMPLES)
    batch = Batch(batch.index, batch.x, batch.y[:PROBE_SAMPLES] if batch.y.dim() else batch.y, batch.label_key)
    cast = lambda t: t.detach().to(probe) if t.is_floating_point() else t.detach().clone()  # noqa: E731
    own = {n: b.detach().clone() for n, b in ctx.buffers.items()}  # train mode writes running stats
    cast_x = cast_floating(x, probe)
    try:
        grads = _loss_grads(ctx, ctx.params, own, batch, x, ignore_index)
        other = _loss_grads(ctx, {n: cast(p) for n, p in ctx.params.items()},
                            {n: cast(b) for n, b in ctx.buffers.items()}, batch, cast_x, ignore_index)
    except (RuntimeError, TypeError, ValueError) as exc:  # a module that cannot run in the probe dtype
        logger.debug("no rounding-noise probe in %s: %s", probe, exc)
        return None
    return relative_errors(grads, other, ctx.prunable, ctx.masks, dtype, probe)


def noise_floors(relative: Optional[List[float]], scores: List[torch.Tensor]) -> Optional[List[float]]:
    """ctx.noise_floor from the probe's relative errors: relative error times sum_j |S_j| per tensor."""
    if relative is None:
        return None
    return [r * float(s.abs().sum()) for r, s in zip(relative, scores)]


def snip_sum(ctx: ScoreContext, batches: Sequence[Batch], method: str, ignore_index: int = IGNORE_INDEX,
             mode: Callable = eval_mode, calibrate: bool = False, probe: bool = False) -> List[torch.Tensor]:
    """sum_b dL_b/dw * w * m over `batches`, signed, with w = theta * m (ctx.params) and
    L_b = ctx.loss (mean cross entropy of the batch's logits, the model's own loss from its
    `labels`, or the run's loss_fn; see ScoreContext.loss).

    The gradient is taken at the masked weights, so d/dtheta of L(theta * m) = m * dL/dw and
    pruned entries get 0. `mode(model)` is the context the forwards run in: eval_mode (BatchNorm
    as a fixed map with the context's buffers) or batchnorm_train_mode (batch statistics).
    calibrate=True calibrates BatchNorm on each batch first. probe=True sets ctx.noise_floor to
    the relative rounding error measured on the first batch (_relative_errors: two forwards and
    backwards of PROBE_SAMPLES samples) times each tensor's total sum_j |S_j|;
    SNIP and iterative SNIP probe in round 1 only: the trap it detects, an output that does not
    depend on the weights, is a property of the model and the data)."""
    require_targets(batches, method)
    prunable = ctx.prunable
    out = score_zeros(prunable)
    relative = None
    with mode(ctx.model):
        for k, batch in enumerate(batches):
            x = ctx.inputs(batch)
            if calibrate:
                calibrate_batchnorm(ctx, x)
            grads = _loss_grads(ctx, ctx.params, None, batch, x, ignore_index)
            if probe and k == 0:
                relative = _relative_errors(ctx, batch, x, ignore_index)
            widetopo_ext.accumulate_score_(out, as_dtypes(grads, out), as_dtypes(prunable, out), ctx.masks,
                                           absolute=False)
    check_finite(out, ctx, method)
    if probe:
        ctx.noise_floor = noise_floors(relative, out)
    return out


class SNIPScorer(Scorer):
    """SNIP connection sensitivity |g * theta * m| with g = sum_b dL_b/dtheta, L_b = mean cross
    entropy of batch b's logits against its targets (the gradient is accumulated over the
    pruning set, as in the original method and the official code). BatchNorm in train mode by
    default (batch statistics, written only to the engine's private buffers; other modules in
    eval mode), as the official configurations run it: one-shot SNIP is then iterative SNIP
    with one round. batchnorm='eval' uses the running statistics instead; with it,
    calibrate_bn=True first sets them to each batch's statistics.

    score() returns the signed sum_b g_b * theta * m of its batches; finalize() takes the
    absolute value after the engine has summed the batches of every process.
    """

    name = "snip"
    data_dependent = True
    decay = False
    needs_targets = True
    Options = SNIPOptions

    reports_noise_floor = True

    def score(self, ctx: ScoreContext, batches: Sequence[Batch]) -> List[torch.Tensor]:
        mode = batchnorm_train_mode if self.options.batchnorm == "train" else eval_mode
        return snip_sum(ctx, batches, self.name, self.options.ignore_index, mode,
                        calibrate=self.options.calibrate_bn, probe=ctx.round <= 1)

    def noise_advice(self) -> str:
        if self.options.batchnorm == "train":
            return ("with batchnorm='train' a batch of one sample (or of identical samples) makes a BatchNorm "
                    "followed by a global pool output its shift whatever the weights before it; use larger "
                    "batches of distinct samples, or batchnorm='eval'")
        return super().noise_advice()

    def finalize(self, ctx: ScoreContext, scores: List[torch.Tensor]) -> List[torch.Tensor]:
        """|sum over all batches of g_b * theta * m|."""
        torch._foreach_abs_(scores)
        return scores


# ---------------------------------------------------------------------------------------------
# SynFlow


def _has_own_params(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _pow2_rescale_hook(module, inputs, output):
    """Divide a layer's output by the power of two nearest its max magnitude (detached)."""
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return None
    peak = output.detach().abs().amax()
    if not torch.isfinite(peak) or peak <= 0:
        return None
    return output * torch.exp2(-torch.round(torch.log2(peak)))


def _in_range(r: torch.Tensor) -> bool:
    value = float(r.detach())
    return math.isfinite(value) and value != 0.0


def synflow_scores(ctx: ScoreContext, sample_shape, rescale: bool = False,
                   power: int = 1, multiplier_power: Optional[int] = None):
    """Raw SynFlow-type scores |dR/dw| * |theta*m|^q (float64) and R, for w = |theta*m|^power
    (every parameter transformed, floating buffers too, as SynFlow does), R = sum f(1; w), eval
    mode; q = multiplier_power (default: power, i.e. |w * dR/dw|).
    power=1: SynFlow. power=2: SynFlow-L2 (q=1: |theta| * dR/d(theta^2); q=2: theta^2 * dR/d(theta^2)).
    Without rescaling, scores are None when R overflowed (inf/NaN) or underflowed to 0.
    sample_shape: one sample's shape, or model inputs whose first sample is used with its signal
    (token ids: the input embedding's output) set to ones (docs/design.md §2.5).

    rescale=True divides the output of every module that owns parameters by a power of two
    near its peak (forward hooks), which keeps activations and gradients of very deep nets in
    range. It is exact up to a common factor for a bias-free chain, an approximation otherwise.
    """
    q = power if multiplier_power is None else multiplier_power

    def transform(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().abs().to(torch.float64)
        return t if power == 1 else t.pow(power)

    model = ctx.model
    names = set(ctx.names)
    params: Dict[str, torch.Tensor] = {}
    for n, p in ctx.params.items():
        w = transform(p) if p.is_floating_point() else p.detach()
        params[n] = w.requires_grad_(True) if n in names else w
    buffers = {
        n: (transform(b) if b.is_floating_point() else b.detach().clone())
        for n, b in ctx.buffers.items()
    }
    leaves = [params[n] for n in ctx.names]
    if isinstance(sample_shape, (tuple, list)):
        x = torch.ones((1, *sample_shape), dtype=torch.float64, device=ctx.device)
    else:
        x = ctx.constant_inputs(sample_shape, 1)
    handles = []
    if rescale:
        handles = [m.register_forward_hook(_pow2_rescale_hook) for m in model.modules() if _has_own_params(m)]
    try:
        with eval_mode(model), torch.enable_grad():
            r = ctx.forward(params, x, buffers).sum()
            if not rescale and not _in_range(r):
                return None, r.detach()  # no backward through an overflowed forward
            grads = torch.autograd.grad(r, leaves, allow_unused=True, materialize_grads=True)
    finally:
        for h in handles:
            h.remove()
    if q == power:
        multipliers = [w.detach() for w in leaves]
    else:
        multipliers = [ctx.params[n].detach().abs().to(torch.float64) for n in ctx.names]
        if q != 1:
            multipliers = [m.pow(q) for m in multipliers]
    out = score_zeros(leaves, torch.float64)
    widetopo_ext.accumulate_score_(out, list(grads), multipliers, ctx.masks, absolute=True)
    return out, r.detach()


@dataclass(frozen=True)
class SynFlowOptions(Options):
    input_shape: Optional[Tuple[int, ...]] = option(
        None, "shape of one input sample (default: from the first batch)", optional(shape))


class AllOnesSample:
    """For data-free scorers that feed one all-ones sample (SynFlow, SynFlow-L2, NPB): its shape
    from the `input_shape` option, else from the first batch; token ids and keyword inputs get the
    ones at the signal (docs/design.md §2.5)."""

    perturbs_inputs_options = "pass the input_shape option (one floating sample's shape)"

    @property
    def perturbs_inputs(self) -> bool:
        """All-ones input at the signal (the embedding output for token ids), unless input_shape is given."""
        return self.options.input_shape is None

    def _sample_shape(self, batches: Sequence[Batch]):
        if self.options.input_shape is not None:
            return self.options.input_shape
        for batch in batches:
            x = batch.x
            floating = isinstance(x, torch.Tensor) and x.is_floating_point()
            return tuple(x.shape[1:]) if floating else x  # token ids / keyword inputs: ones at the signal
        raise ValueError(
            f"{self.name} needs the shape of one input sample: pass at least one batch or "
            "the input_shape option"
        )


class SynFlowScorer(AllOnesSample, Scorer):
    """SynFlow: S = |theta * dR/dtheta|, R = sum of f(1; |theta|) on an all-ones input shaped
    like one sample, every parameter linearised by abs, BatchNorm in eval mode.

    Computed in float64. If that overflows or underflows (very deep nets), it is recomputed with
    per-layer power-of-two rescaling of the activations (see synflow_scores); a warning is
    logged and diagnostics["rescaled"] is set. Scores are returned in float64, divided by their
    global maximum (a common factor: the ranking is unchanged) so that they stay in range for
    any later cast.
    The sample shape comes from the first batch's x (only its shape is used) or `input_shape`.
    """

    name = "synflow"
    data_dependent = False
    first_batch_only = True  # the sample shape of the first batch
    decay = False
    needs_targets = False
    Options = SynFlowOptions

    power: int = 1  # w = |theta|^power in the forward (SynFlow-L2: 2)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.diagnostics = {"rescaled": False}  # run diagnostics (not an option)

    def multiplier_power(self) -> int:
        """q of S = |dR/dw| * |theta|^q (SynFlow: q = power = 1)."""
        return self.power

    def _scores(self, ctx: ScoreContext, shape, rescale: bool):
        return synflow_scores(ctx, shape, rescale=rescale, power=self.power,
                              multiplier_power=self.multiplier_power())


    @staticmethod
    def _usable(scores: Optional[List[torch.Tensor]], r: torch.Tensor) -> bool:
        if scores is None or not _in_range(r):
            return False
        return bool(torch.stack([torch.isfinite(s).all() for s in scores]).all()) if scores else True

    def score(self, ctx: ScoreContext, batches: Sequence[Batch] = ()) -> List[torch.Tensor]:
        shape = self._sample_shape(batches)
        try:
            scores, r = self._scores(ctx, shape, rescale=False)
        except RuntimeError as exc:
            if self.options.input_shape is None:
                raise
            raise ValueError(f"{self.name}: the model cannot take an input of input_shape="
                             f"{format_shape(shape)} (one sample, no batch dimension): {exc}") from exc
        rescaled = not self._usable(scores, r)
        if rescaled:
            log = logger.debug if self.diagnostics["rescaled"] else logger.warning  # warn once
            log(
                "%s: float64 R = %s is out of range in round %d; recomputing with per-layer "
                "rescaling (approximate ranking for non-chain networks)", self.name, float(r), ctx.round,
            )
            scores, r = self._scores(ctx, shape, rescale=True)
        self.diagnostics["rescaled"] = rescaled
        check_finite(scores, ctx, self.name)
        if scores:
            peak = torch.stack([s.amax() if s.numel() else s.new_zeros(()) for s in scores]).amax()
            if peak > 0:
                torch._foreach_div_(scores, peak)
        return scores
