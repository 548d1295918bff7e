"""ERK allocations (Evci et al., RigL, 2020): per-layer densities from the Erdos-Renyi-Kernel
rule, then random-ERK (a uniform random subset inside each layer) or magnitude-ERK (the largest
|theta| inside each layer).

Raw density of a prunable tensor with shape (n_out, n_in, k_1, ..., k_r):

    p_l = ((n_out + n_in + k_1 + ... + k_r) / (n_out * n_in * k_1 * ... * k_r)) ** power_scale

i.e. the sum of the dimensions over their product - the ERK rule of conv layers, its kernel
terms dropping for Linear, and the same formula for Conv1d/Conv3d kernels and for rank-1
tensors (p = n / n = 1). power_scale follows RigL's erk_power_scale: it is the exponent of
that ratio (1.0 = ERK; 0 = uniform densities).

The budget K is split as d_l = eps * p_l with eps * sum_{l not in D} p_l N_l = K - sum_{l in D} N_l,
where the dense set D grows (one layer at a time, the largest p_l first) while some layer
outside D has eps * p_l >= 1. Counts k_l = d_l * N_l are rounded to integers summing to exactly
K by the largest-remainder rule (ties: the earlier layer). Only prunable tensors count.

Generalisation for rounds > 1 (the published method is one shot): a layer cannot keep more than
it still has, so the cap of layer l is its current kept count c_l instead of N_l (the dense set
is the layers with eps * p_l * N_l >= c_l); from a dense network this is the rule above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

import widetopo_ext
from widetopo.options import Options, between, option
from widetopo.scores.base import ScoreContext
from widetopo.scores.baselines import MagnitudeScorer, RandomOptions, RandomScorer

__all__ = ["erk_raw_density", "erk_quotas", "ERKOptions", "ERKRandomOptions",
           "ERKRandomScorer", "ERKMagnitudeScorer"]


def erk_raw_density(shape: Sequence[int], power_scale: float = 1.0) -> float:
    """(sum of the dimensions / their product) ** power_scale."""
    dims = [int(d) for d in shape]
    if not dims or min(dims) < 1:
        raise ValueError(f"erk: a prunable tensor must have a non-empty shape of positive sizes, got {tuple(dims)}")
    return (sum(dims) / math.prod(dims)) ** power_scale


def erk_quotas(shapes: Sequence[Sequence[int]], keep: int, power_scale: float = 1.0,
               caps: Sequence[int] = None) -> List[int]:
    """Per-tensor kept counts of the ERK allocation of `keep` weights (see the module docstring).

    caps: the most each tensor may keep (default its size)."""
    sizes = [math.prod(int(d) for d in s) for s in shapes]
    caps = list(sizes) if caps is None else [int(c) for c in caps]
    if len(caps) != len(sizes):
        raise ValueError(f"erk: caps must have one entry per tensor ({len(sizes)}), got {len(caps)}")
    for j, (c, n) in enumerate(zip(caps, sizes)):
        if c < 0 or c > n:
            raise ValueError(f"erk: caps[{j}] must be in [0, {n}] (the tensor's size), got {c}")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= sum(caps):
        raise ValueError(f"erk: keep must be an integer in [0, {sum(caps)}], got {keep!r}")
    p = [erk_raw_density(s, power_scale) for s in shapes]
    free = [l for l in range(len(sizes)) if caps[l] > 0]
    dense: List[int] = []
    # a layer saturates once eps >= c_l / (p_l N_l); saturate in that order (largest p_l first when dense)
    order = sorted(free, key=lambda l: (caps[l] / (p[l] * sizes[l]), l))
    eps = 0.0
    while True:
        rest = [l for l in order if l not in dense]
        budget = keep - sum(caps[l] for l in dense)
        if not rest:
            break
        eps = budget / sum(p[l] * sizes[l] for l in rest)
        first = rest[0]
        if eps * p[first] * sizes[first] >= caps[first]:
            dense.append(first)
        else:
            break
    real = [0.0] * len(sizes)
    for l in free:
        real[l] = float(caps[l]) if l in dense else min(eps * p[l] * sizes[l], float(caps[l]))
    counts = [min(int(math.floor(r)), caps[l]) for l, r in enumerate(real)]
    left = keep - sum(counts)
    by_remainder = sorted((l for l in range(len(sizes)) if counts[l] < caps[l]),
                          key=lambda l: (-(real[l] - counts[l]), l))
    while left > 0:  # normally one pass; more only if rounding of eps left several units over
        progressed = False
        for l in by_remainder:
            if left == 0:
                break
            if counts[l] < caps[l]:
                counts[l] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("erk: could not place the budget (internal error)")
    return counts


@dataclass(frozen=True)
class ERKOptions(Options):
    power_scale: float = option(1.0, "exponent of the ERK ratio (sum of dims / product); 0 = uniform",
                                between(0.0, 10.0))


@dataclass(frozen=True)
class ERKRandomOptions(RandomOptions, ERKOptions):
    pass


def context_erk_quotas(ctx: ScoreContext, keep: int, power_scale: float) -> List[int]:
    """ERK counts over ctx's prunable tensors, capped by what each still keeps."""
    caps = widetopo_ext.mask_stats(ctx.masks)[:, 0].tolist()
    return erk_quotas([ctx.params[n].shape for n in ctx.names], keep, power_scale, caps)


class _ERKQuotas:
    selection = "layerwise"
    decay = False
    data_dependent = False
    needs_targets = False

    def layer_quotas(self, ctx: ScoreContext, keep: int) -> List[int]:
        return context_erk_quotas(ctx, keep, self.options.power_scale)


class ERKRandomScorer(_ERKQuotas, RandomScorer):
    """random-ERK: ERK per-layer counts, a uniform random subset inside each layer (the draws of
    the random method, from ctx.generator(0))."""

    name = "erk-random"
    Options = ERKRandomOptions


class ERKMagnitudeScorer(_ERKQuotas, MagnitudeScorer):
    """magnitude-ERK: ERK per-layer counts, the largest |theta| inside each layer (|theta|, so
    large negative weights are kept)."""

    name = "erk-magnitude"
    Options = ERKOptions
