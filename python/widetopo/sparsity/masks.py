"""The result of a pruning run: bool masks keyed by parameter name, with metadata."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import widetopo_ext


@dataclass(frozen=True)
class LayerStats:
    """Per-tensor statistics. Units: rank >= 2 -> output and input units as the tensor's unit
    layout reads them (widetopo.sparsity.topology: dim 0 / dim 1 of a Linear or Conv; swapped for
    transposed convs, embeddings and (in, out) layers such as GPT-2's Conv1D); rank 1 -> each
    entry is its own unit. active_* = units with at least one kept weight.
    With a model (Masks.stats(model)): effective = kept weights on an input -> output path of
    kept weights; effective_nodes = output units of a Conv/Linear layer on such a path
    (widetopo.sparsity.effective, docs/design.md §6); None otherwise. blocks: the kept weights
    of each projection / attention head inside the tensor (widetopo.sparsity.blocks.BlockStats;
    None when unknown or the tensor is no attention projection); collapsed: the parts left with
    no kept weight (the tensor's name, or "q", "k head 1", ...)."""

    name: str
    shape: Tuple[int, ...]
    numel: int
    kept: int
    density: float
    out_units: int
    in_units: int
    active_out: int
    active_in: int
    effective: Optional[int] = None
    effective_nodes: Optional[int] = None
    blocks: Optional[Tuple] = None
    collapsed: Tuple[str, ...] = ()


class Masks(Mapping):
    """Mapping name -> bool tensor (True = kept), plus `.meta` (method, preset, target
    density, seed, count mode, rounds, package version, ...), `.layouts` (the unit topology
    of each tensor, widetopo.sparsity.topology.UnitLayout, when known: the engine sets it; stats(model)
    reads it from the model) and `.blocks` (name -> the projections and heads inside a fused
    attention tensor, widetopo.sparsity.blocks, when known)."""

    def __init__(self, masks: Mapping, meta: Optional[dict] = None, layouts: Optional[Sequence] = None,
                 blocks: Optional[Mapping] = None):
        items: Dict[str, torch.Tensor] = {}
        for name, m in masks.items():
            if not isinstance(name, str):
                raise TypeError(f"mask names must be strings, got {name!r}")
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise TypeError(f"mask {name!r} must be a torch.bool tensor, got {getattr(m, 'dtype', type(m))}")
            items[name] = m
        self._masks = items
        self.meta: dict = dict(meta or {})
        if layouts is not None and len(layouts) != len(items):
            raise ValueError(f"layouts must have one entry per mask: {len(layouts)} vs {len(items)}")
        self.layouts = None if layouts is None else list(layouts)
        self.blocks = None if blocks is None else {n: list(b) for n, b in blocks.items() if n in items}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return f"Masks({len(self)} tensors, density={self.density:.6g}, method={self.meta.get('method')!r})"

    @property
    def numel(self) -> int:
        return sum(m.numel() for m in self._masks.values())

    @property
    def kept(self) -> int:
        if not self._masks:
            return 0
        return int(widetopo_ext.mask_stats(list(self._masks.values()))[:, 0].sum())

    @property
    def density(self) -> float:
        """Fraction of masked (prunable) entries kept."""
        n = self.numel
        return self.kept / n if n else 1.0

    def stats(self, model: Optional[nn.Module] = None, input_shape: Optional[Tuple[int, ...]] = None, *,
              inputs=None, forward_fn=None) -> List[LayerStats]:
        """Per-layer kept counts and active units (one widetopo_ext.mask_stats call).

        With `model` (the network the masks are for), also the effective weights and effective
        nodes of every layer (widetopo.sparsity.effective.effective_sparsity, one float64 forward and
        backward pass on a copy). input_shape is one sample's shape, e.g. (3, 32, 32); by
        default it comes from the metadata (in_channels, image_size) that `widetopo prune`
        records. A token model takes `inputs` instead (an example batch: token ids or a dict such
        as {input_ids, attention_mask}) and, for a custom forward, `forward_fn(model, inputs)`.
        For the totals and the node ratio use effective_sparsity directly.
        """
        names = list(self._masks)
        if not names:
            return []
        effective = None
        if model is not None:
            from widetopo.sparsity.effective import effective_sparsity, input_shape_from_meta

            if inputs is not None:
                effective = effective_sparsity(model, self._masks, inputs=inputs, forward_fn=forward_fn)["layers"]
            else:
                shape = input_shape if input_shape is not None else input_shape_from_meta(self.meta)
                if shape is None:
                    raise ValueError("Masks.stats(model): pass input_shape (one sample's shape, e.g. (3, 32, 32)) "
                                     "or inputs (an example batch, e.g. token ids); the metadata has no "
                                     "in_channels/image_size")
                effective = effective_sparsity(model, self._masks, tuple(shape), forward_fn=forward_fn)["layers"]
        from widetopo.sparsity import topology

        from widetopo.sparsity import blocks as fused

        layouts = topology.unit_layouts(model, names) if model is not None else self.layouts
        layouts = layouts or [topology.DENSE] * len(names)
        split = fused.model_blocks(model, names) if model is not None else (self.blocks or {})
        table = topology.mask_stats([self._masks[n] for n in names], layouts).tolist()
        out = []
        for name, layout, (kept, act_out, act_in) in zip(names, layouts, table):
            m = self._masks[name]
            numel = m.numel()
            out_units, in_units = topology.unit_counts(tuple(m.shape), layout)
            parts = fused.block_stats(m, split[name]) if name in split else None
            if numel and kept == 0:
                collapsed = (name,)
            else:
                collapsed = tuple(p[len(name) + 1:-1] for p in fused.collapsed_parts({name: m}, blocks=split))
            out.append(
                LayerStats(
                    name=name,
                    shape=tuple(m.shape),
                    numel=numel,
                    kept=int(kept),
                    density=kept / numel if numel else 1.0,
                    out_units=int(out_units),
                    in_units=int(in_units),
                    active_out=int(act_out),
                    active_in=int(act_in),
                    effective=effective[name]["effective"] if effective is not None else None,
                    effective_nodes=effective[name]["effective_nodes"] if effective is not None else None,
                    blocks=tuple(parts) if parts is not None else None,
                    collapsed=collapsed,
                )
            )
        return out

    def rename(self, mapping: Union[Mapping[str, str], Callable[[str], str], None] = None, *,
               strip_prefix: Optional[str] = None, add_prefix: Optional[str] = None) -> "Masks":
        """A new Masks with the same masks, meta and layouts under new names, e.g. masks computed
        on a wrapper (`model.encoder.0.weight`) re-keyed onto the bare model with
        `strip_prefix="model."`, or back with `add_prefix="model."`. `mapping` (a dict old ->
        new, names it omits unchanged, or a callable old -> new) is applied first, then
        strip_prefix (every name must start with it), then add_prefix. Two masks ending under
        one name, an empty name, or a non-string are refused before anything is built."""
        if mapping is not None and not (isinstance(mapping, Mapping) or callable(mapping)):
            raise TypeError(f"rename: mapping must be a dict old name -> new name or a callable, got "
                            f"{type(mapping).__name__}")
        for arg, value in (("strip_prefix", strip_prefix), ("add_prefix", add_prefix)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"rename: {arg} must be a non-empty string, got {value!r}")
        if mapping is None and strip_prefix is None and add_prefix is None:
            raise ValueError("rename: pass mapping, strip_prefix or add_prefix")
        if isinstance(mapping, Mapping):
            unknown = sorted(set(mapping) - set(self._masks))
            if unknown:
                raise ValueError(f"rename: mapping names {unknown}, which are not masks of these Masks; "
                                 f"masks: {list(self._masks)[:8]}{' ...' if len(self) > 8 else ''}")
        new_names = []
        for name in self._masks:
            new = name
            if mapping is not None:
                new = mapping.get(name, name) if isinstance(mapping, Mapping) else mapping(name)
                if not isinstance(new, str) or not new:
                    raise ValueError(f"rename: mapping gave {new!r} for {name!r}; names must be non-empty strings")
            new_names.append(new)
        if strip_prefix is not None:
            outside = [n for n in new_names if not n.startswith(strip_prefix) or n == strip_prefix]
            if outside:
                raise ValueError(f"rename: strip_prefix {strip_prefix!r}: {len(outside)} name(s) do not start "
                                 f"with it: {outside[:5]}{' ...' if len(outside) > 5 else ''}")
            new_names = [n[len(strip_prefix):] for n in new_names]
        if add_prefix is not None:
            new_names = [add_prefix + n for n in new_names]
        seen: Dict[str, str] = {}
        clashes = []
        for old, new in zip(self._masks, new_names):
            if new in seen:
                clashes.append(f"{seen[new]!r} and {old!r} -> {new!r}")
            seen[new] = old
        if clashes:
            raise ValueError(f"rename: several masks would share a name: {'; '.join(clashes)}")
        renamed = dict(zip(self._masks, new_names))
        blocks = None if self.blocks is None else {renamed[n]: b for n, b in self.blocks.items()}
        return Masks(dict(zip(new_names, self._masks.values())), self.meta, self.layouts, blocks)

    def _targets(self, model: nn.Module) -> List[torch.Tensor]:
        params = dict(model.named_parameters())
        missing = [n for n in self._masks if n not in params]
        wrong = [
            f"{n}: mask {tuple(m.shape)} vs parameter {tuple(params[n].shape)}"
            for n, m in self._masks.items()
            if n in params and params[n].shape != m.shape
        ]
        if missing or wrong:
            raise ValueError(
                "masks do not fit the model: "
                + (f"missing parameters {missing}" if missing else "")
                + ("; " if missing and wrong else "")
                + (f"shape mismatch {wrong}" if wrong else "")
            )
        return [params[n] for n in self._masks]

    def apply_(self, model: nn.Module) -> nn.Module:
        """Zero the pruned weights of `model` in place (widetopo_ext.apply_masks_); returns it."""
        targets = self._targets(model)
        masks = [m.to(t.device) for m, t in zip(self._masks.values(), targets)]
        widetopo_ext.apply_masks_(targets, masks)
        return model

    def to(self, device) -> "Masks":
        return Masks({n: m.to(device) for n, m in self._masks.items()}, self.meta, self.layouts, self.blocks)

    def save(self, path, meta: Optional[dict] = None) -> None:
        """Write a mask file (format: widetopo.sparsity.maskfile); `meta` adds to / overrides
        the masks' own metadata in the file (self.meta is left as it is)."""
        from widetopo.sparsity.maskfile import save_masks

        save_masks(self, path, meta=meta)

    @classmethod
    def load(cls, path, model: Optional[nn.Module] = None) -> "Masks":
        """Read a mask file; with `model`, check it fits that model (widetopo.sparsity.maskfile)."""
        from widetopo.sparsity.maskfile import load_masks

        loaded = load_masks(path, model=model)
        if not isinstance(loaded, Masks):
            if isinstance(loaded, tuple) and len(loaded) == 2:
                loaded = cls(loaded[0], loaded[1])
            else:
                loaded = cls(loaded, getattr(loaded, "meta", None))
        if model is not None:  # the unit topology comes from the model (files do not store it)
            from widetopo.sparsity.blocks import model_blocks
            from widetopo.sparsity.topology import unit_layouts

            loaded.layouts = unit_layouts(model, list(loaded))
            loaded.blocks = model_blocks(model, list(loaded))
        return loaded
