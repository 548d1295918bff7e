"""The engine's private working state (the caller's model is never modified).

params:     detached copies of every parameter (the prunable ones hold theta * m);
buffers:    a copy of the model's buffers, cloned afresh for each round's scorer;
working:    the prunable entries of params, aligned with `names`;
theta_init: the prunable weights at the start, for theta <- theta_init * m after a restoration;
masks:      one bool mask per prunable tensor.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

import widetopo_ext
from widetopo.distributed import collectives as dist_utils
from widetopo.scores.base import ScoreContext

__all__ = ["PruneState"]


class PruneState:
    def __init__(self, model: nn.Module, names: List[str], device: torch.device, forward_fn=None, loss_fn=None):
        self.model = model
        self.forward_fn, self.loss_fn = forward_fn, loss_fn
        self.names = list(names)
        self.params = OrderedDict((n, p.detach().to(device, copy=True)) for n, p in model.named_parameters())
        self.buffers = OrderedDict((n, b.detach().to(device, copy=True)) for n, b in model.named_buffers())
        # every rank starts from rank 0's theta and buffers
        dist_utils.broadcast_(list(self.params.values()) + list(self.buffers.values()))
        self.working = [self.params[n] for n in self.names]
        self.theta_init = [p.clone() for p in self.working]
        self.masks = [torch.ones(p.shape, dtype=torch.bool, device=device) for p in self.working]
        self.n_prunable = sum(p.numel() for p in self.working)
        self.n_all = sum(p.numel() for p in self.params.values())

    @property
    def kept(self) -> int:
        return int(widetopo_ext.mask_stats(self.masks)[:, 0].sum())

    def set_masks(self, masks: List[torch.Tensor]) -> None:
        """Replace the masks (bool, same shapes) and apply them: theta <- theta * m."""
        with torch.no_grad():
            for dst, src in zip(self.masks, masks):
                dst.copy_(src)
        widetopo_ext.apply_masks_(self.working, self.masks)

    def reset_to_init(self) -> None:
        """theta <- theta_init * m (restored weights come back with their initial values)."""
        with torch.no_grad():
            torch._foreach_copy_(self.working, self.theta_init)
        widetopo_ext.apply_masks_(self.working, self.masks)

    def context(self, round_index: int, seed: int, kept: Optional[int] = None,
                twice_differentiable: bool = True) -> ScoreContext:
        """A scorer's view of this round: current weights, fresh buffer copies, the masks
        (kept: the current kept count, if the caller has it)."""
        kept = self.kept if kept is None else kept
        return ScoreContext(
            model=self.model,
            names=list(self.names),
            params=self.params,
            buffers=OrderedDict((n, b.clone()) for n, b in self.buffers.items()),
            masks=self.masks,
            round=round_index,
            seed=seed,
            density=kept / self.n_prunable,
            twice_differentiable=twice_differentiable,
            forward_fn=self.forward_fn,
            loss_fn=self.loss_fn,
        )

    def snapshot(self) -> Dict[str, list]:
        return {"masks": [m.cpu() for m in self.masks], "params": [p.cpu() for p in self.working]}

    def load(self, snap: Dict[str, list]) -> None:
        with torch.no_grad():
            for dst, src in zip(self.masks, snap["masks"]):
                dst.copy_(src)
            for dst, src in zip(self.working, snap["params"]):
                dst.copy_(src)
