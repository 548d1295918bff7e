"""A straightforward plain-PyTorch WideTopo (docs/design.md §2.1-2.3), structured the way the official
implementation is: a deep copy of the model every round, masks applied by loops over the
parameters, a BatchNorm calibration per batch for each of the two terms, four separate forwards
for the ITA term (o_s, p_s, o_t, p_t) on two more deep copies, and a global threshold over
torch.cat of all scores with a full torch.sort.
No widetopo_ext ops and no torch.func: this is the reference point of benchmarks/bench_engine.py.

The math and the random draws are those of the library, so the masks can be compared entry
by entry:
  * every draw comes from widetopo.engine.rng.make_generator(seed, round, batch_index, device, stream)
    - Hutchinson probes: stream 1, v = randn(logits.shape) per probe;
    - ITA: stream 2, first dx = randn(x.shape), then dtheta_p = randn(theta_p.shape) for the
      prunable tensors in named_parameters() order;
    - restoration r, step j: round -(r + 1), batch j, stream 17, n = randn(O, I) for every
      prunable tensor of rank >= 2 in order;
    scoring rounds are numbered 1, 2, ... across all phases, batches 0, 1, ... in data order;
  * scores S = mu1 * sum_b |sum_probes h_b * theta * m| + mu2 * sum_b |dA_b/dm| * [m != 0];
  * decay factor max(out_deg * in_deg, 1) ** (log10(D) / gamma) on kept entries (float64);
  * count="exact": keep round(d * N_P) entries (never more than are kept now), ties at the cut
    go to the entry first in (tensor, flat index) order - a stable descending sort;
    count="official": k = floor((1 - d) * N_all) over all parameters, prune every prunable
    score <= the (N_P - keep)-th smallest (keep = N_P - k clipped to [0, N_P]);
  * pruned entries never come back in a scoring round (their score is -inf).
Differences from the library are only in floating-point evaluation order (e.g. the library
runs x and x + eps dx as one batch), so masks agree up to ties broken by rounding noise.
"""
from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from widetopo.engine.rng import make_generator

NTK_STREAM = 1
ITA_STREAM = 2
RESTORE_STREAM = 17
PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


# --------------------------------------------------------------------------- model surgery
def prunable_names(model: nn.Module) -> List[str]:
    """Weights of Conv1d/2d/3d and Linear modules, in named_parameters() order."""
    modules = dict(model.named_modules())
    names = []
    for name, _ in model.named_parameters():
        owner, _, local = name.rpartition(".")
        if local == "weight" and isinstance(modules[owner], PRUNABLE_TYPES):
            names.append(name)
    return names


def _owner(net: nn.Module, name: str):
    owner, _, local = name.rpartition(".")
    return (net.get_submodule(owner) if owner else net), local


def _load_weights(net: nn.Module, names: Sequence[str], weights: Sequence[torch.Tensor]) -> None:
    """Copy the current masked weights into the deep copy, one parameter at a time."""
    with torch.no_grad():
        for name, w in zip(names, weights):
            module, local = _owner(net, name)
            getattr(module, local).copy_(w)


def _replace_weight(net: nn.Module, name: str, value: torch.Tensor) -> None:
    """Turn a parameter of the copy into a computed tensor (so the mask can carry gradient)."""
    module, local = _owner(net, name)
    del module._parameters[local]
    setattr(module, local, value)


def _calibrate_batchnorm(net: nn.Module, x: torch.Tensor) -> None:
    """Running statistics <- statistics of x (reset, momentum 1, one train-mode forward),
    then eval mode for every scoring forward."""
    net.eval()
    for module in net.modules():
        if isinstance(module, BN_TYPES) and module.track_running_stats:
            module.reset_running_stats()
            module.momentum = 1.0
            module.train()
    with torch.no_grad():
        net(x)
    net.eval()


# --------------------------------------------------------------------------- saliencies
def ntk_saliency(net: nn.Module, names: Sequence[str], masks: Sequence[torch.Tensor], x: torch.Tensor,
                 gen: torch.Generator, probes: int = 1) -> List[torch.Tensor]:
    """|sum_probes h * theta * m| with h = grad_theta ||g * m||^2, g = grad_theta <v, f(x)>
    (non-prunable parameters contribute their unmasked g to the norm)."""
    params = OrderedDict(net.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    all_names = list(params)
    prunable = [params[n] for n in names]
    mask_of = dict(zip(names, masks))
    logits = net(x)
    h_sum = [torch.zeros_like(p) for p in prunable]
    for k in range(probes):
        v = torch.randn(logits.shape, generator=gen, dtype=logits.dtype, device=logits.device)
        grads = torch.autograd.grad(logits, [params[n] for n in all_names], grad_outputs=v,
                                    create_graph=True, retain_graph=True, allow_unused=True)
        t = logits.new_zeros(())
        for n, g in zip(all_names, grads):
            if g is None:
                continue
            if n in mask_of:
                g = g * mask_of[n]
            t = t + (g * g).sum()
        if t.requires_grad:
            h = torch.autograd.grad(t, prunable, retain_graph=k + 1 < probes, allow_unused=True)
        else:
            h = [None] * len(prunable)
        for i, hi in enumerate(h):
            if hi is not None:
                h_sum[i] = h_sum[i] + hi.detach()
    return [(hs * p.detach() * m).abs() for hs, p, m in zip(h_sum, prunable, masks)]


def ita_saliency(net: nn.Module, names: Sequence[str], masks: Sequence[torch.Tensor], x: torch.Tensor,
                 gen: torch.Generator, eps: float = 5e-4) -> List[torch.Tensor]:
    """|dA/dm| * [m != 0], A = sum ||(p_t - o_t) - (p_s - o_s)||^2 / eps^2, with a source copy
    (weights theta*m * m) and a target copy (weights (theta*m + eps dtheta) * m) of the net."""
    dx = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    weights = [getattr(*_owner(net, n)).detach() for n in names]
    offsets = [torch.randn(w.shape, generator=gen, dtype=w.dtype, device=w.device) for w in weights]
    source, target = copy.deepcopy(net), copy.deepcopy(net)
    m_vars = []
    for name, w, d, m in zip(names, weights, offsets, masks):
        m_var = m.to(w.dtype).requires_grad_(True)
        m_vars.append(m_var)
        c = w + eps * d
        _replace_weight(source, name, w * m_var)
        _replace_weight(target, name, c * m_var)
    xp = x + eps * dx
    o_s = source(x)
    p_s = source(xp)
    o_t = target(x)
    p_t = target(xp)
    delta = (p_t - o_t) - (p_s - o_s)
    a = delta.pow(2).sum() / (eps * eps)
    grads = torch.autograd.grad(a, m_vars, allow_unused=True)
    out = []
    for g, m, w in zip(grads, masks, weights):
        out.append(torch.zeros_like(w) if g is None else g.abs() * m)
    return out


# --------------------------------------------------------------------------- mask arithmetic
def density_decay(scores: List[torch.Tensor], masks: List[torch.Tensor], density: float,
                  compression_factor: float = 5.0) -> List[torch.Tensor]:
    """S * (m / max(out_deg * in_deg, 1)) ** (c / gamma), c = -log10(D); rank-1 untouched."""
    exponent = -math.log10(density) / compression_factor
    out = []
    for s, m in zip(scores, masks):
        if s.dim() < 2:
            out.append(s)
            continue
        m3 = m.reshape(m.shape[0], m.shape[1], -1).to(torch.int64)
        out_deg = m3.sum(dim=(1, 2))
        in_deg = m3.sum(dim=(0, 2))
        denom = (out_deg[:, None] * in_deg[None, :]).clamp(min=1).to(torch.float64)
        factor = torch.where(m3.bool(), denom.pow(-exponent)[:, :, None], torch.zeros((), dtype=torch.float64))
        out.append((s.reshape(m3.shape).to(torch.float64) * factor).to(s.dtype).reshape(s.shape))
    return out


def threshold(scores: List[torch.Tensor], keep: int, count: str = "exact") -> List[torch.Tensor]:
    """Global top-`keep` over torch.cat of all scores with a full sort; new bool masks."""
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scores])
    n = flat.numel()
    if count == "exact":
        order = torch.sort(flat, descending=True, stable=True).indices
        kept = torch.zeros(n, dtype=torch.bool, device=flat.device)
        kept[order[:keep]] = True
    else:
        k = n - keep
        kept = torch.zeros(n, dtype=torch.bool, device=flat.device) if k >= n else flat > torch.sort(flat).values[k]
    masks, start = [], 0
    for s in scores:
        masks.append(kept[start:start + s.numel()].reshape(s.shape))
        start += s.numel()
    return masks


def keep_count(density: float, n_prunable: int, n_all: int, count: str) -> int:
    if count == "exact":
        return min(max(int(math.floor(density * n_prunable + 0.5)), 0), n_prunable)
    k = int(math.floor((1.0 - density) * n_all))
    return min(max(n_prunable - k, 0), n_prunable)


def restoration_scores(masks: List[torch.Tensor], noise: List[Optional[torch.Tensor]],
                       noise_scale: float) -> List[torch.Tensor]:
    """Kept 2.0; pruned (rank >= 2) (1 - out_density[o])(1 - in_density[i]) + scale * n[o, i];
    pruned rank-1 entries 1.0 (float32)."""
    out = []
    for m, n in zip(masks, noise):
        if m.dim() < 2:
            out.append(torch.where(m, 2.0, 1.0).to(torch.float32))
            continue
        o, i = m.shape[0], m.shape[1]
        k = m[0, 0].numel()
        m3 = m.reshape(o, i, k)
        out_density = (m3.sum(dim=(1, 2)).to(torch.float64) / (i * k)).to(torch.float32)
        in_density = (m3.sum(dim=(0, 2)).to(torch.float64) / (o * k)).to(torch.float32)
        regrow = (1.0 - out_density)[:, None] * (1.0 - in_density)[None, :] + noise_scale * n
        out.append(torch.where(m3, 2.0, regrow[:, :, None]).to(torch.float32).reshape(m.shape))
    return out


def geometric(start: float, target: float, steps: int) -> List[float]:
    out = [start * (target / start) ** (t / steps) for t in range(1, steps + 1)]
    out[-1] = target
    return out


# --------------------------------------------------------------------------- the loop
def _batches(data: Iterable) -> List[torch.Tensor]:
    out = []
    for item in data:
        out.append(item if isinstance(item, torch.Tensor) else item[0])
    return out


def prune_baseline(model: nn.Module, data: Iterable, density: float, *, rounds: int = 10,
                   restorations: int = 2, restore_steps: int = 50, restore_rounds: Optional[int] = None,
                   mu1: float = 0.01, mu2: float = 1.0, eps: float = 5e-4, probes: int = 1,
                   compression_factor: float = 5.0, noise_scale: float = 1e-5, count: str = "exact",
                   seed: int = 0, timings: Optional[Dict[str, list]] = None) -> "OrderedDict[str, torch.Tensor]":
    """WideTopo(-S) masks for `model` (defaults: WideTopo-S, T = T' = 10, R = 2, J = 50).

    timings, if given, receives lists "round_seconds" and "restore_step_seconds"."""
    restore_rounds = rounds if restore_rounds is None else restore_rounds
    xs = _batches(data)
    names = prunable_names(model)
    params = dict(model.named_parameters())
    theta_init = [params[n].detach().clone() for n in names]
    weights = [t.clone() for t in theta_init]
    masks = [torch.ones(t.shape, dtype=torch.bool, device=t.device) for t in theta_init]
    n_prunable = sum(t.numel() for t in theta_init)
    n_all = sum(p.numel() for p in model.parameters())
    if timings is not None:
        timings.setdefault("round_seconds", [])
        timings.setdefault("restore_step_seconds", [])
    round_index = 0

    def scoring_round(d_t: float) -> None:
        nonlocal masks, weights, round_index
        tic = time.perf_counter()
        round_index += 1
        kept_now = sum(int(m.sum()) for m in masks)
        s_ntk = [torch.zeros_like(w) for w in weights]
        s_ita = [torch.zeros_like(w) for w in weights]
        net = copy.deepcopy(model)  # this round's masked network
        _load_weights(net, names, weights)
        for b, x in enumerate(xs):
            # each term calibrates BatchNorm on the batch itself, as the official code does
            if mu1 != 0:
                _calibrate_batchnorm(net, x)
                gen = make_generator(seed, round_index, b, x.device, NTK_STREAM)
                for i, s in enumerate(ntk_saliency(net, names, masks, x, gen, probes)):
                    s_ntk[i] = s_ntk[i] + s
            if mu2 != 0:
                _calibrate_batchnorm(net, x)
                gen = make_generator(seed, round_index, b, x.device, ITA_STREAM)
                for i, s in enumerate(ita_saliency(net, names, masks, x, gen, eps)):
                    s_ita[i] = s_ita[i] + s
        del net
        scores = [mu1 * a + mu2 * b for a, b in zip(s_ntk, s_ita)]
        scores = density_decay(scores, masks, kept_now / n_prunable, compression_factor)
        scores = [torch.where(m, s, torch.full_like(s, -math.inf)) for s, m in zip(scores, masks)]
        keep = keep_count(d_t, n_prunable, n_all, count)
        if count == "exact":
            keep = min(keep, kept_now)
        masks = threshold(scores, keep, count)
        weights = [w * m for w, m in zip(weights, masks)]
        if timings is not None:
            timings["round_seconds"].append(time.perf_counter() - tic)

    def restoration(r: int) -> None:
        nonlocal masks, weights
        p = 2 ** (r + 1)
        d_r = density ** ((p - 1) / p)
        for j in range(1, restore_steps + 1):
            tic = time.perf_counter()
            d_j = density + (d_r - density) * j / restore_steps
            gen = make_generator(seed, -(r + 1), j, masks[0].device, RESTORE_STREAM)
            noise = [torch.randn((m.shape[0], m.shape[1]), generator=gen, device=m.device, dtype=torch.float32)
                     if m.dim() >= 2 else None for m in masks]
            scores = restoration_scores(masks, noise, noise_scale)
            masks = threshold(scores, keep_count(d_j, n_prunable, n_all, count), count)
            if j == restore_steps:
                weights = [t * m for t, m in zip(theta_init, masks)]
            if timings is not None:
                timings["restore_step_seconds"].append(time.perf_counter() - tic)

    for d_t in geometric(1.0, density, rounds):
        scoring_round(d_t)
    for r in range(restorations):
        restoration(r)
        start = max(sum(int(m.sum()) for m in masks) / n_prunable, density)
        for d_t in geometric(start, density, restore_rounds):
            scoring_round(d_t)
    return OrderedDict(zip(names, masks))
