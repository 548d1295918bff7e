"""RReg, regular bipartite channel graphs (Stewart, Michieli & Ozay, CVPR-W 2023), docs/design.md §5.8.

Data-free, one shot. Layer densities d_l = q_l / N_l come from the ERK allocation of K
(widetopo.scores.erk.erk_quotas: exact integer counts q_l summing to K). A prunable tensor of
rank >= 2, stored as (C_out, C_in, k...) with t = prod(k) taps per kernel, and d_l < 1 keeps
whole kernels: its channel-pair matrix P in {0,1}^{C_out x C_in} is built from r-regular
bipartite graphs until it holds E pairs,

    E = floor(d_l * C_in * C_out) = q_l // t,    r = min(degree, C_in, C_out),
    repeat while |P| < E:  v = max(min((E - |P|) // r, min(C_in, C_out)), r);
                           an r-regular bipartite graph on v random output and v random input
                           channels is OR-ed into P,

and the mask is P broadcast over the kernel (m[o, i, ...] = P[o, i]). Why: a regular graph
keeps every chosen channel equally connected, and a *random* regular graph is an expander
(second singular value ~ 2 sqrt(r - 1) instead of r), which spreads the few kept connections
over many paths.

Rounding (not exact K): each such layer keeps |P| * t weights with E <= |P| <= E + r^2 - 1
(capped at C_out * C_in); E = 0 keeps nothing. Dense layers (q_l = N_l) keep N_l; tensors of
rank < 2 keep a uniform random subset of exactly q_l entries. RRegScorer.kept_bounds gives
the resulting [lo, hi] of the total. Grouped convolutions use the stored (C_out, C_in/g) pair
matrix.

graph="random" (default) draws each r-regular graph as a union of r random perfect matchings
without repeated edges (for r > v/2: the complement of a random (v - r)-regular graph).
graph="havel_hakimi" reproduces the WideTopo port: the deterministic Havel-Hakimi graph
(each row in turn joins the r columns of largest remaining degree, lowest index first), i.e.
disjoint K_{r,r} blocks and a band, whose second singular value is ~ r (no expansion).
Randomness: a CPU generator seeded by (seed, round) like ctx.generator(0) (the same masks on
every device), never the global RNG.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from widetopo.engine.rng import make_generator
from widetopo.options import Options, integer, nonnegative, one_of, option
from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores.erk import erk_quotas

__all__ = ["RRegScorer", "RRegOptions", "random_regular_bipartite", "havel_hakimi_bipartite", "regular_pairs"]

#: placements after which a layer that still lacks pairs is reported (an internal limit)
_MAX_PLACEMENTS = 100_000


def _randperm(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen, device=gen.device)


def _random_matching_avoiding(adj: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A uniformly drawn permutation of the columns, repaired by random row swaps until no row
    meets a column it is already joined to in `adj` (v x v bool, each row of degree < v/2)."""
    v = adj.shape[0]
    perm = _randperm(v, gen)
    bad = adj[torch.arange(v, device=adj.device), perm].nonzero().flatten().tolist()
    tries = 0
    while bad:
        a = bad[-1]
        b = int(torch.randint(v, (1,), generator=gen, device=gen.device))
        tries += 1
        if tries > 1000 * v:
            raise RuntimeError("rreg: could not complete a random perfect matching (internal error)")
        pa, pb = int(perm[a]), int(perm[b])
        if adj[a, pb] or adj[b, pa]:
            continue
        perm[a], perm[b] = pb, pa
        bad.pop()
        if b in bad:
            bad.remove(b)
    return perm


def random_regular_bipartite(v: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """A random r-regular bipartite graph on v + v nodes as a v x v bool matrix: the union of r
    random perfect matchings without repeated edges (r > v/2: complement of a (v - r)-regular one)."""
    if not 0 <= r <= v:
        raise ValueError(f"rreg: degree must be in [0, {v}], got {r}")
    device = gen.device
    if 2 * r > v:
        return ~random_regular_bipartite(v, v - r, gen)
    adj = torch.zeros(v, v, dtype=torch.bool, device=device)
    rows = torch.arange(v, device=device)
    for _ in range(r):
        adj[rows, _random_matching_avoiding(adj, gen)] = True
    return adj


def havel_hakimi_bipartite(v: int, r: int, device=None) -> torch.Tensor:
    """The deterministic Havel-Hakimi r-regular bipartite graph (the WideTopo port's): row j
    joins the r columns with the largest remaining degree, the lowest index first."""
    if not 0 <= r <= v:
        raise ValueError(f"rreg: degree must be in [0, {v}], got {r}")
    adj = torch.zeros(v, v, dtype=torch.bool, device=device)
    left = [r] * v
    for j in range(v):
        cols = sorted(range(v), key=lambda c: (-left[c], c))[:r]
        if any(left[c] == 0 for c in cols):
            raise RuntimeError("rreg: Havel-Hakimi construction failed (internal error)")
        for c in cols:
            adj[j, c] = True
            left[c] -= 1
    return adj


def regular_pairs(c_out: int, c_in: int, target: int, degree: int, gen: torch.Generator,
                  graph: str = "random") -> torch.Tensor:
    """The C_out x C_in channel-pair matrix of one layer: r-regular blocks on random channels,
    OR-ed in until it holds at least `target` pairs (see the module docstring)."""
    pairs = torch.zeros(c_out, c_in, dtype=torch.bool, device=gen.device)
    r = min(degree, c_in, c_out)
    small = min(c_in, c_out)
    done = 0
    for _ in range(_MAX_PLACEMENTS):
        if done >= target:
            return pairs
        v = max(min((target - done) // r, small), r)
        block = (random_regular_bipartite(v, r, gen) if graph == "random"
                 else havel_hakimi_bipartite(v, r, gen.device))
        outs = _randperm(c_out, gen)[:v]
        ins = _randperm(c_in, gen)[:v]
        pairs[outs[:, None], ins[None, :]] |= block
        done = int(pairs.sum())
    raise RuntimeError(f"rreg: {_MAX_PLACEMENTS} placements did not reach {target} pairs of a "
                       f"{c_out} x {c_in} layer (internal limit)")


def _taps(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape[2:])


@dataclass(frozen=True)
class RRegOptions(Options):
    degree: int = option(15, "r: degree of the regular channel graphs (capped by C_in and C_out)", integer(1))
    graph: str = option("random", "'random': random r-regular graphs (expanders); 'havel_hakimi': the WideTopo "
                                  "port's deterministic Havel-Hakimi graphs (blocks / band, no expansion)",
                        one_of("random", "havel_hakimi"))
    power_scale: float = option(1.0, "exponent of the ERK ratio of the layer densities (0 = uniform)", nonnegative)


class RRegScorer(Scorer):
    """RReg: ERK densities, regular bipartite channel graphs, whole kernels (module docstring)."""

    name = "rreg"
    data_dependent = False
    first_batch_only = True  # reads no batch
    decay = False
    needs_targets = False
    selection = "mask"
    Options = RRegOptions

    def validate(self, model, names, options) -> None:
        """One shot: the graphs are drawn on the dense network, so rounds = 1, no restoration."""
        if options.rounds != 1 or options.restorations != 0:
            raise ValueError(
                f"rreg builds its masks in one shot (random regular channel graphs on the dense network); "
                f"rounds must be 1 and restorations 0, got rounds={options.rounds}, "
                f"restorations={options.restorations}")

    def score(self, ctx: ScoreContext, batches: Sequence[Batch] = ()) -> List[torch.Tensor]:
        """No per-weight score: the current mask (1 kept, 0 pruned); choose_masks draws the graphs."""
        return [m.to(torch.float64 if p.dtype == torch.float64 else torch.float32) for m, p in
                zip(ctx.masks, ctx.prunable)]

    def quotas(self, shapes: Sequence[Sequence[int]], keep: int) -> List[int]:
        return erk_quotas(shapes, keep, self.options.power_scale)

    def kept_bounds(self, shapes: Sequence[Sequence[int]], keep: int) -> Tuple[int, int]:
        """[lo, hi] of the total kept for a target of `keep` (the rounding of the module docstring)."""
        lo = hi = 0
        for shape, q in zip(shapes, self.quotas(shapes, keep)):
            n = math.prod(int(d) for d in shape)
            if len(shape) < 2 or q == n:
                lo, hi = lo + q, hi + q
                continue
            t, e = _taps(shape), q // _taps(shape)
            r = min(self.options.degree, int(shape[0]), int(shape[1]))
            lo += e * t
            hi += (min(e + r * r - 1, int(shape[0]) * int(shape[1])) if e > 0 else 0) * t
        return lo, hi

    def choose_masks(self, ctx: ScoreContext, scores: List[torch.Tensor], keep: int) -> List[torch.Tensor]:
        shapes = [tuple(m.shape) for m in ctx.masks]
        if any(not bool(m.all()) for m in ctx.masks):
            raise RuntimeError("rreg draws its graphs on the dense network (one shot); the masks are not dense")
        gen = make_generator(ctx.seed, ctx.round, 0, "cpu", 0)  # drawn on the CPU: same masks on any device
        out = []
        for shape, q, m in zip(shapes, self.quotas(shapes, keep), ctx.masks):
            n = m.numel()
            if q == n:
                out.append(torch.ones_like(m))
            elif len(shape) < 2:
                chosen = torch.zeros(n, dtype=torch.bool, device=m.device)
                chosen[_randperm(n, gen)[:q].to(m.device)] = True
                out.append(chosen.view(shape))
            else:
                pairs = regular_pairs(shape[0], shape[1], q // _taps(shape), self.options.degree, gen,
                                      self.options.graph).to(m.device)
                out.append(pairs.view(shape[:2] + (1,) * (len(shape) - 2)).expand(shape).clone())
        return out
