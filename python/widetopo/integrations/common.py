"""The trainer-independent part of the callbacks: check the settings, prune once, keep the
pruned weights and their optimizer state at zero.

    core = PruneAtStart(0.1, "snip", batches=4, save_path="masks.wtm")   # every setting checked here
    masks = core.prune(model, train_loader)    # widetopo.prune on the first batches; model unchanged
    core.attach(model, [optimizer])            # MaskEnforcer: pruned w and their state zero now and
                                               # after every optimizer.step()
    core.detach()

Pruning reads the training data outside the training loop, so it runs under a saved and
restored random state (torch CPU/CUDA, Python `random`, NumPy): the loader's shuffling, the
dropout draws and everything else random in training are the same as in a run given the same
masks up front.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import time
from typing import Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["PruneAtStart", "FirstBatches", "innermost_optimizer", "DEFAULT_SAMPLES"]

#: samples of the trainer's training data that pruning reads when neither `batches` nor
#: `max_samples` is given (the default of `widetopo prune --samples`)
DEFAULT_SAMPLES = 1000


def lazy_class(module_globals: dict, name: str, factory):
    """A module __getattr__ that builds `name` with factory() on first access and caches it in the
    module, so importing the module does not import the trainer framework."""
    def __getattr__(attr: str):
        if attr == name:
            module_globals[name] = factory()
            return module_globals[name]
        raise AttributeError(f"module {module_globals['__name__']!r} has no attribute {attr!r}")

    return __getattr__


class FirstBatches:
    """The first `count` batches of `data`; every iteration starts a new pass over `data`."""

    def __init__(self, data: Iterable, count: int):
        self.data = data
        self.count = count

    def __iter__(self):
        iterator = iter(self.data)
        try:
            yield from itertools.islice(iterator, self.count)
        finally:
            close = getattr(iterator, "close", None)
            if callable(close):
                close()


def innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under a trainer's wrapper (accelerate's AcceleratedOptimizer keeps it
    in `.optimizer`, Lightning's LightningOptimizer in `._optimizer`): its step() is the one that
    runs, so its step hooks fire and its `.state` holds the moments."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = next((getattr(optimizer, a) for a in ("optimizer", "_optimizer")
                      if isinstance(getattr(optimizer, a, None), torch.optim.Optimizer)), None)
        if inner is None:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a trainer's wrapper of one), "
                        f"got {type(optimizer).__name__}")
    return optimizer


@contextlib.contextmanager
def _random_state_kept(model: nn.Module):
    """Run the block and put the global random states back as they were."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    py_state = random.getstate()
    try:
        import numpy as np
        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        np = np_state = None
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)


def _count(name: str, value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return value


class PruneAtStart:
    """Settings and state shared by the trainer callbacks.

    density:   fraction of the prunable weights kept, in (0, 1].
    method:    a registered method name or alias, or a Scorer (as widetopo.prune).
    data:      the pruning data; default: the trainer's training data.
    batches:   read only the first N batches of the pruning data.
    module:    dotted name of the submodule to prune (e.g. "model" for a LightningModule that
               holds its network in self.model); the mask names are relative to it. Default:
               the whole model the trainer trains, whose forward must suit widetopo.prune.
    masks:     masks to use instead of pruning (e.g. widetopo.load_masks(path)).
    save_path: write the masks there (widetopo.save_masks) once computed, on the main process.
    mask_grads: also zero the pruned gradients before every step (MaskEnforcer's mask_grads).
    options:   passed to widetopo.prune (the method's, the engine's and the selection's
               options); names and values are checked here, before any training. Without
               `data`, `batches` and `max_samples`, pruning reads the first DEFAULT_SAMPLES
               samples of the training data.
    """

    def __init__(self, density: float, method="widetopo", *, data: Optional[Iterable] = None,
                 batches: Optional[int] = None, module: Optional[str] = None,
                 masks: Optional[Mapping[str, torch.Tensor]] = None,
                 save_path: Union[str, os.PathLike, None] = None, mask_grads: bool = False, **options):
        from widetopo.api import _resolve
        from widetopo.engine.options import EngineOptions
        from widetopo.engine.schedule import _check_density
        from widetopo.sparsity.masks import Masks

        self.density = _check_density("density", density)
        # unknown option names (listing the allowed ones) and bad values raise here
        _, engine, _, _ = _resolve(method, options)
        EngineOptions(**engine)
        if data is not None and (isinstance(data, torch.Tensor) or not hasattr(data, "__iter__")):
            raise TypeError(f"data must be an iterable of batches (e.g. a DataLoader) or None, got {type(data).__name__}")
        self.batches = _count("batches", batches)
        if module is not None and (not isinstance(module, str) or not module):
            raise TypeError(f"module must be the dotted name of a submodule (e.g. 'model') or None, got {module!r}")
        if masks is not None:
            if not isinstance(masks, Mapping):
                raise TypeError(f"masks must be a mapping name -> bool tensor (e.g. widetopo.Masks) or None, "
                                f"got {type(masks).__name__}")
            masks = masks if isinstance(masks, Masks) else Masks(masks)
        if save_path is not None:
            try:
                save_path = os.fspath(save_path)
            except TypeError:
                raise TypeError(f"save_path must be a path or None, got {save_path!r}") from None
            folder = os.path.dirname(os.path.abspath(save_path))
            if not os.path.isdir(folder):
                raise ValueError(f"save_path {save_path!r}: the folder {folder!r} does not exist")
        if not isinstance(mask_grads, bool):
            raise TypeError(f"mask_grads must be True or False, got {mask_grads!r}")
        self.method = method
        self.options = dict(options)
        self.data = data
        self.module = module
        self.masks = masks
        self.save_path = save_path
        self.mask_grads = mask_grads
        self.enforcers: List = []
        self._model: Optional[nn.Module] = None
        self._optimizers: List = []

    # -----------------------------------------------------------------------------------------

    def target(self, model: nn.Module) -> nn.Module:
        """The module that is pruned: `model`, or its submodule named by `module`."""
        if self.module is None:
            return model
        try:
            return model.get_submodule(self.module)
        except AttributeError:
            raise ValueError(f"module={self.module!r} is not a submodule of {type(model).__name__}") from None

    def prune(self, model: nn.Module, train_data: Optional[Iterable] = None):
        """widetopo.prune(model, data, density, method, **options) on `self.data`, else on
        `train_data` (its first `batches` batches, or DEFAULT_SAMPLES samples); sets and
        returns self.masks. The model is left unchanged."""
        data = self.data if self.data is not None else train_data
        if data is None:
            raise ValueError("no pruning data: the trainer has no training dataloader; pass data=...")
        options = dict(self.options)
        if self.data is None and self.batches is None:
            options.setdefault("max_samples", DEFAULT_SAMPLES)
        if self.batches is not None:
            data = FirstBatches(data, self.batches)
        import widetopo

        start = time.perf_counter()
        with _random_state_kept(model):
            masks = widetopo.prune(model, data, self.density, self.method, **options)
        logger.info("pruned %s with %s to density %.6g (%d of %d weights kept) in %.3g s", type(model).__name__,
                    masks.meta.get("method", self.method), masks.density, masks.kept, masks.numel,
                    time.perf_counter() - start)
        self.masks = masks
        return masks

    def save(self) -> None:
        """Write self.masks to save_path (if one was given)."""
        if self.save_path is not None and self.masks is not None:
            from widetopo.sparsity.maskfile import save_masks

            save_masks(self.masks, self.save_path)
            logger.info("masks saved to %s", self.save_path)

    def resumed(self, where: str) -> None:
        """On a resumed run without masks: read them from save_path, as the first run wrote them
        (pruning the trained weights again would give other masks)."""
        if self.masks is not None:
            return
        if self.save_path is not None and os.path.isfile(self.save_path):
            from widetopo.sparsity.maskfile import load_masks

            self.masks = load_masks(self.save_path)
            logger.info("resumed run: masks read from %s", self.save_path)
            return
        raise ValueError(f"{where}: training resumes from a checkpoint, but this callback has no masks and "
                         f"save_path ({self.save_path!r}) holds none; pass masks=widetopo.load_masks(...) with "
                         "the masks of the first run")

    def attach(self, model: nn.Module, optimizers: Sequence) -> None:
        """Enforce self.masks on `model` (the pruned module): one MaskEnforcer per optimizer, for
        the masked parameters it updates. Each zeroes its pruned weights now and, after every
        step of its optimizer, the pruned weights and their optimizer state again. Masks of
        parameters no optimizer holds are applied once (and a warning names them)."""
        from widetopo.sparsity.apply import MaskEnforcer, _resolve as check_masks

        if self.masks is None:
            raise RuntimeError("attach() before the masks exist: call prune() or pass masks=")
        check_masks(model, self.masks)  # every name and shape, before anything changes
        inner = [innermost_optimizer(o) for o in optimizers]
        self.detach()
        params = dict(model.named_parameters())
        left = list(self.masks)
        for optimizer in inner:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            names = [n for n in left if id(params[n]) in held]
            if names:
                self.enforcers.append(MaskEnforcer(model, {n: self.masks[n] for n in names}, optimizer,
                                                   mask_grads=self.mask_grads))
                left = [n for n in left if n not in names]
        if left:
            logger.warning("masked parameters no optimizer updates (zeroed once): %s", left)
            MaskEnforcer(model, {n: self.masks[n] for n in left})
        self._model, self._optimizers = model, list(optimizers)

    def reattach(self) -> None:
        """attach() again to the same model and optimizers (after self.masks changed)."""
        if self.enforcers:
            self.attach(self._model, list(self._optimizers))

    def attached_to(self, optimizers: Sequence) -> bool:
        """Whether the enforcers sit on exactly these optimizers (a trainer may replace them)."""
        return len(optimizers) == len(self._optimizers) and all(a is b for a, b in zip(optimizers, self._optimizers))

    def detach(self) -> None:
        """Remove the optimizer hooks; the weights keep their values."""
        for enforcer in self.enforcers:
            enforcer.remove()
        self.enforcers = []
        self._model, self._optimizers = None, []
