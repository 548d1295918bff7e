"""PX, Path eXclusion (Iurada, Ciccone & Tommasi, CVPR 2024): keep the weights that carry most of
the path kernel, a data-driven estimate of the NTK's trace.

Per batch x, three evaluations of the masked network (docs/design.md §5.1):
  1. gates:  a = 1[z > 0] of every ReLU pre-activation z of f(x; theta*m), BatchNorm in eval
             mode, no gradient;
  2. g-net:  weights m (1 on kept entries, 0 on pruned ones), every ReLU replaced by its recorded
             gate (z -> a * z), input x^2, no gradient -> z1[n, k];
  3. h-net:  weights (theta*m)^2, every ReLU replaced by the identity, all-ones input shaped
             like one sample -> z2[k] (the same for every sample).
R = sum_n sum_k z1[n, k] * z2[k] and S = |dR/d(theta^2)| * theta^2, the gradient summed over all
batches (and processes) before the absolute value (score() returns the signed sum, finalize()
takes |.| * theta^2). Only the h-net depends on theta, so dR/d(theta^2) is the gradient of
<G, z2(theta^2)> with G = sum_n z1[n]: one h-net backward per round for all of a process's
batches (the sum is linear, so this equals the per-batch sum). Non-prunable parameters
(biases, BatchNorm affine parameters, anything outside the prunable selection) keep their
values in both nets; only BatchNorm modules switch to train mode (dropout stays off).

Activations are intercepted with a torch.overrides.TorchFunctionMode, which sees F.relu,
torch.relu, torch.relu_, Tensor.relu(_) and also nn.ReLU & co. (their forward calls these
functions), so every form of writing a ReLU is covered without module hooks. Generalisation to
other elementwise activations a with a(0) = 0 (leaky_relu, relu6/hardtanh, elu, celu, selu,
gelu, silu, hardswish, mish, tanh): the gate is the slope a(z)/z (1[z > 0] for ReLU; 0 where
z = 0). Activations with a(0) != 0 (sigmoid, softplus, logsigmoid, hardsigmoid) have no such
gate and raise ValueError, as does rrelu (random). Everything else (pooling, softmax, ...) is
computed as the model defines it.

BatchNorm (option batchnorm). Default 'running': each BatchNorm is the fixed per-channel affine
map y = s*x + c of its running statistics, s = gamma / sqrt(running_var + eps),
c = beta - s * running_mean. s is a path weight, treated like the prunable weights: s^2 in the
h-net, 1 in the g-net; c is a bias, kept as it is in both nets like every other non-prunable
bias. Then a bias-free net (c = 0, e.g. fresh BatchNorm statistics) keeps the per-layer
conservation sum_{j in layer} S_j = R (Euler: z2 is homogeneous of degree 1 in each layer's
theta^2). 'eval' runs the module's own eval-mode forward in both nets (s and c in both).
'train' (the WideTopo port; a later release of the authors' code) uses batch statistics in both
nets. It is a trap: the h-net sees identical all-ones samples, so a BatchNorm's batch statistics
are those of one sample and its output does not change when the weights feeding it are scaled;
for BatchNorm1d the batch variance is 0 and the output is its bias beta, and a BatchNorm2d
followed by a global average pool gives exactly beta whatever the weights. The h-net then does
not depend on theta and the scores are rounding noise; the engine refuses such rounds
(widetopo.engine.rounds.NoiseScoresError; ctx.noise_floor: the rounding error of each
tensor's score total, estimated by rerunning the h-net backward in float32).

Numerics: the g-net has 0/1 weights, so a deep BatchNorm-free net grows like (fan-in)^depth and
overflows float32; both nets run in float64. The signed gradients are divided by a power of two
2^e that depends only on the masks, theta and the sample shape (the peak of the h-net output
and of the g-net on an all-ones input with identity activations), so it is the same on every
process and for every batch: an exact common factor that keeps the sums in float32 range.
diagnostics["scale"] holds 2^e, diagnostics["R"] this process's R.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import widetopo_ext
from widetopo.options import Options, one_of, option
from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores._util import score_zeros
from widetopo.scores.inputs import sample_shape as _sample_shape
from widetopo.scores.bn import batchnorm_train_mode, eval_mode, uses_batch_statistics
from widetopo.scores.widetopo import check_finite

__all__ = ["PXScorer", "PXOptions", "path_gates", "gated_output", "hnet_output"]


# ---------------------------------------------------------------------------- activations

@dataclass(frozen=True)
class _Activation:
    name: str
    pure: Optional[object]  # the non-inplace function a(z, **kwargs); None: ReLU (gate 1[z > 0])
    inplace: bool = False   # the call always writes its input (relu_, elu_, ...)


def _activation_table() -> Dict[object, _Activation]:
    relu = _Activation("relu", None)
    table = {F.relu: relu, torch.relu: relu, torch.Tensor.relu: relu,
             torch.relu_: _Activation("relu_", None, True), torch.Tensor.relu_: _Activation("relu_", None, True)}
    for fn in (F.leaky_relu, F.relu6, F.hardtanh, F.elu, F.celu, F.selu, F.silu, F.hardswish, F.mish,
               F.gelu, torch.tanh, torch.Tensor.tanh):
        table[fn] = _Activation(getattr(fn, "__name__", str(fn)), fn)
    for fn, pure in ((F.leaky_relu_, F.leaky_relu), (F.hardtanh_, F.hardtanh), (F.elu_, F.elu),
                     (torch.tanh_, torch.tanh), (torch.Tensor.tanh_, torch.tanh)):
        table[fn] = _Activation(getattr(fn, "__name__", str(fn)), pure, True)
    return table


_ACTIVATIONS = _activation_table()
_NO_GATE = {F.sigmoid: "sigmoid", torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid",
            torch.sigmoid_: "sigmoid", torch.Tensor.sigmoid_: "sigmoid", F.softplus: "softplus",
            F.logsigmoid: "logsigmoid", F.hardsigmoid: "hardsigmoid", F.rrelu: "rrelu", F.rrelu_: "rrelu"}


def _gate(act: _Activation, z: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The slope a(z)/z of an activation at its pre-activation z (0 where z = 0)."""
    if act.pure is None:
        return z > 0
    kw = {k: v for k, v in kwargs.items() if k != "inplace"}
    a = act.pure(z, **kw)
    return torch.where(z != 0, a / torch.where(z != 0, z, torch.ones_like(z)), torch.zeros_like(z))


class _PathActivations(TorchFunctionMode):
    """Intercepts the activation calls of a forward.

    "record":   runs the activation and appends its gate a(z)/z to `gates`;
    "apply":    z -> gate * z with the recorded gates, in call order;
    "identity": z -> z.
    """

    def __init__(self, action: str, gates: Optional[List[torch.Tensor]] = None):
        super().__init__()
        self.action = action
        self.gates = [] if gates is None else gates
        self.used = 0

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        act = _ACTIVATIONS.get(func)
        if act is None:
            if func in _NO_GATE:
                raise ValueError(
                    f"px: the model uses {_NO_GATE[func]}, which has no gate a(z)/z (a(0) != 0 or random); "
                    "PX supports ReLU and the elementwise activations with a(0) = 0: "
                    "relu, leaky_relu, relu6, hardtanh, elu, celu, selu, gelu, silu, hardswish, mish, tanh"
                )
            return func(*args, **kwargs)
        z = args[0]
        if self.action == "record":
            self.gates.append(_gate(act, z, kwargs))
            return func(*args, **kwargs)
        inplace = act.inplace or bool(kwargs.get("inplace", False))
        if self.action == "identity":
            return z if inplace else z.clone()
        if self.used >= len(self.gates):
            raise RuntimeError(
                f"px: the g-net called more activations than the gate pass recorded ({len(self.gates)}); "
                "PX needs a forward whose activations do not depend on the values"
            )
        gate = self.gates[self.used]
        self.used += 1
        if gate.shape != z.shape:
            raise RuntimeError(
                f"px: activation {self.used} has shape {tuple(z.shape)} in the g-net but "
                f"{tuple(gate.shape)} in the gate pass; PX needs a forward whose activations do not "
                "depend on the values"
            )
        gate = gate.to(z.dtype)
        return z.mul_(gate) if inplace else z * gate


# ---------------------------------------------------------------------------- the three nets

class _RunningBatchNorm(TorchFunctionMode):
    """BatchNorm as the fixed per-channel affine map of its running statistics, y = s*x + c with
    s = gamma / sqrt(running_var + eps) and c = beta - s * running_mean, split the way PX splits
    a layer: s is a path weight (s^2 in the h-net, 1 in the g-net, like theta^2 and m), c a bias
    (as it is in both nets, like every non-prunable bias). Intercepts F.batch_norm."""

    def __init__(self, square: bool):
        super().__init__()
        self.square = square

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        a = dict(zip(names, args), **kwargs)
        x, mean, var = a["input"], a.get("running_mean"), a.get("running_var")
        if mean is None or var is None:
            raise ValueError(_NO_RUNNING_STATS)
        weight, bias, eps = a.get("weight"), a.get("bias"), a.get("eps", 1e-5)
        s = torch.rsqrt(var.to(x.dtype) + eps)
        if weight is not None:
            s = s * weight.to(x.dtype)
        c = -(mean.to(x.dtype) * s)
        if bias is not None:
            c = c + bias.to(x.dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = x * s.square().view(shape) if self.square else x
        return y + c.view(shape)


_NO_RUNNING_STATS = (
    "px: batchnorm='running' (the default) needs the running statistics of every BatchNorm, but the model "
    "has a BatchNorm with track_running_stats=False; use batchnorm='train' (batch statistics)"
)


@contextlib.contextmanager
def _bn_mode(model: nn.Module, bn_mode: str, square: bool = False):
    """BatchNorm of a g-net (square=False) or h-net (square=True) forward: 'running' the path
    map of _RunningBatchNorm, 'eval' the module's eval-mode forward, 'train' batch statistics."""
    if bn_mode == "train":
        with batchnorm_train_mode(model):
            yield
    elif bn_mode == "eval":
        with eval_mode(model):
            yield
    else:
        with eval_mode(model), _RunningBatchNorm(square):
            yield


def _float64(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {n: (t.detach().to(torch.float64, copy=True) if t.is_floating_point() else t.detach().clone())
            for n, t in tensors.items()}


@torch.no_grad()
def path_gates(ctx: ScoreContext, x: torch.Tensor) -> List[torch.Tensor]:
    """The gates a(z)/z of every activation of f(x; theta*m) in call order, BatchNorm in eval mode
    (the context's buffers), in the model's own dtype."""
    mode = _PathActivations("record")
    with eval_mode(ctx.model), mode:
        ctx.forward(ctx.params, x)
    return mode.gates


@torch.no_grad()
def gated_output(ctx: ScoreContext, x2: torch.Tensor, gates: Optional[List[torch.Tensor]],
                 params: Dict[str, torch.Tensor], buffers: Dict[str, torch.Tensor],
                 bn_mode: str = "running") -> torch.Tensor:
    """The g-net f(x2; m) (params: masks in place of the prunable weights) with the activations
    replaced by `gates` (None: by the identity), BatchNorm in `bn_mode`."""
    mode = _PathActivations("identity") if gates is None else _PathActivations("apply", gates)
    with _bn_mode(ctx.model, bn_mode), mode:
        out = ctx.forward(params, x2, buffers)
    if gates is not None and mode.used != len(gates):
        raise RuntimeError(
            f"px: the g-net called {mode.used} activations, the gate pass {len(gates)}; PX needs a "
            "forward whose activations do not depend on the values"
        )
    return out


def hnet_output(ctx: ScoreContext, sample_shape: Sequence[int], params: Dict[str, torch.Tensor],
                buffers: Dict[str, torch.Tensor], bn_mode: str = "running",
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The h-net f(1; params) for one all-ones sample (params: (theta*m)^2 in place of the prunable
    weights), activations replaced by the identity, BatchNorm in `bn_mode`. Two identical samples
    are evaluated (train-mode BatchNorm1d needs more than one value per channel); their batch
    statistics are those of one sample."""
    x = _ones(ctx, sample_shape, 2, dtype)
    with _bn_mode(ctx.model, bn_mode, square=True), _PathActivations("identity"):
        return ctx.forward(params, x, buffers)[0]


def _ones(ctx: ScoreContext, sample, n: int, dtype: torch.dtype = torch.float64):
    """n all-ones samples: of shape `sample`, or of model inputs whose signal - the embedding
    output for token ids, docs/design.md §2.5 - is set to ones."""
    if isinstance(sample, (tuple, list)):
        return torch.ones((n, *sample), dtype=dtype, device=ctx.device)
    return ctx.constant_inputs(sample, n, dtype=dtype)


def _pow2_peak(t: torch.Tensor) -> int:
    """e with 2^e the power of two nearest the peak |t| (0 if the peak is 0 or not finite),
    limited to [-500, 500] so that 2^-e and products of two such factors stay in float64 range."""
    peak = float(t.detach().abs().amax()) if t.numel() else 0.0
    e = int(round(math.log2(peak))) if math.isfinite(peak) and peak > 0 else 0
    return max(-500, min(500, e))


# ---------------------------------------------------------------------------- the scorer

@dataclass(frozen=True)
class PXOptions(Options):
    batchnorm: str = option(
        "running",
        "BatchNorm in the g-net and h-net: 'running' (the fixed affine map s*x + c of the running "
        "statistics, s = gamma/sqrt(var+eps) a path weight: s^2 in the h-net, 1 in the g-net; c a bias, "
        "as is in both), 'eval' (the module's eval-mode forward, s and c as they are in both nets) or "
        "'train' (batch statistics in both nets, as the WideTopo port and a later release of the authors' "
        "code; on the h-net's identical samples a BatchNorm followed by a global pool no longer depends on "
        "the weights, and such rounds are refused as rounding noise)",
        one_of("running", "eval", "train"))


class PXScorer(Scorer):
    """PX: S = |sum_b dR_b/d(theta^2)| * theta^2, R_b = sum_n sum_k z1[n, k] * z2[k] (see the
    module docstring)."""

    name = "px"
    Options = PXOptions
    data_dependent = True
    decay = False
    needs_targets = False
    reports_noise_floor = True
    perturbs_inputs = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.diagnostics = {"scale": None, "R": None}  # run diagnostics (not options)

    def score(self, ctx: ScoreContext, batches: Sequence[Batch]) -> List[torch.Tensor]:
        if not batches:
            return score_zeros(ctx.prunable, torch.float64)
        shapes = {_sample_shape(b.x) for b in batches}
        if len(shapes) > 1:
            raise ValueError(
                f"px: the pruning batches of one process must share one sample shape, got {sorted(shapes)}"
            )
        bn_mode = self.options.batchnorm
        if bn_mode == "running" and uses_batch_statistics(ctx.model):
            raise ValueError(_NO_RUNNING_STATS)
        prunable = set(ctx.names)
        g_params = _float64(ctx.params)
        for name, m in zip(ctx.names, ctx.masks):
            g_params[name] = m.to(torch.float64)
        g_buffers = _float64(ctx.buffers)  # train-mode BatchNorm writes running stats here, not in ctx.buffers
        total = None
        for batch in batches:
            x = ctx.inputs(batch)
            gates = path_gates(ctx, x)
            x2 = ctx.signal(x).to(torch.float64).square()  # the embedding output for token ids (§2.5)
            z1 = gated_output(ctx, ctx.with_signal(x, lambda e, x2=x2: x2), gates, g_params, g_buffers, bn_mode)
            total = z1.sum(0) if total is None else total + z1.sum(0)

        (sample,) = shapes
        first = batches[0].x
        if not (isinstance(first, torch.Tensor) and first.is_floating_point()):
            sample = first  # token ids / keyword inputs: ones at the signal
        h_params = {}
        for name, p in ctx.params.items():
            q = p.detach().to(torch.float64)
            h_params[name] = q.square().requires_grad_(True) if name in prunable else q
        leaves = [h_params[n] for n in ctx.names]
        with torch.enable_grad():
            z2 = hnet_output(ctx, sample, h_params, g_buffers, bn_mode)
            if z2.shape != total.shape:
                raise RuntimeError(f"px: h-net output {tuple(z2.shape)} differs from the g-net's {tuple(total.shape)}")
            reference = gated_output(ctx, _ones(ctx, sample, 2), None, g_params, g_buffers, bn_mode)
            e1, e2 = _pow2_peak(reference), _pow2_peak(z2)
            g_scaled = torch.ldexp(total, total.new_tensor(-e1))
            r = (g_scaled * z2).sum() * 2.0 ** -e2  # R / 2^(e1 + e2)
            grads = torch.autograd.grad(r, leaves, allow_unused=True, materialize_grads=True)
        ctx.noise_floor = self._noise_floor(ctx, sample, h_params, g_buffers, g_scaled, e2, grads)
        r = float(r.detach())
        self.diagnostics.update(scale=2.0 ** -(e1 + e2), R=r * 2.0 ** (e1 + e2))
        if not math.isfinite(r):
            raise FloatingPointError(
                f"px: R is not finite in round {ctx.round} even in float64 with scaling "
                "(a very deep network without normalisation?)"
            )
        out = [g.detach() for g in grads]
        check_finite(out, ctx, self.name)
        return out

    def _noise_floor(self, ctx: ScoreContext, sample_shape, h_params, buffers, g_scaled: torch.Tensor, e2: int,
                     grads) -> List[float]:
        """Per prunable tensor, the rounding error of its score total sum_j |dR/d(theta_j^2)| theta_j^2:
        the h-net backward is rerun in float32 (one forward and backward of two samples) and
        sum_j |grad32_j - grad64_j| theta_j^2 m_j, scaled by eps(float64) / eps(float32), estimates
        the float64 error. Healthy totals are ~1e14 times it; rounding noise about once (the
        engine's NoiseScoresError). A non-finite float32 pass gives floors of 0 (no check)."""
        params32 = {n: p.detach().to(torch.float32) if p.is_floating_point() else p for n, p in h_params.items()}
        leaves = [params32[n].requires_grad_(True) for n in ctx.names]
        buffers32 = {n: b.to(torch.float32) if b.is_floating_point() else b.clone() for n, b in buffers.items()}
        with torch.enable_grad():
            z2 = hnet_output(ctx, sample_shape, params32, buffers32, self.options.batchnorm, torch.float32)
            r = (g_scaled.to(torch.float32) * torch.ldexp(z2, z2.new_tensor(-e2))).sum()
            grads32 = torch.autograd.grad(r, leaves, allow_unused=True, materialize_grads=True)
        ratio = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
        floors = []
        for name, g, g32, m in zip(ctx.names, grads, grads32, ctx.masks):
            err = ((g32.to(torch.float64) - g).abs() * h_params[name].detach() * m).sum()
            floors.append(float(err) * ratio if bool(torch.isfinite(err)) else 0.0)
        return floors

    def noise_advice(self) -> str:
        if self.options.batchnorm == "train":
            return ("with batchnorm='train' the h-net's BatchNorm layers see identical all-ones samples, so a "
                    "BatchNorm1d, or a BatchNorm2d followed by a global pool, outputs its shift whatever the "
                    "weights before it; use batchnorm='running' (the default)")
        return super().noise_advice()

    def finalize(self, ctx: ScoreContext, scores: List[torch.Tensor]) -> List[torch.Tensor]:
        """|sum over every batch and process of dR/d(theta^2)| * theta^2, masked."""
        squares = [ctx.params[n].detach().to(s.dtype).square() for n, s in zip(ctx.names, scores)]
        out = [torch.zeros_like(s) for s in scores]
        widetopo_ext.accumulate_score_(out, scores, squares, ctx.masks, absolute=True)
        return out
