"""The small train / evaluate loop of `widetopo run`, `train` and `compare`: SGD with a cosine,
step or constant schedule, pruned weights kept at zero by a MaskEnforcer (widetopo.sparsity.apply)."""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from widetopo.scores.losses import IGNORE_INDEX
from widetopo.sparsity.apply import MaskEnforcer, apply_masks, remove_masks  # noqa: F401

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# a small train / evaluate loop (used by the CLI)

def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


def _split_batch(batch, device):
    if isinstance(batch, Mapping):
        x, y = batch.get("x", batch.get("input")), batch.get("y", batch.get("target"))
    else:
        x, y = batch[0], batch[1]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _hits(logits: torch.Tensor, y: torch.Tensor, ignore_index: int) -> Tuple[int, int]:
    """(correct, counted) predictions over the targets that are not ignore_index: per sample for
    (N, C) logits, per pixel for segmentation logits (N, C, H, W)."""
    valid = y != ignore_index
    return int(((logits.argmax(1) == y) & valid).sum()), int(valid.sum())


def train_epoch(model: nn.Module, loader, optimizer, device="cpu", scheduler=None, enforcer: Optional[MaskEnforcer] = None,
                progress: bool = False, desc: str = "train", ignore_index: int = IGNORE_INDEX) -> Dict[str, float]:
    """One pass over `loader` with cross-entropy (per pixel for segmentation logits, targets equal
    to ignore_index left out); returns {"loss", "accuracy", "seconds"}, both per counted target.
    `scheduler` (if given) is stepped once per batch. The enforcer works through its hooks."""
    model.train()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    for batch in _progress(loader, progress, desc=desc):
        x, y = _split_batch(batch, device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        hits, counted = _hits(logits.detach(), y, ignore_index)
        if counted == 0:  # no labelled target: nothing to learn, the schedule still advances
            if scheduler is not None:
                scheduler.step()
            continue
        loss = nn.functional.cross_entropy(logits, y, ignore_index=ignore_index)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} (learning rate too high?)")
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * counted
        correct += hits
        seen += counted
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device="cpu", progress: bool = False,
             ignore_index: int = IGNORE_INDEX) -> Dict[str, float]:
    """Eval-mode loss and top-1 accuracy over `loader` (per pixel for segmentation, targets equal
    to ignore_index left out); the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    try:
        for batch in _progress(loader, progress, desc="eval"):
            x, y = _split_batch(batch, device)
            logits = model(x)
            total_loss += nn.functional.cross_entropy(logits, y, reduction="sum", ignore_index=ignore_index).item()
            hits, counted = _hits(logits, y, ignore_index)
            correct += hits
            seen += counted
    finally:
        model.train(was_training)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1)}


SCHEDULES = ("cosine", "step", "constant")


def make_scheduler(optimizer, schedule: str, total_steps: int, milestones=(0.5, 0.75), gamma: float = 0.1):
    """Per-batch learning-rate schedule: cosine annealing to 0, step decay by `gamma` at the
    given fractions of training, or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    total_steps = max(int(total_steps), 1)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    if schedule == "step":
        steps = sorted(int(f * total_steps) for f in milestones)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: gamma ** sum(s >= k for k in steps))
    return None


def fit(model: nn.Module, train_loader, test_loader=None, *, epochs: int = 10, lr: float = 0.1, momentum: float = 0.9,
        weight_decay: float = 5e-4, schedule: str = "cosine", masks=None, mask_mode: str = "enforcer", device="cpu",
        progress: bool = False, desc: str = "", ignore_index: int = IGNORE_INDEX) -> dict:
    """Train with SGD (+momentum, weight decay) and a per-batch LR schedule, optionally under
    `masks` (mask_mode "enforcer": plain parameters + MaskEnforcer; "prune": apply_masks, baked
    in with remove_masks at the end). Segmentation targets: per-pixel loss and accuracy, pixels
    equal to ignore_index left out. Returns {"history": [...per epoch...], "final": {...}}."""
    if int(epochs) < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if mask_mode not in ("enforcer", "prune"):
        raise ValueError(f"mask_mode must be 'enforcer' or 'prune', got {mask_mode!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    # like the engine's bar: only on a terminal (logs written to files stay clean); without a
    # bar, one INFO line per epoch instead
    progress = bool(progress) and sys.stderr.isatty()
    model.to(device)
    enforcer = None
    if masks is not None and mask_mode == "prune":
        apply_masks(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)
    if masks is not None and mask_mode == "enforcer":
        enforcer = MaskEnforcer(model, masks, optimizer, mask_grads=True)
    scheduler = make_scheduler(optimizer, schedule, int(epochs) * len(train_loader))
    history = []
    try:
        epoch_iter = _progress(range(int(epochs)), progress, desc=desc or "epochs")
        for epoch in epoch_iter:
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            row.update({f"train_{k}": v for k, v in train_epoch(model, train_loader, optimizer, device, scheduler, enforcer,
                                                                            ignore_index=ignore_index).items()})
            if test_loader is not None:
                row.update({f"test_{k}": v for k, v in evaluate(model, test_loader, device, ignore_index=ignore_index).items()})
            history.append(row)
            logger.log(logging.DEBUG if progress else logging.INFO, "%sepoch %d/%d: train loss %.4f acc %.4f%s", f"{desc}: " if desc else "", epoch + 1, epochs,
                        row["train_loss"], row["train_accuracy"],
                        f", test acc {row['test_accuracy']:.4f}" if "test_accuracy" in row else "")
            if progress and hasattr(epoch_iter, "set_postfix"):
                epoch_iter.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row.get('test_accuracy', row['train_accuracy']):.3f}")
    finally:
        if enforcer is not None:
            enforcer.remove()
        if masks is not None and mask_mode == "prune":
            remove_masks(model, list(masks.keys()))
    final = evaluate(model, test_loader, device) if test_loader is not None else {}
    return {"history": history, "final": final}

