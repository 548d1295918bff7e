"""Unit topology of every prunable tensor: which entries connect which output and input units.

The ops of widetopo_ext read a tensor of rank >= 2 as (O, I, K): dim 0 = output units, dim 1 =
input units, the rest = kernel. That is right for Linear and ungrouped Conv weights only:

* grouped / depthwise conv, weight (O, I/g, k...): output unit o sees only the I/g input
  channels of its group. The weight's rows are contiguous per group, so its g blocks along dim 0
  are independent (O/g output units x I/g input units) bipartite graphs. Every op here splits
  the tensor into those g views and passes them to the widetopo_ext op as separate list
  entries, which gives exact degrees (a depthwise conv of C channels: C entries of shape
  (1, 1, k...)).
* transposed conv, weight (I, O/g, k...): dims 0 and 1 swap meaning. Decay and restoration are
  symmetric in output/input units, so only the labels of the statistics change (and the
  restoration noise is drawn per (dim 0, dim 1) pair of the stored layout, one draw per
  connected unit pair either way). Groups split dim 0 exactly as above.
* Embedding weight (num_embeddings, dim): a one-hot lookup, so dim 0 = input units (tokens),
  dim 1 = output units (features): read as transposed.
* tokens (a parameter of a non-torch.nn module whose first dimension is 1, e.g. cls_token
  (1, 1, D) or pos_embed (1, N, D)): no units connect through them; every entry is its own unit
  (elementwise), like a rank-1 tensor: no decay, restoration score 1 when pruned.
* everything else, including MultiheadAttention in_proj_weight (3E, E) (rows = q, k, v output
  units, columns = the E embedding features they all read) and LSTM/GRU weights (gates*H, I):
  the dense (O, I, K) view. A tied parameter takes the layout of its first owner.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

import widetopo_ext
from widetopo.params import EMBEDDING_TYPES, _base, is_torch_layer, parameter_owners

__all__ = [
    "UnitLayout", "DENSE", "layout_of", "unit_layouts", "unit_counts",
    "density_decay_", "restoration_scores", "mask_stats", "noise_shape",
]


@dataclass(frozen=True)
class UnitLayout:
    """groups: independent blocks along dim 0 (conv groups); transposed: dim 0 holds input
    units and dim 1 output units (per group); elementwise: every entry is its own unit."""

    groups: int = 1
    transposed: bool = False
    elementwise: bool = False

    def __post_init__(self):
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"UnitLayout.groups must be an integer >= 1, got {self.groups!r}")


DENSE = UnitLayout()


def layout_of(module: nn.Module, local: str, param: torch.Tensor) -> UnitLayout:
    """The layout of parameter `local` of `module` (rules in the module docstring)."""
    base = _base(local)
    if param.dim() < 2:
        return DENSE
    if isinstance(module, nn.modules.conv._ConvNd) and base == "weight":
        return UnitLayout(groups=int(module.groups), transposed=bool(module.transposed))
    if isinstance(module, EMBEDDING_TYPES) and base == "weight":
        return UnitLayout(transposed=True)
    if not is_torch_layer(module) and param.shape[0] == 1:
        return UnitLayout(elementwise=True)
    return DENSE


def unit_layouts(model: nn.Module, names: Sequence[str]) -> List[UnitLayout]:
    """One UnitLayout per name (canonical parameter names, e.g. from select_prunable)."""
    owners = parameter_owners(model)
    params = dict(model.named_parameters())
    out = []
    for name in names:
        if name not in params:
            raise ValueError(f"unit_layouts: {name!r} is not a parameter of the model")
        uses = owners.get(name)
        if not uses:
            out.append(DENSE)
            continue
        _, module, local = uses[0]
        out.append(layout_of(module, local, params[name]))
    return out


def unit_counts(shape: Sequence[int], layout: UnitLayout = DENSE) -> Tuple[int, int]:
    """(output units, input units) of a tensor of `shape` read with `layout`."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if len(shape) < 2 or layout.elementwise:
        return numel, numel
    rows, cols = shape[0], shape[1] * layout.groups
    return (cols, rows) if layout.transposed else (rows, cols)


def noise_shape(shape: Sequence[int], layout: UnitLayout = DENSE) -> Optional[Tuple[int, int]]:
    """Shape of the restoration noise (one draw per (dim 0, dim 1) pair of the stored layout),
    None where the tensor has no unit pairs (rank < 2 or elementwise)."""
    if len(shape) < 2 or layout.elementwise:
        return None
    return int(shape[0]), int(shape[1])


def _check(masks: Sequence[torch.Tensor], layouts: Optional[Sequence[UnitLayout]]) -> List[UnitLayout]:
    masks = list(masks)
    if layouts is None:
        return [DENSE] * len(masks)
    layouts = list(layouts)
    if len(layouts) != len(masks):
        raise ValueError(f"layouts must have one UnitLayout per mask: got {len(layouts)} vs {len(masks)}")
    for j, (m, lay) in enumerate(zip(masks, layouts)):
        if not isinstance(lay, UnitLayout):
            raise TypeError(f"layouts[{j}] must be a widetopo.topology.UnitLayout, got {type(lay).__name__}")
        if lay.groups > 1 and not lay.elementwise:
            if m.dim() < 2 or m.shape[0] % lay.groups:
                raise ValueError(
                    f"layouts[{j}] has groups={lay.groups}, which must divide dim 0 of a rank >= 2 "
                    f"tensor; masks[{j}] has shape {tuple(m.shape)}"
                )
    return layouts


def _pieces(t: torch.Tensor, layout: UnitLayout) -> List[torch.Tensor]:
    """Views of `t` that the ops read with the dense (O, I, K) rule."""
    if t.dim() < 2:
        return [t]
    if layout.elementwise:
        return [t.reshape(-1)]
    if layout.groups == 1:
        return [t]
    return list(t.unflatten(0, (layout.groups, t.shape[0] // layout.groups)).unbind(0))


def density_decay_(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                   layouts: Optional[Sequence[UnitLayout]], exponent: float) -> None:
    """widetopo_ext.density_decay_ with the degrees of each tensor's true unit graph:
    S <- S * (m / max(out_deg[o] in_deg[i], 1))^exponent per group block; elementwise tensors
    (and rank < 2 ones) untouched. One op call for all tensors."""
    scores, masks = list(scores), list(masks)
    layouts = _check(masks, layouts)
    s_list, m_list = [], []
    for s, m, lay in zip(scores, masks, layouts):
        if s.dim() < 2 or lay.elementwise:
            continue
        s_list += _pieces(s, lay)
        m_list += _pieces(m, lay)
    widetopo_ext.density_decay_(s_list, m_list, exponent)


def restoration_scores(masks: Sequence[torch.Tensor], noise: Sequence[Optional[torch.Tensor]],
                       noise_scale: float = 1e-5,
                       layouts: Optional[Sequence[UnitLayout]] = None) -> List[torch.Tensor]:
    """widetopo_ext.restoration_scores per group block: kept 2; pruned entries of a unit graph
    (1 - out_density[o]) (1 - in_density[i]) + noise_scale * noise[o, i] with the densities of
    the block; pruned entries of rank < 2 / elementwise tensors 1. noise[j] has
    noise_shape(masks[j].shape, layouts[j]) (None where that is None). One op call."""
    masks = list(masks)
    layouts = _check(masks, layouts)
    noise = list(noise)
    if len(noise) != len(masks):
        raise ValueError(f"noise must have one entry per mask: got {len(noise)} vs {len(masks)}")
    m_list, n_list, counts = [], [], []
    for j, (m, n, lay) in enumerate(zip(masks, noise, layouts)):
        pieces = _pieces(m, lay)
        want = noise_shape(m.shape, lay)
        if want is None:
            n_pieces = [None] * len(pieces)
        else:
            if not isinstance(n, torch.Tensor) or tuple(n.shape) != want:
                got = tuple(n.shape) if isinstance(n, torch.Tensor) else type(n).__name__
                raise ValueError(f"noise[{j}] must be a float32 tensor of shape {want} for masks[{j}] of shape "
                                 f"{tuple(m.shape)} ({lay}), got {got}")
            n_pieces = _pieces(n, lay) if lay.groups > 1 else [n]
        m_list += pieces
        n_list += n_pieces
        counts.append(len(pieces))
    out_pieces = widetopo_ext.restoration_scores(m_list, n_list, noise_scale)
    out, start = [], 0
    for m, c in zip(masks, counts):
        group = out_pieces[start:start + c]
        start += c
        whole = group[0] if c == 1 else torch.cat(group, dim=0)
        out.append(whole.reshape(m.shape))
    return out


def mask_stats(masks: Sequence[torch.Tensor], layouts: Optional[Sequence[UnitLayout]] = None) -> torch.Tensor:
    """int64 (n, 3): kept, active output units, active input units per mask, with the units of
    each tensor's layout (groups summed, transposed dims relabelled, elementwise and rank < 2:
    (kept, kept, kept)). One op call."""
    masks = list(masks)
    layouts = _check(masks, layouts)
    if not masks:
        return torch.zeros((0, 3), dtype=torch.int64)
    pieces, owner = [], []
    for j, (m, lay) in enumerate(zip(masks, layouts)):
        p = _pieces(m, lay)
        pieces += p
        owner += [j] * len(p)
    table = widetopo_ext.mask_stats(pieces)
    if len(pieces) != len(masks):
        index = torch.tensor(owner, dtype=torch.long, device=table.device)
        table = torch.zeros((len(masks), 3), dtype=table.dtype, device=table.device).index_add_(0, index, table)
    swap = torch.tensor([lay.transposed and not lay.elementwise and m.dim() >= 2 for m, lay in zip(masks, layouts)],
                        device=table.device)
    if bool(swap.any()):
        table = torch.where(swap[:, None], table[:, [0, 2, 1]], table)
    return table
