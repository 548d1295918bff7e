"""Sharded scores in the engine (`shard_scores=True` under torch.distributed).

Each prunable tensor j has one owner rank. A round then (1) reduces every score tensor to its
owner instead of all-reducing it to every rank, (2) lets each owner decay and protect its own
tensors, (3) selects the K highest over all ranks with widetopo.distributed.sharded.sharded_global_threshold
(histograms and counts cross the wire, never the scores) or, for per-layer quotas, per tensor at
the owner, and (4) broadcasts each tensor's bool mask from its owner. The masks are the ones an
unsharded run computes: every step is per tensor, and the sharded threshold has the same cut and
tie rule as global_threshold.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

__all__ = ["owners", "reduce_to_owners_", "broadcast_masks_"]


def owners(numels: Sequence[int], world: int) -> List[int]:
    """Owner rank of each tensor: largest first to the least loaded rank (ties to the lowest
    rank), so every rank holds about the same number of scores. Deterministic on every rank."""
    load = [0] * world
    out = [0] * len(numels)
    for j in sorted(range(len(numels)), key=lambda j: (-numels[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[j] = r
        load[r] += numels[j]
    return out


def reduce_to_owners_(tensors: List[torch.Tensor], owner: Sequence[int]) -> None:
    """Sum tensor j over the ranks into its owner's copy (the others keep partial sums)."""
    dist = torch.distributed
    handles = [dist.reduce(t, dst=o, op=dist.ReduceOp.SUM, async_op=True) for t, o in zip(tensors, owner)]
    for h in handles:
        h.wait()


def broadcast_masks_(masks: List[torch.Tensor], owner: Sequence[int]) -> None:
    """Every rank receives each owner's bool mask (sent as uint8: one byte per weight)."""
    dist = torch.distributed
    wire = [m.view(torch.uint8) for m in masks]
    handles = [dist.broadcast(w, src=o, async_op=True) for w, o in zip(wire, owner)]
    for h in handles:
        h.wait()
