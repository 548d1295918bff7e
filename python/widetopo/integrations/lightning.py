"""Lightning callback: prune when fitting starts, keep pruned weights and their optimizer state zero.

    import lightning.pytorch as pl
    from widetopo.integrations.lightning import WidetopoPruning

    prune = WidetopoPruning(density=0.1, method="snip", batches=8, save_path="masks.wtm")
    pl.Trainer(max_epochs=10, callbacks=[prune]).fit(module, train_loader)
    prune.masks                                     # widetopo.Masks

When it runs (Lightning 2.x, Trainer._run): `configure_optimizers` is called in the strategy's
setup, *before* `on_fit_start`, so the optimizers exist there; the training dataloader is set up
only later (in the fit loop), so the callback asks Lightning's own data source for it (the same
`train_dataloader()` hook, datamodule or loader given to fit) and reads its first batches
before any training iterator exists. Then, in `on_fit_start`:

1. prune the LightningModule (or its submodule `module`) with widetopo.prune on those batches
   (or on `data`), under a saved and restored random state;
2. one widetopo.MaskEnforcer per optimizer: pruned weights zero now, and after every
   optimizer step (a step post-hook on the torch optimizer, so gradient accumulation, AMP's
   skipped steps and manual optimization are all covered) the pruned weights and their
   optimizer state (momentum buffers, Adam's exp_avg / exp_avg_sq) are set to zero again.

The masks are part of the callback's checkpoint state: a run resumed with `ckpt_path` keeps
them instead of pruning the trained weights again (without them, they are read from save_path).
The sanity-check validation runs after `on_fit_start`, on the pruned model.

The class is built on `lightning.pytorch.Callback` (or `pytorch_lightning.Callback` where only
the standalone package is installed) when first asked for; `callback_class(pytorch_lightning)`
gives one for the standalone package's Trainer next to `lightning`.
"""
from __future__ import annotations

import functools
import logging

from widetopo.integrations.common import PruneAtStart, lazy_class

logger = logging.getLogger(__name__)

__all__ = ["WidetopoPruning", "callback_class"]

INSTALL = 'pip install "widetopo[lightning]"'


def _namespace():
    try:
        import lightning.pytorch as pl
        return pl
    except ImportError:
        pass
    try:
        import pytorch_lightning as pl
        return pl
    except ImportError:
        raise ImportError(f"widetopo.integrations.lightning needs Lightning (lightning.pytorch or "
                          f"pytorch_lightning); install it with: {INSTALL}") from None


def _train_loader(trainer):
    """The training dataloader from Lightning's data source, before the fit loop sets it up."""
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    if source is None or not hasattr(source, "dataloader"):
        raise ValueError("WidetopoPruning: cannot reach this Lightning version's training dataloader; pass data=...")
    loader = source.dataloader()
    if loader is None:
        raise ValueError("WidetopoPruning: the trainer has no training dataloader; pass data=...")
    if isinstance(loader, (dict, list, tuple)):
        raise ValueError(f"WidetopoPruning: the training data is a {type(loader).__name__} of dataloaders; "
                         "pass the pruning data with data=...")
    return loader


def callback_class(pl=None):
    """WidetopoPruning built on `pl.Callback` (pl: lightning.pytorch or pytorch_lightning;
    default: lightning.pytorch if installed, else pytorch_lightning); one class per namespace."""
    return _build(_namespace() if pl is None else pl)


@functools.lru_cache(maxsize=None)
def _build(pl):
    class WidetopoPruning(PruneAtStart, pl.Callback):
        __doc__ = PruneAtStart.__doc__.replace("Settings and state shared by the trainer callbacks.",
                                               "A Lightning callback that prunes at on_fit_start and keeps "
                                               "pruned weights and their optimizer state zero.")

        @property
        def state_key(self) -> str:
            method = self.method if isinstance(self.method, str) else type(self.method).__name__
            return self._generate_state_key(density=self.density, method=method, module=self.module)

        def on_fit_start(self, trainer, pl_module) -> None:
            model = self.target(pl_module)
            if self.masks is None:
                if getattr(trainer, "ckpt_path", None) is not None:
                    self.resumed("WidetopoPruning")
                else:
                    self.prune(model, None if self.data is not None else _train_loader(trainer))
                    if trainer.is_global_zero:
                        self.save()
            self.attach(model, trainer.optimizers)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            # a trainer that replaced its optimizers (e.g. a tuner) gets the enforcers re-attached
            if self.masks is not None and not self.attached_to(trainer.optimizers):
                self.attach(self.target(pl_module), trainer.optimizers)

        def teardown(self, trainer, pl_module, stage: str) -> None:
            self.detach()

        def state_dict(self):
            if self.masks is None:
                return {}
            meta = {k: v for k, v in self.masks.meta.items() if isinstance(v, (str, int, float, bool, type(None)))}
            return {"masks": {n: m.detach().cpu() for n, m in self.masks.items()}, "meta": meta}

        def load_state_dict(self, state_dict) -> None:
            from widetopo.sparsity.masks import Masks

            if not state_dict.get("masks"):
                return
            self.masks = Masks(state_dict["masks"], meta=state_dict.get("meta"))
            self.reattach()  # restored after on_fit_start (strategies that restore after setup)

    WidetopoPruning.__qualname__ = WidetopoPruning.__name__
    WidetopoPruning.__module__ = __name__
    return WidetopoPruning


__getattr__ = lazy_class(globals(), "WidetopoPruning", callback_class)  # the framework loads on first use
