"""torch.distributed helpers of the engine (DESIGN 2.4).

Each rank scores the batches whose global index i satisfies i % world == rank; the per-rank
score sums are added with all_reduce, so every rank thresholds identical scores and derives
identical masks. The engine also broadcasts rank 0's parameters and buffers into its private
copies, so all ranks start from the same theta even if their models were initialised
differently. Without an initialised process group everything is a no-op (rank 0 of 1).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, TypeVar

import torch

T = TypeVar("T")


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world() -> Tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialised."""
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shard(batches: Sequence[T], rank: int, world: int) -> List[T]:
    """This rank's share: the batches whose `.index` % world == rank."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) with world >= 1, got rank={rank}, world={world}")
    return [b for b in batches if b.index % world == rank]


def all_reduce_sum_(tensors: List[torch.Tensor]) -> None:
    """Sum every tensor across ranks in place (async launches, then wait for all)."""
    if not is_distributed():
        return
    handles = [torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, async_op=True) for t in tensors]
    for h in handles:
        h.wait()


def broadcast_(tensors: List[torch.Tensor], src: int = 0) -> None:
    """Make every rank hold rank `src`'s values (the engine's private parameter copies)."""
    if not is_distributed():
        return
    handles = [torch.distributed.broadcast(t, src=src, async_op=True) for t in tensors]
    for h in handles:
        h.wait()
