"""PHEW, paths with higher edge weights (Patil & Dovrolis, ICML 2021), docs/design.md §5.9.

Data-free. Random walks on the unit graph of the traced network, biased by |theta|, keep the
weights they cross until K are kept. For a prunable layer l read as W_l[o, i, tap] (output unit
o, input unit i, kernel tap; grouped and transposed convolutions mapped to their global units)
the walk weights are A_l[o, i] = sum_taps |W_l[o, i, tap]| (of theta * m):

  forward walk  (starts round-robin at the input units of the layers that read the network input):
      at input unit i of layer l draw (o, tap) with probability |W_l[o, i, tap]| / sum_{o, tap} |W_l[o, i, tap]|
      (= o ~ A_l[., i] / sum_o A_l[o, i], then tap ~ |W_l[o, i, .]|), keep W_l[o, i, tap], then move to
      a uniformly drawn input unit (l', i') that output unit o of l feeds;
  backward walk (starts round-robin at the output units of the layers that feed no prunable layer):
      the mirror image, (i, tap) ~ |W_l[o, ., .]|, then to a uniformly drawn output unit feeding i.

Forward and backward walks alternate; a walk ends where the graph does (network input or
output) or at a unit whose walk weights are all 0. Which unit feeds which is traced, not read
from parameter order: each prunable layer's output is made a fresh leaf in a probe forward,
and input unit i' of layer l' depends on output unit o of l when d x_{l'}[:, i'] / d y_l[:, o]
is not zero (residual adds, concatenations, flattening, attention are followed as they are;
a flattened conv channel feeds H*W inputs, so a walk moves to a random spatial slot of it).
The probe is the union of two forwards in eval mode: the first pruning batch (up to 4
samples) and an all-ones input through |theta| (every ReLU open), set at the signal: the
floating input, or the embedding output for token ids (docs/design.md §2.5).

stop="exact" (default) keeps exactly K: the walk that reaches K stops there (it may leave up to
L - 1 weights of a partial path). stop="walk" finishes that walk: K <= kept <= K + L - 1, L the
longest path (selection by walks, the paper's). Kept weights are counted as they are added
(O(1) per step). If walks stop adding weights (the reachable weights with |theta| > 0 are
fewer than K), the rest is filled with the largest |theta| and a warning is logged.

Supported prunable tensors: weights of Linear and Conv/ConvTranspose modules, each module
called once per forward; anything else is refused before any work.
Randomness: a CPU generator seeded by (seed, round) like ctx.generator(0), never the global RNG.
"""
from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from widetopo.engine.rng import make_generator
from widetopo.options import Options, one_of, option
from widetopo.scores.inputs import head, input_embedding, needs_embedding
from widetopo.scores.base import Batch, ScoreContext, Scorer
from widetopo.scores.bn import eval_mode
from widetopo.sparsity.selection import parameter_owners

logger = logging.getLogger(__name__)

__all__ = ["PHEWScorer", "PHEWOptions", "UnitGraph", "trace_unit_graph", "phew_masks"]

_SUPPORTED = (nn.Linear, nn.modules.conv._ConvNd)
_PROBE_SAMPLES = 4
_CHANNEL_CHUNK = 64  # input channels per batched backward of the trace


def _layer_module(model: nn.Module, name: str, owners=None) -> nn.Module:
    """The Linear/Conv module whose weight is prunable tensor `name`; ValueError otherwise."""
    owners = parameter_owners(model) if owners is None else owners
    held = owners.get(name, [])
    if len(held) != 1:
        raise ValueError(f"phew: prunable tensor {name!r} is held by {len(held)} modules (tied weights); "
                         "its units have no single place in the unit graph")
    _, module, local = held[0]
    if not isinstance(module, _SUPPORTED) or local != "weight":
        raise ValueError(f"phew: prunable tensor {name!r} is {local!r} of a {type(module).__name__}; PHEW walks "
                         "support the weights of Linear and Conv/ConvTranspose modules only (restrict the "
                         "prunable set, e.g. include=('Linear', 'Conv2d'))")
    return module


def _units(module: nn.Module) -> Tuple[int, int, int]:
    """(output units, input units, channel dim of the module's input and output)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, -1
    return module.out_channels, module.in_channels, 1


def _global_index(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, taps) int64: the flat index into `weight` of entry (o, i, tap), -1 where
    output unit o does not see input unit i (other conv group)."""
    c_out, c_in, _ = _units(module)
    if isinstance(module, nn.Linear):
        return torch.arange(weight.numel()).view(c_out, c_in, 1)
    g, taps = int(module.groups), math.prod(weight.shape[2:])
    flat = torch.arange(weight.numel()).view(weight.shape[0], weight.shape[1], taps)
    out = torch.full((c_out, c_in, taps), -1, dtype=torch.long)
    if module.transposed:  # weight (C_in, C_out/g, taps)
        per_in, per_out = c_in // g, c_out // g
        for grp in range(g):
            ins = slice(grp * per_in, (grp + 1) * per_in)
            outs = slice(grp * per_out, (grp + 1) * per_out)
            out[outs, ins] = flat[ins].transpose(0, 1)
    else:  # weight (C_out, C_in/g, taps)
        per_in, per_out = c_in // g, c_out // g
        for grp in range(g):
            out[grp * per_out:(grp + 1) * per_out, grp * per_in:(grp + 1) * per_in] = flat[grp * per_out:(grp + 1) * per_out]
    return out


@dataclass
class UnitGraph:
    """The traced unit graph of the prunable layers (aligned with the names):
    units[l] = (C_out, C_in); feeds[l][o] = [(l', i'), ...] that output unit o of l feeds;
    fed_by[l][i] = [(l'', o''), ...] that feed input unit i of l; sources / sinks: the
    (l, i) input units reading the network input and the (l, o) output units feeding no layer."""

    units: List[Tuple[int, int]]
    feeds: List[List[List[Tuple[int, int]]]]
    fed_by: List[List[List[Tuple[int, int]]]]
    sources: List[Tuple[int, int]]
    sinks: List[Tuple[int, int]]


def _probe(ctx: ScoreContext, modules: List[nn.Module], x: torch.Tensor, positive: bool) -> List[Dict[int, torch.Tensor]]:
    """deps[b][a] = bool (C_out(a), C_in(b)): output unit o of layer a feeds input unit i of b
    directly (not through another prunable layer), from one probe forward."""
    index = {id(m): j for j, m in enumerate(modules)}
    inputs: Dict[int, torch.Tensor] = {}
    leaves: Dict[int, torch.Tensor] = {}
    calls: Dict[int, int] = {}

    def pre_hook(module, args):
        j = index[id(module)]
        calls[j] = calls.get(j, 0) + 1
        if args and isinstance(args[0], torch.Tensor):
            inputs[j] = args[0]

    def hook(module, args, out):
        leaf = out.detach().requires_grad_(True)
        leaves[index[id(module)]] = leaf
        return leaf.clone()  # (a non-leaf: in-place activations after the layer stay legal)

    def t(v):
        v = v.detach()
        return v.abs() if positive and v.is_floating_point() else v

    params = {n: t(p) for n, p in ctx.params.items()}
    buffers = {n: t(b) for n, b in ctx.buffers.items()}
    handles = [m.register_forward_pre_hook(pre_hook) for m in modules] + [m.register_forward_hook(hook) for m in modules]
    try:
        with eval_mode(ctx.model), torch.enable_grad():
            ctx.output(params, x, buffers)
    finally:
        for h in handles:
            h.remove()
    twice = [j for j, c in calls.items() if c > 1]
    if twice:
        raise ValueError(f"phew: layer {ctx.names[twice[0]]!r} runs more than once in one forward (a shared "
                         "module); its units have no single place in the unit graph")
    deps: List[Dict[int, torch.Tensor]] = [dict() for _ in modules]
    order = sorted(leaves)
    targets = [leaves[a] for a in order]
    target_dims = [_units(modules[a])[2] for a in order]
    for b, xb in inputs.items():
        if not xb.requires_grad:
            continue
        _, c_in, dim = _units(modules[b])
        for first in range(0, c_in, _CHANNEL_CHUNK):
            chans = list(range(first, min(first + _CHANNEL_CHUNK, c_in)))
            for a, hits in zip(order, _channel_jacobian_support(xb, dim, chans, targets, target_dims)):
                if hits is None or not bool(hits.any()):
                    continue
                if a not in deps[b]:
                    deps[b][a] = torch.zeros(_units(modules[a])[0], c_in, dtype=torch.bool)
                deps[b][a][:, chans] |= hits.T.cpu()
    return deps


def _channel_jacobian_support(xb: torch.Tensor, dim: int, chans: List[int], targets: List[torch.Tensor],
                              target_dims: List[int]):
    """For each target y with channel dim ydim (1 for conv outputs, -1 for linear ones): bool
    (len(chans), C_y) - whether d sum(x[:, c]) / d y[:, o] is nonzero anywhere (c in chans).
    One batched backward (vmap over the one-hot cotangents), a loop if the graph cannot be vmapped."""
    onehot = torch.zeros((len(chans),) + tuple(xb.shape), dtype=xb.dtype, device=xb.device)
    for k, c in enumerate(chans):
        onehot[k].select(dim if dim >= 0 else xb.dim() + dim, c).fill_(1)
    try:
        grads = torch.autograd.grad(xb, targets, grad_outputs=onehot, retain_graph=True, allow_unused=True,
                                    is_grads_batched=True)
    except RuntimeError:
        per = [torch.autograd.grad(xb, targets, grad_outputs=onehot[k], retain_graph=True, allow_unused=True)
               for k in range(len(chans))]
        grads = [None if per[0][t] is None else torch.stack([p[t] for p in per]) for t in range(len(targets))]
    out = []
    for g, ydim in zip(grads, target_dims):
        if g is None:
            out.append(None)
            continue
        g = g.ne(0).movedim(ydim + 1 if ydim >= 0 else g.dim() + ydim, 1)  # (chans, C_y, ...)
        out.append(g.reshape(g.shape[0], g.shape[1], -1).any(2))
    return out


def trace_unit_graph(ctx: ScoreContext, x: torch.Tensor) -> UnitGraph:
    """The unit graph of ctx's prunable layers, traced on probe input `x` (see the module docstring)."""
    owners = parameter_owners(ctx.model)
    modules = [_layer_module(ctx.model, n, owners) for n in ctx.names]
    x = head(x, _PROBE_SAMPLES)
    deps = _probe(ctx, modules, x, positive=False)
    if not needs_embedding(x) or input_embedding(ctx.model) is not None:  # ones at the signal (design §2.5)
        for b, more in enumerate(_probe(ctx, modules, ctx.with_signal(x, torch.ones_like), positive=True)):
            for a, d in more.items():
                deps[b][a] = deps[b][a] | d if a in deps[b] else d
    units = [_units(m)[:2] for m in modules]
    feeds = [[[] for _ in range(c_out)] for c_out, _ in units]
    fed_by = [[[] for _ in range(c_in)] for _, c_in in units]
    for b, row in enumerate(deps):
        for a in sorted(row):
            for o, i in row[a].nonzero().tolist():
                feeds[a][o].append((b, i))
                fed_by[b][i].append((a, o))
    sources = [(b, i) for b in range(len(modules)) if not deps[b] for i in range(units[b][1])]
    sinks = [(a, o) for a in range(len(modules)) if not any(feeds[a]) for o in range(units[a][0])]
    return UnitGraph(units, feeds, fed_by, sources, sinks)


class _Uniforms:
    """Uniform [0, 1) draws from a torch.Generator, fetched in blocks."""

    def __init__(self, gen: torch.Generator, block: int = 4096):
        self.gen, self.block, self.buf, self.pos = gen, block, [], 0

    def __call__(self) -> float:
        if self.pos == len(self.buf):
            self.buf = torch.rand(self.block, generator=self.gen, dtype=torch.float64).tolist()
            self.pos = 0
        self.pos += 1
        return self.buf[self.pos - 1]


def phew_masks(graph: UnitGraph, weights: Sequence[torch.Tensor], modules: Sequence[nn.Module], keep: int,
               gen: torch.Generator, stop: str = "exact", max_idle: Optional[int] = None,
               allowed: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """Bool masks (shaped like `weights`) of PHEW walks on `graph` biased by |weights| until
    `keep` weights are kept (stop="exact": exactly keep; "walk": the last walk completes).
    allowed: the current masks (weights outside them are 0, so walks never cross them; the
    fill never picks them)."""
    uniform = _Uniforms(gen)
    n_layers = len(weights)
    idx = [_global_index(m, w) for m, w in zip(modules, weights)]
    mags = []
    for w, ix in zip(weights, idx):
        flat = w.detach().abs().double().flatten().cpu()
        mags.append(torch.where(ix >= 0, flat[ix.clamp_min(0)], torch.zeros((), dtype=torch.float64)))
    # cumulative walk weights: forward rows per input unit over (o, tap), backward rows per output unit over (i, tap)
    fwd = [m.permute(1, 0, 2).reshape(m.shape[1], -1).cumsum(1) for m in mags]
    bwd = [m.reshape(m.shape[0], -1).cumsum(1) for m in mags]
    kept = [bytearray(w.numel()) for w in weights]
    total = sum(w.numel() for w in weights)
    if not 0 <= keep <= total:
        raise ValueError(f"phew: keep must be in [0, {total}], got {keep}")
    count = 0
    max_idle = max_idle if max_idle is not None else max(1000, 20 * (len(graph.sources) + len(graph.sinks)))

    rows: Dict[Tuple[bool, int, int], Tuple[List[float], List[int]]] = {}

    def row(forward: bool, layer: int, unit: int) -> Tuple[List[float], List[int]]:
        """(cumulative walk weights, flat weight indices) over (o, tap) of input unit `unit`
        (forward) or over (i, tap) of output unit `unit` (backward); cached as Python lists."""
        key = (forward, layer, unit)
        if key not in rows:
            cum = (fwd if forward else bwd)[layer][unit]
            ix = idx[layer][:, unit, :] if forward else idx[layer][unit, :, :]
            rows[key] = (cum.tolist(), ix.flatten().tolist())
        return rows[key]

    def draw(cum: List[float]) -> int:
        """An index j with probability (cum[j] - cum[j-1]) / cum[-1]; -1 if every weight is 0."""
        top = cum[-1]
        if not top > 0:
            return -1
        return min(bisect.bisect_right(cum, uniform() * top), len(cum) - 1)

    def add(layer: int, flat_index: int) -> bool:
        nonlocal count
        if kept[layer][flat_index]:
            return False
        kept[layer][flat_index] = 1
        count += 1
        return True

    def walk(forward: bool, start: Tuple[int, int]) -> bool:
        layer, unit = start
        grew = False
        for _ in range(n_layers + 1):  # a path crosses each layer at most once
            taps = mags[layer].shape[2]
            cum, flat = row(forward, layer, unit)
            j = draw(cum)
            if j < 0:
                break
            other = j // taps
            o, i = (other, unit) if forward else (unit, other)
            grew |= add(layer, flat[j])
            if stop == "exact" and count >= keep:
                break
            nxt = (graph.feeds[layer][o] if forward else graph.fed_by[layer][i])
            if not nxt:
                break
            layer, unit = nxt[min(int(uniform() * len(nxt)), len(nxt) - 1)]
        return grew

    walks = idle = 0
    starts = (graph.sources, graph.sinks)
    while count < keep:
        forward = walks % 2 == 0
        pool = starts[0 if forward else 1] or starts[1 if forward else 0]
        if not pool:
            break
        idle = 0 if walk(forward, pool[(walks // 2) % len(pool)]) else idle + 1
        walks += 1
        if idle >= max_idle:
            break
    masks = [torch.frombuffer(k, dtype=torch.uint8).bool().view(w.shape).clone() if len(k) else
             torch.zeros(w.shape, dtype=torch.bool) for k, w in zip(kept, weights)]
    if count < keep:  # the walks stopped adding weights: fill with the largest |theta|
        logger.warning("phew: %d walks in a row added no weight after %d of %d; keeping the %d largest |theta| "
                       "among the rest", max_idle, count, keep, keep - count)
        flat_w = torch.cat([w.detach().abs().double().flatten().cpu() for w in weights])
        flat_m = torch.cat([m.flatten() for m in masks])
        flat_w[flat_m] = -1.0
        if allowed is not None:
            flat_w[~torch.cat([a.flatten().cpu() for a in allowed])] = -2.0
        extra = flat_w.topk(keep - count).indices
        flat_m[extra] = True
        masks = [t.view(w.shape).clone() for t, w in zip(flat_m.split([w.numel() for w in weights]), weights)]
    logger.debug("phew: %d walks kept %d weights (target %d)", walks, count, keep)
    return masks


@dataclass(frozen=True)
class PHEWOptions(Options):
    stop: str = option("exact", "'exact': stop the walks at exactly K weights; 'walk': finish the last walk "
                                "(K <= kept <= K + L - 1)", one_of("exact", "walk"))


class PHEWScorer(Scorer):
    """PHEW: |theta|-biased random walks on the traced unit graph (module docstring)."""

    name = "phew"
    data_dependent = False
    first_batch_only = True  # traces on the first batch
    decay = False
    needs_targets = False
    selection = "mask"
    Options = PHEWOptions

    def validate(self, model, names, options) -> None:
        """Every prunable tensor must be the weight of one Linear or Conv module."""
        owners = parameter_owners(model)
        for n in names:
            _layer_module(model, n, owners)

    def score(self, ctx: ScoreContext, batches: Sequence[Batch] = ()) -> List[torch.Tensor]:
        """|theta * m| (what biases the walks); traces the unit graph for choose_masks."""
        if not batches:
            raise ValueError("phew traces the network on a probe input: pass at least one batch")
        ctx.extra["phew_graph"] = trace_unit_graph(ctx, ctx.inputs(batches[0]))
        return [p.detach().abs().to(torch.float64 if p.dtype == torch.float64 else torch.float32)
                for p in ctx.prunable]

    def choose_masks(self, ctx: ScoreContext, scores: List[torch.Tensor], keep: int) -> List[torch.Tensor]:
        graph = ctx.extra.get("phew_graph")
        if graph is None:
            raise RuntimeError("phew: choose_masks needs the unit graph that score() traces (internal error)")
        owners = parameter_owners(ctx.model)
        modules = [_layer_module(ctx.model, n, owners) for n in ctx.names]
        gen = make_generator(ctx.seed, ctx.round, 0, "cpu", 0)
        masks = phew_masks(graph, ctx.prunable, modules, keep, gen, self.options.stop, allowed=ctx.masks)
        return [m.to(c.device) for m, c in zip(masks, ctx.masks)]
