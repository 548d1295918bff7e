"""torch.distributed helpers of the engine (docs/design.md §2.4).

Each rank scores its batches of the pruning set (its own part with per-rank data; with
replicated data, the batches whose global index i satisfies i % world == rank:
widetopo.distributed.data_split); the per-rank score sums are added with all_reduce, so every
rank thresholds identical scores and derives identical masks. The engine also broadcasts rank 0's parameters and buffers into its private
copies, so all ranks start from the same theta even if their models were initialised
differently. Without an initialised process group everything is a no-op (rank 0 of 1).

A rank that fails (bad data, a scorer error) must not leave the others waiting in the next
collective until the process-group timeout: `fail_together` blocks agree on success first.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, Sequence, Tuple, TypeVar

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


def all_gather_bytes(payload: bytes, device: torch.device) -> List[bytes]:
    """Every rank's `payload`, in rank order (two all_gathers: the lengths, then the bytes
    padded to the longest). Tensors live on `device`, so it works with gloo and NCCL alike.
    Without a process group: [payload]."""
    if not is_distributed():
        return [payload]
    _, world = rank_world()
    n = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(lengths, n)
    sizes = [int(t) for t in lengths]
    mine = torch.zeros(max(sizes), dtype=torch.uint8)
    mine[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else mine[:0]
    mine = mine.to(device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(parts, mine)
    return [bytes(p[:size].cpu().numpy().tobytes()) for p, size in zip(parts, sizes)]


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


def collective_device(model=None) -> torch.device:
    """Where a small control tensor (an error flag) lives for the process group's backend: the
    CPU, or under NCCL the CUDA device of `model`'s first CUDA parameter (a rank that put its
    model on cuda:rank without torch.cuda.set_device), else the current CUDA device. Reads no
    option of the call, so a check of possibly bad arguments (an invalid `device=`) can still
    run its collective."""
    if not (is_distributed() and torch.distributed.get_backend() == "nccl"):
        return torch.device("cpu")
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.device.type == "cuda":
                return p.device
    return torch.device("cuda", torch.cuda.current_device())


_depth = threading.local()  # .n = 1 while this thread runs the block of a fail_together


@contextlib.contextmanager
def fail_together(device: torch.device, what: str) -> Iterator[None]:
    """Collective error check around a block that every rank runs (no collectives inside).

    After the block the ranks all-reduce one flag per rank; if the block raised on some rank,
    every rank raises: that rank its own exception, the others a RuntimeError naming the failed
    ranks. Costs one all_reduce of `world` ints. Without a process group it does nothing.

    Nested blocks are no-ops: only the outermost one checks. An inner block's all_reduce would
    otherwise pair with the outer one's on a rank that failed before reaching the inner block
    (the argument checks of widetopo.prune wrap those of Pruner.__init__).
    """
    if not is_distributed() or getattr(_depth, "n", 0):
        yield
        return
    rank, world = rank_world()
    error = None
    _depth.n = 1
    try:
        yield
    except Exception as exc:  # re-raised below, once every rank knows
        error = exc
    finally:
        _depth.n = 0
    flags = torch.zeros(world, dtype=torch.int32, device=device)
    flags[rank] = int(error is not None)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.SUM)
    if error is not None:
        raise error
    failed = flags.nonzero().flatten().tolist()
    if failed:
        raise RuntimeError(
            f"{what} failed on rank(s) {', '.join(map(str, failed))} (see the error there); "
            f"rank {rank} stops too"
        )
