"""NTK-SAP, neural tangent kernel spectrum-aware pruning (Wang, Li & Sun, ICLR 2023), docs/design.md §5.2.

Per scoring batch, with m a continuous variable shared by both terms:
    F = sum_n || f(xi_n; theta~ * m) - f(xi_n; (theta~ + eps * delta) * m) ||^2
    S_j = | sum_batches dF/dm_j | * [m_j = 1]
xi ~ N(0, I) shaped like the batch (the data supply only the shapes; for token ids xi replaces the
input embedding's output, docs/design.md §2.5); theta~ a fresh Kaiming
re-initialisation of the network drawn for this batch; delta ~ N(0, I) on the prunable weights
only; eps = 0.01. BatchNorm statistics are reset and refilled by one no-grad train-mode forward
of f(xi; theta~ * m) with momentum 1, then both terms run in eval mode with those statistics.
Why: F is a finite-difference estimate of the trace of the masked network's NTK (the output
change under a random weight perturbation); its mask gradient ranks the weights by how much
they hold up the NTK spectrum. Fresh weights and noise inputs make the score a property of the
architecture and mask rather than of one draw of theta.

Re-initialisation (theta~ exists only inside the scorer; the masks apply to the model's own
theta), per owning module type, drawn as tensors from the batch's generator:
    Conv*d / Linear weight        N(0, 2 / fan_in), fan_in = in_features (/ groups) * kernel size
                                  (kaiming_normal_, fan_in mode, ReLU gain)
    Conv*d / Linear bias          0
    BatchNorm / GroupNorm / LayerNorm / InstanceNorm   weight 1, bias 0
    Embedding weight              N(0, 1), the padding row 0 (nn.Embedding's own init)
    MultiheadAttention projection weights   Xavier uniform (its own init), its biases 0
    (in, out) layers (transformers' Conv1D, widetopo.sparsity.selection.IN_OUT_LAYERS)
                                  N(0, 2 / fan_in), fan_in = shape[0]
    any other prunable tensor of rank >= 2  N(0, 2 / fan_in), fan_in = prod(shape[1:])
    everything else               the model's own values
Random streams (ctx.generator(batch.index, stream)): NTKSAP_INPUT_STREAM for xi,
NTKSAP_REINIT_STREAM for theta~ (one draw per re-drawn tensor, in named_parameters order:
randn(shape) for the normal ones, rand(shape) for Xavier uniform), NTKSAP_PERTURB_STREAM for
delta (randn(shape) per prunable tensor in ctx.names order). Separate streams keep xi and
delta the same when an ablation switch turns the other draws off.

Ablation switches of the WideTopo configs: noise_input=False scores on the real inputs,
reinit=False uses the network's own (masked) weights instead of theta~.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

import widetopo_ext
from widetopo.options import Options, between, boolean, option
from widetopo.sparsity.selection import _base, is_in_out_layer, parameter_owners
from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores.bn import calibrate_batchnorm, eval_mode
from widetopo.scores.ita import _HALF, _upcast, no_tf32
from widetopo.scores.widetopo import check_finite
from widetopo.scores._util import as_dtypes, score_zeros

__all__ = ["NTKSAPScorer", "NTKSAPOptions", "reinit_plan", "reinit_params",
           "NTKSAP_INPUT_STREAM", "NTKSAP_REINIT_STREAM", "NTKSAP_PERTURB_STREAM"]

#: generator streams of NTK-SAP's draws (ctx.generator(batch.index, stream=...))
NTKSAP_INPUT_STREAM = 31
NTKSAP_REINIT_STREAM = 32
NTKSAP_PERTURB_STREAM = 33

_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, _InstanceNorm)

# (parameter name, kind, scale, extra): see reinit_plan
Plan = List[Tuple[str, str, float, object]]


def _fan_in(shape) -> int:
    return int(math.prod(shape[1:])) if len(shape) > 1 else int(shape[0])


def reinit_plan(model: nn.Module, prunable: Sequence[str]) -> Plan:
    """How every re-initialised parameter of `model` is drawn (see the module docstring):
    (name, kind, scale, extra) in named_parameters order; parameters not listed keep their
    values. kinds: "normal" randn * scale, "uniform" (2 rand - 1) * scale, "const" = scale,
    "embedding" randn with row `extra` (padding_idx) set to 0."""
    owners = parameter_owners(model)  # a tied parameter is read as its first owner's
    prunable = set(prunable)
    plan: Plan = []
    for name, p in model.named_parameters():
        _, module, local = owners[name][0]
        local = _base(local)  # torch.nn.utils.prune's weight_orig
        shape = tuple(p.shape)
        if isinstance(module, (_ConvNd, nn.Linear)):
            entry = ("normal", math.sqrt(2.0 / _fan_in(shape)), None) if local == "weight" else ("const", 0.0, None)
        elif isinstance(module, _NORMS):
            entry = ("const", 1.0 if local == "weight" else 0.0, None)
        elif isinstance(module, nn.Embedding) and local == "weight":
            entry = ("embedding", 1.0, module.padding_idx)
        elif isinstance(module, nn.MultiheadAttention):
            if local.endswith("proj_weight"):  # in_proj_weight, q/k/v_proj_weight: fan_in = dim 1
                entry = ("uniform", math.sqrt(6.0 / (shape[0] + shape[1])), None)
            else:
                entry = ("const", 0.0, None)
        elif is_in_out_layer(module) and local == "weight" and p.dim() == 2:  # (in, out): fan_in = dim 0
            entry = ("normal", math.sqrt(2.0 / shape[0]), None)
        elif name in prunable and p.dim() >= 2:
            entry = ("normal", math.sqrt(2.0 / _fan_in(shape)), None)
        else:
            continue
        plan.append((name, *entry))
    return plan


def reinit_params(params: Dict[str, torch.Tensor], plan: Plan, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """A new name -> tensor dict: `params` with the planned entries re-drawn from `gen`
    (one draw per "normal"/"uniform"/"embedding" entry, in plan order). `params` is not changed."""
    out = dict(params)
    for name, kind, scale, extra in plan:
        p = params[name]
        if kind == "const":
            out[name] = torch.full(p.shape, scale, dtype=p.dtype, device=p.device)
        elif kind == "uniform":
            out[name] = torch.rand(p.shape, generator=gen, dtype=p.dtype, device=p.device).mul_(2.0).sub_(1.0).mul_(scale)
        else:
            t = torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)
            if kind == "normal":
                t.mul_(scale)
            elif extra is not None:
                t[extra] = 0
            out[name] = t
    return out


@dataclass(frozen=True)
class NTKSAPOptions(Options):
    eps: float = option(0.01, "size of the weight perturbation eps * delta", between(1e-7, 10.0))
    noise_input: bool = option(True, "score on Gaussian inputs shaped like the batch (False: the real inputs)",
                               boolean)
    reinit: bool = option(True, "fresh Kaiming re-initialisation per batch (False: the network's own weights)",
                          boolean)


class NTKSAPScorer(Scorer):
    """NTK-SAP: S = |sum_b dF_b/dm| * [m = 1] (see the module docstring).

    score() returns the signed sum over its batches, finalize() the absolute value after the
    engine has summed every process (each batch's draws depend only on seed, round and batch
    index, so the result does not depend on how batches are split; delta is never averaged)."""

    name = "ntk-sap"
    data_dependent = True
    decay = False
    needs_targets = False
    needs_double_backward = False
    perturbs_inputs_options = "pass noise_input=False (score on the real inputs)"
    Options = NTKSAPOptions

    @property
    def perturbs_inputs(self) -> bool:
        """Gaussian inputs replace the signal (the embedding output for token ids)."""
        return self.options.noise_input

    def score(self, ctx: ScoreContext, batches: Sequence[Batch]) -> List[torch.Tensor]:
        opts = self.options
        out = score_zeros(ctx.prunable)
        plan = reinit_plan(ctx.model, ctx.names) if opts.reinit else None
        with eval_mode(ctx.model):
            for batch in batches:
                self._add_batch(ctx, batch, plan, out)
        check_finite(out, ctx, self.name)
        return out

    def finalize(self, ctx: ScoreContext, scores: List[torch.Tensor]) -> List[torch.Tensor]:
        """|sum over all batches of dF_b/dm| (pruned entries already 0)."""
        torch._foreach_abs_(scores)
        return scores

    def _inputs(self, ctx: ScoreContext, batch: Batch, dtype: torch.dtype):
        """xi ~ N(0, I) shaped like the batch's signal (the input, or the embedding output for
        token ids, docs/design.md §2.5), or the real inputs with noise_input=False."""
        x = ctx.inputs(batch)
        if not self.options.noise_input:
            return x
        with torch.no_grad():
            shape = ctx.signal(x).shape
        gen = ctx.generator(batch.index, stream=NTKSAP_INPUT_STREAM)
        xi = torch.randn(shape, generator=gen, dtype=dtype, device=ctx.device)
        return ctx.with_signal(x, lambda e: xi)

    def _add_batch(self, ctx: ScoreContext, batch: Batch, plan, out: List[torch.Tensor]) -> None:
        """out += dF/dm * m for one batch (signed)."""
        base, buffers = ctx.params, ctx.buffers
        half = any(p.dtype in _HALF for p in base.values())
        if half:  # a 16-bit difference at eps = 0.01 is mostly rounding: evaluate in float32
            base, buffers = _upcast(base), _upcast(buffers)
        if plan is not None:
            base = reinit_params(base, plan, ctx.generator(batch.index, stream=NTKSAP_REINIT_STREAM))
        prunable = [base[n] for n in ctx.names]
        x = self._inputs(ctx, batch, prunable[0].dtype if prunable else torch.float32)
        if half and isinstance(x, torch.Tensor) and x.dtype in _HALF:
            x = x.float()
        gen = ctx.generator(batch.index, stream=NTKSAP_PERTURB_STREAM)
        delta = [torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device) for p in prunable]
        torch._foreach_mul_(delta, self.options.eps)
        perturbed = torch._foreach_add(prunable, delta)  # theta~ + eps * delta

        # BatchNorm statistics of f(xi; theta~ * m), then eval mode with them (ctx.buffers: private)
        masked = torch._foreach_mul(prunable, [mk.to(p.dtype) for mk, p in zip(ctx.masks, prunable)])
        calibration = dict(base)
        calibration.update(zip(ctx.names, masked))
        calibrate_batchnorm(dataclasses.replace(ctx, params=calibration, buffers=buffers), x)

        m = [mk.to(p.dtype).requires_grad_(True) for mk, p in zip(ctx.masks, prunable)]
        params_a, params_b = dict(base), dict(base)
        with no_tf32(ctx.device), torch.enable_grad():
            params_a.update(zip(ctx.names, torch._foreach_mul(prunable, m)))
            params_b.update(zip(ctx.names, torch._foreach_mul(perturbed, m)))
            diff = ctx.forward(params_a, x, buffers) - ctx.forward(params_b, x, buffers)
            f = diff.pow(2).sum()
            if f.requires_grad:
                grads = torch.autograd.grad(f, m, allow_unused=True, materialize_grads=True)
            else:
                grads = [torch.zeros_like(p) for p in prunable]
        widetopo_ext.accumulate_score_(out, as_dtypes(grads, out), [], ctx.masks, absolute=False)
