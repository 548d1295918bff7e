"""Reading the pruning set: any iterable of input tensors or (input, target[, ...]) batches
becomes a list of Batch objects, checked once before the first round.

The batches are kept on `store` (the pruning device by default, or the CPU, pinned when the
pruning device is a GPU, to prune with sets larger than device memory: each scorer moves one
batch at a time with `batch.x.to(ctx.device)`).
"""
from __future__ import annotations

import hashlib
from typing import Iterable, List, Optional

import torch

from widetopo.scores.base import Batch

__all__ = ["materialize_batches", "data_digest"]


def _split(index: int, item):
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) >= 1 and isinstance(item[0], torch.Tensor):
        y = item[1] if len(item) >= 2 else None
        if y is not None and not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        return item[0], y
    raise TypeError(
        f"data: batch {index} is a {type(item).__name__}; each batch must be an input tensor or an "
        "(input, target) pair"
    )


def _check_batch(index: int, x: torch.Tensor, y: Optional[torch.Tensor], first: Optional[Batch]) -> None:
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"data: batch {index} has no samples (input shape {tuple(x.shape)})")
    if y is not None and y.dim() > 0 and y.shape[0] != x.shape[0]:
        raise ValueError(
            f"data: batch {index} has {x.shape[0]} inputs but {y.shape[0]} targets (shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)})"
        )
    if first is None:
        return
    if x.shape[1:] != first.x.shape[1:] or x.dtype != first.x.dtype:
        raise ValueError(
            f"data: batch {index} has samples of shape {tuple(x.shape[1:])} ({x.dtype}), but batch "
            f"{first.index} has {tuple(first.x.shape[1:])} ({first.x.dtype}); every batch must hold samples of one shape"
        )
    if (y is None) != (first.y is None) or (y is not None and y.shape[1:] != first.y.shape[1:]):
        raise ValueError(
            f"data: batch {index} has targets {None if y is None else tuple(y.shape)}, batch {first.index} "
            f"{None if first.y is None else tuple(first.y.shape)}; every batch must have targets of one shape, or none"
        )


def _place(t: Optional[torch.Tensor], store: torch.device, pin: bool) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = t.to(store)
    return t.pin_memory() if pin and store.type == "cpu" and not t.is_pinned() else t


def materialize_batches(data: Iterable, store: torch.device, max_samples: Optional[int] = None,
                        pin: bool = False, allow_empty: bool = False) -> List[Batch]:
    """Batch objects on `store`, indexed 0, 1, ... in iteration order (the index seeds the
    batch's randomness; with per-rank data under torch.distributed the engine shifts it to the
    batch's place in the union, widetopo.distributed.data_split).

    max_samples: read batches only until this many samples are collected (the last batch is
    cut to fit, and the iterator is not advanced further), so a full training DataLoader can be
    passed; None reads everything. pin: pin CPU batches (for asynchronous copies to a GPU).
    allow_empty: return [] for empty data (one rank's part of a per-rank set may be empty; the
    engine checks the union)."""
    if isinstance(data, torch.Tensor):
        raise TypeError("data must be an iterable of batches (e.g. a DataLoader or a list of tensors), not one tensor")
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(f"data must be an iterable of batches, got {type(data).__name__}") from None
    batches: List[Batch] = []
    taken = 0
    for index, item in enumerate(iterator):
        x, y = _split(index, item)
        _check_batch(index, x, y, batches[0] if batches else None)
        if max_samples is not None and taken + x.shape[0] > max_samples:
            cut = max_samples - taken
            x = x[:cut]
            y = y[:cut] if y is not None and y.dim() > 0 else y
        batches.append(Batch(index, _place(x, store, pin), _place(y, store, pin)))
        taken += x.shape[0]
        if max_samples is not None and taken >= max_samples:
            break
    if not batches and not allow_empty:
        raise ValueError("data is empty: the pruning set must contain at least one batch")
    return batches


def _hash_tensor(h, label: str, t: torch.Tensor) -> None:
    h.update(f"{label}:{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def model_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer of `model` (names, dtypes, shapes and bytes), so a
    checkpoint is resumed only for a model equal to the one it was written for in every value."""
    h = hashlib.blake2b(digest_size=16)
    for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, t in items:
            if t is not None:
                _hash_tensor(h, f"{kind}:{name}", t)
    return h.hexdigest()


def data_digest(batches: List[Batch]) -> str:
    """A hash of the pruning set's contents (inputs and targets, in order), so a checkpoint
    is never resumed with different data of the same shapes."""
    h = hashlib.blake2b(digest_size=16)
    for b in batches:
        for t in (b.x, b.y):
            if t is None:
                h.update(b"-")
                continue
            _hash_tensor(h, str(b.index), t)
    return h.hexdigest()
