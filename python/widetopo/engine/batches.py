"""Reading the pruning set: any iterable of input tensors, (input, target[, ...]) batches or dict
batches (Mapping: fed to the model as keyword arguments, the Hugging Face way; the targets under
"labels", "targets", "target" or "y" are taken out, every other entry - attention_mask included -
is passed through unchanged) becomes a list of Batch objects, checked once before the first round.

The batches are kept on `store` (the pruning device by default, or the CPU, pinned when the
pruning device is a GPU, to prune with sets larger than device memory: each scorer moves one
batch at a time with `ctx.inputs(batch)`).
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Iterable, List, Optional

import torch

from widetopo.constants import MODEL_LABELS_KEY, TARGET_KEYS
from widetopo.scores.base import Batch
from widetopo.scores.inputs import Inputs, head, num_samples, sample_shape

__all__ = ["materialize_batches", "data_digest"]


def _target(index: int, y) -> Optional[torch.Tensor]:
    if y is not None and not isinstance(y, torch.Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"data: the targets of batch {index} are a {type(y).__name__}, not a tensor") from None
    return y


def _split(index: int, item):
    """(inputs, targets or None, label key or None) of one batch."""
    if isinstance(item, torch.Tensor):
        return item, None, None
    if isinstance(item, Mapping):
        keys = [k for k in TARGET_KEYS if k in item]
        if len(keys) > 1:
            raise ValueError(f"data: batch {index} holds targets under several keys {keys}; use one of {list(TARGET_KEYS)}")
        x = Inputs((k, v) for k, v in item.items() if k not in keys)
        if not any(isinstance(v, torch.Tensor) for v in x.values()):
            raise TypeError(f"data: dict batch {index} holds no input tensor (keys {sorted(map(str, item))})")
        y = _target(index, item[keys[0]]) if keys else None
        return x, y, (MODEL_LABELS_KEY if keys and keys[0] == MODEL_LABELS_KEY else None)
    if isinstance(item, (tuple, list)) and len(item) >= 1 and isinstance(item[0], Mapping):
        x, inner, label_key = _split(index, item[0])  # (dict of keyword inputs, target)
        if len(item) >= 2 and inner is not None:
            raise ValueError(f"data: batch {index} holds targets both inside its dict and next to it")
        return x, (_target(index, item[1]) if len(item) >= 2 else inner), (label_key if len(item) < 2 else None)
    if isinstance(item, (tuple, list)) and len(item) >= 1 and isinstance(item[0], torch.Tensor):
        return item[0], _target(index, item[1] if len(item) >= 2 else None), None
    raise TypeError(
        f"data: batch {index} is a {type(item).__name__}; each batch must be an input tensor, an "
        "(input, target) pair or a dict of keyword inputs (e.g. input_ids, attention_mask, labels)"
    )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape[1:])} ({x.dtype})"
    others = [f"{k}: {type(v).__name__}" for k, v in x.items() if not isinstance(v, torch.Tensor)]
    return "{" + ", ".join([f"{k}: {s} ({d})" for k, s, d in sample_shape(x)] + others) + "}"


def _check_batch(index: int, x, y: Optional[torch.Tensor], first: Optional[Batch]) -> None:
    n = num_samples(x)
    if n == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else {k: tuple(v.shape) for k, v in x.items()
                                                                     if isinstance(v, torch.Tensor)}
        raise ValueError(f"data: batch {index} has no samples (input shape {shape})")
    if y is not None and y.dim() > 0 and y.shape[0] != n:
        raise ValueError(
            f"data: batch {index} has {n} inputs but {y.shape[0]} targets (shapes "
            f"{_describe(x)} and {tuple(y.shape)})"
        )
    if first is None:
        return
    same = (type(x) is type(first.x) and sample_shape(x) == sample_shape(first.x)
            and (not isinstance(x, torch.Tensor) or x.dtype == first.x.dtype)
            and (isinstance(x, torch.Tensor) or sorted(x) == sorted(first.x)))
    if not same:
        raise ValueError(
            f"data: batch {index} has samples of shape {_describe(x)}, but batch "
            f"{first.index} has {_describe(first.x)}; every batch must hold samples of one shape"
            + ("" if isinstance(x, torch.Tensor) else " under the same keys")
        )
    if (y is None) != (first.y is None) or (y is not None and y.shape[1:] != first.y.shape[1:]):
        raise ValueError(
            f"data: batch {index} has targets {None if y is None else tuple(y.shape)}, batch {first.index} "
            f"{None if first.y is None else tuple(first.y.shape)}; every batch must have targets of one shape, or none"
        )


def _place(t, store: torch.device, pin: bool):
    if t is None:
        return None
    if isinstance(t, Inputs):
        return Inputs((k, _place(v, store, pin) if isinstance(v, torch.Tensor) else v) for k, v in t.items())
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
        x, y, label_key = _split(index, item)
        _check_batch(index, x, y, batches[0] if batches else None)
        if max_samples is not None and taken + num_samples(x) > max_samples:
            cut = max_samples - taken
            x = head(x, cut)
            y = y[:cut] if y is not None and y.dim() > 0 else y
        batches.append(Batch(index, _place(x, store, pin), _place(y, store, pin), label_key))
        taken += num_samples(x)
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
    """A hash of the pruning set's contents (inputs - every entry of a dict batch - and targets,
    in order), so a checkpoint is never resumed with different data of the same shapes."""
    h = hashlib.blake2b(digest_size=16)
    for b in batches:
        if isinstance(b.x, Inputs):
            for key in sorted(b.x):
                value = b.x[key]
                if isinstance(value, torch.Tensor):
                    _hash_tensor(h, f"{b.index}:{key}", value)
                else:
                    h.update(f"{b.index}:{key}={value!r}".encode())
            h.update(f"labels:{b.label_key}".encode())
            xs = [b.y]
        else:
            xs = [b.x, b.y]
        for t in xs:
            if t is None:
                h.update(b"-")
                continue
            _hash_tensor(h, str(b.index), t)
    return h.hexdigest()
