"""Unit topology of every prunable tensor: which entries connect which output and input units.

The ops of widetopo_ext read a tensor of rank >= 2 as (O, I, K): dim 0 = output units, dim 1 =
input units, the rest = kernel. That is right for Linear and ungrouped Conv weights only:

* grouped / depthwise conv, weight (O, I/g, k...): output unit o sees only the I/g input
  channels of its group. The weight's rows are contiguous per group, so its g blocks along dim 0
  are independent (O/g output units x I/g input units) bipartite graphs: viewed as
  (g, O/g, I/g, K), every formula of the op is applied per block with batched reductions
  (exact degrees; a depthwise conv of C channels is C blocks of shape (1, 1, K)).
* transposed conv, weight (I, O/g, k...): dims 0 and 1 swap meaning. Decay and restoration are
  symmetric in output/input units, so only the labels of the statistics change (and the
  restoration noise is drawn per (dim 0, dim 1) pair of the stored layout, one draw per
  connected unit pair either way). Groups split dim 0 exactly as above.
* Embedding weight (num_embeddings, dim): a one-hot lookup, so dim 0 = input units (tokens),
  dim 1 = output units (features): read as transposed.
* (in, out) layers (widetopo.sparsity.selection.IN_OUT_LAYERS, e.g. transformers' Conv1D of
  GPT-2, y = x @ W + b with W (in, out)): dim 0 = input units, dim 1 = output units: read as
  transposed, exactly like the nn.Linear holding W^T.
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
from widetopo.sparsity.selection import EMBEDDING_TYPES, _base, is_in_out_layer, is_torch_layer, parameter_owners

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
    if is_in_out_layer(module) and base == "weight":
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
            raise TypeError(f"layouts[{j}] must be a widetopo.sparsity.topology.UnitLayout, got {type(lay).__name__}")
        if lay.groups > 1 and not lay.elementwise:
            if m.dim() < 2 or m.shape[0] % lay.groups:
                raise ValueError(
                    f"layouts[{j}] has groups={lay.groups}, which must divide dim 0 of a rank >= 2 "
                    f"tensor; masks[{j}] has shape {tuple(m.shape)}"
                )
    return layouts


def _pieces(t: torch.Tensor, layout: UnitLayout) -> List[torch.Tensor]:
    """Views of `t` that the ops read with the dense (O, I, K) rule (ungrouped layouts only)."""
    if t.dim() >= 2 and layout.elementwise:
        return [t.reshape(-1)]
    return [t]


def _grouped(t: torch.Tensor, layout: UnitLayout) -> bool:
    return t.dim() >= 2 and layout.groups > 1 and not layout.elementwise


def _blocks(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(O, I', k...) -> (g, O/g, I', K): the g independent unit graphs, a view."""
    return t.reshape(groups, t.shape[0] // groups, t.shape[1], -1)


def _block_degrees(m: torch.Tensor, groups: int):
    """Degrees of each group block: dim-0 units (g, O/g) and dim-1 units (g, I'), int64."""
    b = _blocks(m, groups).to(torch.int64)
    return b.sum(dim=(2, 3)), b.sum(dim=(1, 3))


# Grouped tensors are computed blockwise with batched torch reductions (all g blocks at once)
# instead of g list entries of the op: the op's per-entry overhead made a 1024-channel
# depthwise conv ~35x slower than one dense tensor of the same size. The formulas are the
# op's (widetopo_ext.reference), applied per block.


def _grouped_decay_(s: torch.Tensor, m: torch.Tensor, groups: int, exponent: float) -> None:
    dout, din = _block_degrees(m, groups)
    denom = (dout[:, :, None] * din[:, None, :]).clamp(min=1).to(torch.float64)
    factor = torch.where(_blocks(m, groups), denom.pow(-exponent)[..., None], 0.0)
    with torch.no_grad():
        s.copy_((_blocks(s, groups).to(torch.float64) * factor).reshape(s.shape).to(s.dtype))


def _grouped_restoration(m: torch.Tensor, n: torch.Tensor, groups: int, noise_scale: float) -> torch.Tensor:
    dout, din = _block_degrees(m, groups)
    rows, cols = m.shape[0] // groups, m.shape[1]
    k = m[0, 0].numel()
    out_density = (dout.to(torch.float64) / (cols * k)).to(torch.float32)
    in_density = (din.to(torch.float64) / (rows * k)).to(torch.float32)
    pruned = (1.0 - out_density)[:, :, None] * (1.0 - in_density)[:, None, :] \
        + noise_scale * n.to(torch.float32).reshape(groups, rows, cols)
    score = torch.where(_blocks(m, groups), 2.0, pruned[..., None])
    return score.reshape(m.shape).to(torch.float32).contiguous()


def _grouped_stats(m: torch.Tensor, groups: int) -> List[int]:
    dout, din = _block_degrees(m, groups)
    return [int(dout.sum()), int((dout > 0).sum()), int((din > 0).sum())]


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
        if _grouped(m, lay):
            _grouped_decay_(s, m, lay.groups, float(exponent))
            continue
        s_list.append(s)
        m_list.append(m)
    widetopo_ext.density_decay_(s_list, m_list, exponent)


def restoration_scores(masks: Sequence[torch.Tensor], noise: Sequence[Optional[torch.Tensor]],
                       noise_scale: float = widetopo_ext.DEFAULT_NOISE_SCALE,
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
    m_list, n_list, where = [], [], []
    out: List[Optional[torch.Tensor]] = [None] * len(masks)
    for j, (m, n, lay) in enumerate(zip(masks, noise, layouts)):
        want = noise_shape(m.shape, lay)
        if want is not None and (not isinstance(n, torch.Tensor) or tuple(n.shape) != want):
            got = tuple(n.shape) if isinstance(n, torch.Tensor) else type(n).__name__
            raise ValueError(f"noise[{j}] must be a float32 tensor of shape {want} for masks[{j}] of shape "
                             f"{tuple(m.shape)} ({lay}), got {got}")
        if _grouped(m, lay):
            out[j] = _grouped_restoration(m, n, lay.groups, float(noise_scale))
            continue
        m_list += _pieces(m, lay)
        n_list.append(None if want is None else n)
        where.append(j)
    for j, score in zip(where, widetopo_ext.restoration_scores(m_list, n_list, noise_scale)):
        out[j] = score.reshape(masks[j].shape)
    return out


def mask_stats(masks: Sequence[torch.Tensor], layouts: Optional[Sequence[UnitLayout]] = None) -> torch.Tensor:
    """int64 (n, 3): kept, active output units, active input units per mask, with the units of
    each tensor's layout (groups summed, transposed dims relabelled, elementwise and rank < 2:
    (kept, kept, kept)). One op call."""
    masks = list(masks)
    layouts = _check(masks, layouts)
    if not masks:
        return torch.zeros((0, 3), dtype=torch.int64)
    pieces = [_pieces(m, lay)[0] if not _grouped(m, lay) else m.new_zeros(0) for m, lay in zip(masks, layouts)]
    table = widetopo_ext.mask_stats(pieces)
    grouped = [j for j, (m, lay) in enumerate(zip(masks, layouts)) if _grouped(m, lay)]
    if grouped:
        rows = torch.tensor([_grouped_stats(masks[j], layouts[j].groups) for j in grouped], dtype=table.dtype)
        table[grouped] = rows.to(table.device)
    swap = torch.tensor([lay.transposed and not lay.elementwise and m.dim() >= 2 for m, lay in zip(masks, layouts)],
                        device=table.device)
    if bool(swap.any()):
        table = torch.where(swap[:, None], table[:, [0, 2, 1]], table)
    return table
