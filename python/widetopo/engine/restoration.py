"""Repeated mask restoration (docs/design.md §2.3): regrow connections between the sparsest units.

Restoration r (r = 0..R-1) raises the density from d* to d_r = d*^((2^(r+1)-1)/2^(r+1))
(d*^1/2, then d*^3/4) in J steps d_j = d* + (d_r - d*) j/J. Each step scores
  kept entries                   2.0 (always stay),
  pruned entries, rank >= 2      (1 - out_density[o]) (1 - in_density[i]) + noise_scale n[o, i],
  pruned entries, rank 1         1.0,
with n ~ N(0, 1) per (output, input) unit pair and noise_scale the engine option (1e-5 by
default), and thresholds globally at d_j. The engine then resets theta <- theta_init * m and
runs T' scoring rounds back down to d*.
With `layouts` (widetopo.sparsity.topology) the unit densities are those of each tensor's true unit
graph: per group for grouped/depthwise convs (normalised by the group's I/g resp. O/g), and
elementwise tensors (tokens) score like rank-1 ones.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

import widetopo_ext
from widetopo.sparsity import topology
from widetopo.sparsity.topology import DENSE, UnitLayout, noise_shape
from widetopo.engine.rng import make_generator
from widetopo.engine.options import EngineOptions
from widetopo.engine.schedule import _check_density, keep_count

#: make_generator stream of the restoration noise; restoration r uses round index -(r + 1)
#: and batch index j (scoring rounds are numbered 1, 2, ...), so the draws never collide.
RESTORE_STREAM = 17


def restoration_target(target: float, restoration: int) -> float:
    """d_r = d*^((2^(r+1) - 1) / 2^(r+1))."""
    p = 2 ** (restoration + 1)
    return target ** ((p - 1) / p)


def restoration_path(target: float, restoration: int, steps: int) -> List[float]:
    """Densities d_1..d_J = d* + (d_r - d*) j/J of one restoration."""
    d_r = restoration_target(target, restoration)
    return [target + (d_r - target) * j / steps for j in range(1, steps + 1)]


def restoration_noise(masks: List[torch.Tensor], seed: int, restoration: int, step: int,
                      layouts: Optional[Sequence[UnitLayout]] = None) -> List[torch.Tensor]:
    """Per-(dim 0, dim 1) N(0, 1) noise for every rank >= 2 mask (empty tensors for rank < 2 and
    elementwise layouts), drawn in mask order from the generator of (seed, round
    -(restoration+1), batch `step`). Without layouts every rank >= 2 mask is drawn for, as
    before; a grouped/transposed layout has the same (dim 0, dim 1) noise shape."""
    device = masks[0].device
    gen = make_generator(seed, -(restoration + 1), step, device, RESTORE_STREAM)
    empty = torch.empty(0, dtype=torch.float32, device=device)
    layouts = [DENSE] * len(masks) if layouts is None else list(layouts)
    out = []
    for m, lay in zip(masks, layouts):
        shape = noise_shape(m.shape, lay)
        out.append(empty if shape is None else torch.randn(shape, generator=gen, device=device, dtype=torch.float32))
    return out


def restore_masks(
    masks: List[torch.Tensor],
    target: float,
    restoration: int = 0,
    steps: int = EngineOptions.restore_steps,
    *,
    seed: int = EngineOptions.seed,
    noise_scale: float = EngineOptions.noise_scale,
    count: str = EngineOptions.count,
    n_all: Optional[int] = None,
    start_step: int = 0,
    on_step: Optional[Callable[[int, float], None]] = None,
    layouts: Optional[Sequence[UnitLayout]] = None,
) -> List[float]:
    """Run restoration `restoration` on the bool `masks` in place; returns the step densities.
    steps, seed, noise_scale and count default to the engine's options (EngineOptions).

    start_step: steps already done (resume); on_step(j, d_j) is called after each step j.
    n_all: number of all model parameters (only for count="official").
    layouts: one widetopo.sparsity.topology.UnitLayout per mask (widetopo.sparsity.topology.unit_layouts), so the
    unit densities of grouped/depthwise convs are those of their groups and tokens count as
    elementwise; None reads every rank >= 2 tensor as (out, in, kernel...).
    """
    target = _check_density("target", target)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not masks:
        raise ValueError("masks must be a non-empty list of bool tensors")
    if layouts is not None:
        layouts = topology._check(masks, layouts)
    n_prunable = sum(m.numel() for m in masks)
    n_all = n_prunable if n_all is None else n_all
    path = restoration_path(target, restoration, steps)
    for j in range(start_step + 1, steps + 1):
        d_j = path[j - 1]
        noise = restoration_noise(masks, seed, restoration, j, layouts)
        if layouts is None:
            scores = widetopo_ext.restoration_scores(masks, noise, noise_scale)
        else:
            scores = topology.restoration_scores(masks, noise, noise_scale, layouts)
        keep, mode = keep_count(d_j, n_prunable, n_all, count)
        widetopo_ext.global_threshold(scores, masks, keep, mode)
        if on_step is not None:
            on_step(j, d_j)
    return path
