"""Keeping pruned weights at zero in any trainer.

Two ways to keep pruned weights at zero while training:

* apply_masks(model, masks): torch.nn.utils.prune's reparametrization. Each masked parameter
  `weight` becomes `weight_orig` (parameter) and `weight_mask` (buffer); a forward pre-hook
  recomputes weight = weight_orig * weight_mask before every forward. Works with any trainer and
  with torch.nn.utils.prune.remove / is_pruned; remove_masks(model) bakes the masks in.
* MaskEnforcer(model, masks, optimizer): plain parameters stay plain. After every optimizer step
  one fused call of widetopo_ext.apply_masks_ sets the pruned weights *and* their optimizer
  state (momentum buffers, Adam moments, ...) to zero, so momentum and weight decay can never
  revive a pruned weight. Optionally the pruned gradients are zeroed before the step as well.
"""
from __future__ import annotations

import logging
from typing import Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import prune

import widetopo_ext
from widetopo.sparsity.selection import parameter_owners

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# validation

def _resolve(model: nn.Module, masks, *, allow_pruned: bool = False) -> List[Tuple[str, nn.Module, str, torch.Tensor]]:
    """(full name, owning module, attribute name, mask) for every mask, after checking them all.

    Errors list every problem at once: a name that is not a parameter of the model, a mask that
    is not a bool tensor, a shape that differs from the parameter's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping name -> bool tensor (e.g. widetopo.Masks), got {type(masks).__name__}")
    params = dict(model.named_parameters())
    out, problems = [], []
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            what = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            problems.append(f"masks[{name!r}] must be a torch.bool tensor, got {what}")
            continue
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            owner = None
        param = params.get(name)
        if param is None:
            if owner is not None and prune.is_pruned(owner) and hasattr(owner, attr + "_orig"):
                if allow_pruned:
                    param = getattr(owner, attr + "_orig")
                else:
                    problems.append(f"{name!r} is already masked (torch.nn.utils.prune form); call remove_masks(model) first")
                    continue
            else:
                problems.append(f"{name!r} is not a parameter of the model")
                continue
        if tuple(mask.shape) != tuple(param.shape):
            problems.append(f"masks[{name!r}] has shape {list(mask.shape)}, the parameter has {list(param.shape)}")
            continue
        out.append((name, owner, attr, mask))
    if problems:
        raise ValueError(f"masks do not fit {type(model).__name__}:\n  " + "\n  ".join(problems))
    return out


# ---------------------------------------------------------------------------------------------
# torch.nn.utils.prune convention

def apply_masks(model: nn.Module, masks) -> nn.Module:
    """Mask `model`'s parameters in torch.nn.utils.prune's convention; returns `model`.

    For every name "a.b.weight" in `masks`: module a.b gets parameter `weight_orig` (the current
    values), buffer `weight_mask` (the mask in the parameter's dtype) and a forward pre-hook
    (torch.nn.utils.prune.CustomFromMask) that sets weight = weight_orig * weight_mask. The
    masks are all checked before the model is touched. A tied parameter (one tensor held by
    several modules, e.g. an embedding and an output head) is masked at every module that holds
    it, with one shared `_orig` parameter and one shared mask buffer, so the tie survives (also
    through remove_masks).
    """
    resolved = _resolve(model, masks)
    owners = parameter_owners(model)
    for name, owner, attr, mask in resolved:
        uses = [(m, local) for _, m, local in owners.get(name, [])] or [(owner, attr)]
        first, first_attr = uses[0]
        prune.custom_from_mask(first, first_attr, mask.to(getattr(first, first_attr).device))
        shared = first._buffers[first_attr + "_mask"]
        for module, local in uses[1:]:
            # a tied weight: the same `_orig` parameter and the same mask buffer at every use
            prune.custom_from_mask(module, local, mask.to(shared.device))
            module._buffers[local + "_mask"] = shared
    logger.debug("applied %d masks in torch.nn.utils.prune form", len(resolved))
    return model


def remove_masks(model: nn.Module, names: Optional[Iterable[str]] = None) -> nn.Module:
    """Make masked parameters permanent (torch.nn.utils.prune.remove): `weight` becomes a plain
    parameter holding weight_orig * weight_mask. `names` restricts this to some parameters
    (default: every pruning reparametrization in the model); a tied parameter is unmasked at
    all its modules together. Returns `model`."""
    pruned = {}
    for mod_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                full = f"{mod_name}.{hook._tensor_name}" if mod_name else hook._tensor_name
                pruned[full] = (module, hook._tensor_name)
    if names is None:
        targets = list(pruned)
    else:
        targets = list(names)
        unknown = [n for n in targets if n not in pruned]
        if unknown:
            raise ValueError(f"remove_masks: not masked in this model: {unknown}; masked: {sorted(pruned)}")
        # a tied parameter is removed at every module that holds its `_orig`, keeping the tie
        orig = {full: id(module._parameters.get(attr + "_orig")) for full, (module, attr) in pruned.items()}
        chosen = {orig[n] for n in targets}
        targets = [full for full in pruned if orig[full] in chosen]
    for full in targets:
        module, attr = pruned[full]
        prune.remove(module, attr)
    return model


# ---------------------------------------------------------------------------------------------
# plain-parameter mode

class MaskEnforcer:
    """Keep pruned weights of plain parameters exactly zero through training.

        enforcer = MaskEnforcer(model, masks, optimizer)   # zeroes pruned weights now
        ... normal training loop: loss.backward(); optimizer.step() ...
        enforcer.remove()                                   # detach the hooks

    After every `optimizer.step()` (a step post-hook) one fused widetopo_ext.apply_masks_ call
    sets w <- m ? w : 0 on the weights and on every optimizer-state tensor shaped like them
    (SGD momentum_buffer, Adam exp_avg / exp_avg_sq / max_exp_avg_sq, RMSprop square_avg, ...).
    With mask_grads=True, a step pre-hook also zeroes the pruned gradients before the update
    (widetopo_ext.apply_masks_to_grads_), so gradient statistics of pruned weights stay zero.
    Without an optimizer, call `enforcer.apply()` after each update yourself.
    """

    def __init__(self, model: nn.Module, masks, optimizer: Optional[torch.optim.Optimizer] = None, mask_grads: bool = False):
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        resolved = _resolve(model, masks)
        params = dict(model.named_parameters())
        self.names = [name for name, _, _, _ in resolved]
        self.params = [params[n] for n in self.names]
        self.masks = [m.to(p.device) for (_, _, _, m), p in zip(resolved, self.params)]
        self.optimizer = optimizer
        self.mask_grads = bool(mask_grads)
        self._handles = []
        if optimizer is not None:
            known = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [n for n, p in zip(self.names, self.params) if id(p) not in known]
            if missing:
                logger.warning("masked parameters not handled by the optimizer: %s", missing)
            self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply()))
            if self.mask_grads:
                self._handles.append(optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.apply_to_grads()))
        self.apply()

    def _state_tensors(self):
        tensors, masks = [], []
        if self.optimizer is None:
            return tensors, masks
        state = self.optimizer.state
        for p, m in zip(self.params, self.masks):
            st = state.get(p)
            if not st:
                continue
            for value in st.values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.device == p.device and not value.is_complex():
                    tensors.append(value)
                    masks.append(m)
        return tensors, masks

    def apply(self) -> None:
        """Zero pruned weights and their optimizer state (one fused apply_masks_ call)."""
        tensors, masks = self._state_tensors()
        with torch.no_grad():
            widetopo_ext.apply_masks_(self.params + tensors, self.masks + masks)

    def apply_to_grads(self) -> None:
        """Zero the gradients of pruned weights (parameters without .grad are skipped)."""
        widetopo_ext.apply_masks_to_grads_(self.params, self.masks)

    def remove(self) -> None:
        """Detach the optimizer hooks; the parameters keep their current values."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

