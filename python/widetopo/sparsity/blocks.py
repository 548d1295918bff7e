"""Projections and attention heads inside one weight tensor, so that their collapse is visible.

A fused attention projection holds q, k and v in one tensor: nn.MultiheadAttention's
`in_proj_weight` (3E, E), a `qkv` Linear (3E, E) (the zoo's vit, timm), GPT-2's `c_attn`
Conv1D (E, 3E), stored (in, out). A method can keep no weight of q and k while v keeps many;
the tensor then keeps weights and no layer-level statistic notices, although every attention
score is a constant and the softmax is uniform. Each head of a projection is a further block.

SPLIT_RULES is the one table of how a tensor splits: for a parameter, its owning module and
that module's parent, a rule returns the projections (labels "q", "k", "v"), the dim of the
stored tensor they split along (equal blocks) and the module holding the head count. Heads
split each projection into equal blocks along the same dim; the head count is read from module
attributes (`num_heads` of nn.MultiheadAttention and GPT-2, `num_attention_heads` of HF
BERT/ViT, `heads` of the zoo's vit, or `config.num_attention_heads`) and ignored when it does
not divide the projection. Rules match by class and attribute names, so transformers stays
optional. A block *collapses* when it keeps no weight: its outputs are constant (0 + bias).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from widetopo.sparsity.selection import _base, is_in_out_layer, parameter_owners

__all__ = ["Block", "BlockStats", "SplitRule", "SPLIT_RULES", "fused_blocks", "model_blocks",
           "block_stats", "collapsed_parts", "HEAD_ATTRIBUTES"]

#: module attributes holding an attention head count, in the order they are looked up
HEAD_ATTRIBUTES: Tuple[str, ...] = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")


@dataclass(frozen=True)
class Block:
    """Entries start:stop along `dim` of the stored tensor: projection `label` (head None) or
    head `head` of that projection."""

    label: str
    dim: int
    start: int
    stop: int
    head: Optional[int] = None

    @property
    def title(self) -> str:
        return self.label if self.head is None else f"{self.label} head {self.head}"

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return t.narrow(self.dim, self.start, self.stop - self.start)

    def to_list(self) -> list:
        return [self.label, self.dim, self.start, self.stop, self.head]

    @classmethod
    def from_list(cls, value) -> "Block":
        label, dim, start, stop, head = value
        return cls(str(label), int(dim), int(start), int(stop), None if head is None else int(head))


@dataclass(frozen=True)
class BlockStats:
    """Kept weights of one block (LayerStats.blocks, the report's per-layer "blocks")."""

    label: str
    head: Optional[int]
    dim: int
    start: int
    stop: int
    kept: int
    numel: int

    @property
    def collapsed(self) -> bool:
        return self.numel > 0 and self.kept == 0


@dataclass(frozen=True)
class Split:
    parts: Tuple[str, ...]
    dim: int
    heads_from: Optional[nn.Module]


@dataclass(frozen=True)
class SplitRule:
    """`match(module, local, child_name, parent)` -> Split or None; `about` says what it matches."""

    about: str
    match: Callable[[nn.Module, str, str, Optional[nn.Module]], Optional[Split]]


_QKV = ("q", "k", "v")
_ROLES = {"query": "q", "q_proj": "q", "q": "q", "key": "k", "k_proj": "k", "k": "k",
          "value": "v", "v_proj": "v", "v": "v"}


def _mha(module, local, child, parent):
    if not isinstance(module, nn.MultiheadAttention):
        return None
    base = _base(local)
    if base == "in_proj_weight":
        return Split(_QKV, 0, module)
    if base in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        return Split((base[0],), 0, module)
    return None


def _qkv_linear(module, local, child, parent):
    if isinstance(module, nn.Linear) and _base(local) == "weight" and child == "qkv" and module.out_features % 3 == 0:
        return Split(_QKV, 0, parent)
    return None


def _c_attn(module, local, child, parent):
    if not (is_in_out_layer(module) and _base(local) == "weight"):
        return None
    if child == "c_attn":
        cross = bool(getattr(parent, "is_cross_attention", False))
        return Split(("k", "v") if cross else _QKV, 1, parent)
    if child == "q_attn":
        return Split(("q",), 1, parent)
    return None


def _separate_linear(module, local, child, parent):
    if isinstance(module, nn.Linear) and _base(local) == "weight" and child in _ROLES and _head_count(parent):
        return Split((_ROLES[child],), 0, parent)
    return None


#: How a tensor splits into projections (first matching rule wins).
SPLIT_RULES: Tuple[SplitRule, ...] = (
    SplitRule("nn.MultiheadAttention in_proj_weight (3E, E): q, k, v along dim 0; q/k/v_proj_weight: "
              "one projection", _mha),
    SplitRule("a Linear named qkv (the zoo's vit, timm) (3E, E): q, k, v along dim 0", _qkv_linear),
    SplitRule("an (in, out) layer named c_attn (GPT-2's Conv1D, (E, 3E)): q, k, v along dim 1 (k, v in "
              "cross-attention); q_attn: q", _c_attn),
    SplitRule("a Linear named query/key/value or q_proj/k_proj/v_proj (HF BERT, ViT) in a module with a "
              "head count: one projection along dim 0", _separate_linear),
)


def _head_count(module: Optional[nn.Module]) -> Optional[int]:
    if module is None:
        return None
    for attr in HEAD_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    value = getattr(getattr(module, "config", None), "num_attention_heads", None)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _blocks_of(split: Split, size: int) -> List[Block]:
    n = len(split.parts)
    if size % n:
        return []
    width = size // n
    heads = _head_count(split.heads_from)
    out = []
    for j, label in enumerate(split.parts):
        out.append(Block(label, split.dim, j * width, (j + 1) * width))
        if heads and heads > 1 and width % heads == 0:
            h = width // heads
            out += [Block(label, split.dim, j * width + i * h, j * width + (i + 1) * h, i) for i in range(heads)]
    return out


def _split(name: str, params, owners, modules) -> List[Block]:
    uses = owners.get(name)
    if name not in params or not uses or params[name].dim() < 2:
        return []
    prefix, module, local = uses[0]
    parent_name, _, child = prefix.rpartition(".")
    parent = modules.get(parent_name) if prefix else None
    for rule in SPLIT_RULES:
        split = rule.match(module, local, child, parent)
        if split is not None:
            return _blocks_of(split, int(params[name].shape[split.dim]))
    return []


def fused_blocks(model: nn.Module, name: str) -> List[Block]:
    """The projections (head None) and heads of parameter `name` of `model`, by SPLIT_RULES;
    [] for a tensor that is no attention projection."""
    return _split(name, dict(model.named_parameters()), parameter_owners(model), dict(model.named_modules()))


def model_blocks(model: nn.Module, names: Sequence[str]) -> Dict[str, List[Block]]:
    """name -> its blocks, for the names that have any."""
    params, owners, modules = dict(model.named_parameters()), parameter_owners(model), dict(model.named_modules())
    out = {}
    for name in names:
        blocks = _split(name, params, owners, modules)
        if blocks:
            out[name] = blocks
    return out


def block_stats(mask: torch.Tensor, blocks: Sequence[Block]) -> List[BlockStats]:
    """Kept weights of each block of one bool mask."""
    out = []
    for b in blocks:
        part = b.view(mask)
        out.append(BlockStats(b.label, b.head, b.dim, b.start, b.stop, int(part.sum()), part.numel()))
    return out


def collapsed_parts(masks: Mapping[str, torch.Tensor], model: Optional[nn.Module] = None,
                    blocks: Optional[Mapping[str, Sequence[Block]]] = None) -> List[str]:
    """Every tensor, projection and head left with no kept weight, most general first: a
    tensor `name`; else a projection `name[q]`; else a head `name[k head 2]`. Blocks come from
    `model` (SPLIT_RULES), else `blocks`, else what the masks carry (Masks.blocks)."""
    if model is not None:
        blocks = model_blocks(model, list(masks.keys()))
    elif blocks is None:
        blocks = getattr(masks, "blocks", None) or {}
    out = []
    for name in masks.keys():
        m = masks[name]
        if m.numel() and not bool(m.any()):
            out.append(name)
            continue
        dead = set()
        for s in block_stats(m, blocks.get(name, ())):
            if s.collapsed and (s.head is None or s.label not in dead):
                if s.head is None:
                    dead.add(s.label)
                out.append(f"{name}[{s.label if s.head is None else f'{s.label} head {s.head}'}]")
    return out
