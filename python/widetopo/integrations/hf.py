"""Hugging Face callback: prune when `Trainer.train` starts, keep pruned weights and their optimizer state zero.

    from transformers import Trainer
    from widetopo.integrations.hf import WidetopoPruning

    prune = WidetopoPruning(density=0.1, method="snip", batches=8, save_path="masks.wtm")
    Trainer(model=model, args=args, train_dataset=train, callbacks=[prune]).train()
    prune.masks                                     # widetopo.Masks

`on_train_begin` receives the model, the optimizer (created and prepared by then) and the
training dataloader. The callback

1. prunes the model (or its submodule `module`) with widetopo.prune on the first batches of the
   training data (or on `data`), under a saved and restored random state; HF batches are
   dicts (input_ids, attention_mask, labels) and the outputs ModelOutputs, which widetopo.prune
   reads. The loader under accelerate's wrapper (`base_dataloader`) is read, so the wrapper's
   epoch counter and gradient-accumulation bookkeeping are left alone;
2. puts a widetopo.MaskEnforcer on the torch optimizer under accelerate's AcceleratedOptimizer:
   pruned weights zero now and, after every optimizer step, the pruned weights and their
   optimizer state (Adam's exp_avg / exp_avg_sq, momentum buffers) zero again.

A run resumed from a checkpoint (state.global_step > 0 at on_train_begin) is not pruned again:
it takes `masks=` or reads save_path. Built on `transformers.TrainerCallback` when first asked for.
"""
from __future__ import annotations

import functools
import logging

from widetopo.integrations.common import PruneAtStart, lazy_class

logger = logging.getLogger(__name__)

__all__ = ["WidetopoPruning", "callback_class"]

INSTALL = 'pip install "widetopo[hf]"'


def _trainer_callback():
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise ImportError(f"widetopo.integrations.hf needs transformers (and accelerate, which its Trainer "
                          f"uses); install them with: {INSTALL}") from None
    return TrainerCallback


def _plain_loader(loader):
    """The DataLoader under accelerate's DataLoaderShard/Dispatcher (kept in `base_dataloader`)."""
    base = getattr(loader, "base_dataloader", None)
    return loader if base is None else base


@functools.lru_cache(maxsize=None)
def callback_class():
    """WidetopoPruning built on transformers.TrainerCallback."""
    TrainerCallback = _trainer_callback()

    class WidetopoPruning(PruneAtStart, TrainerCallback):
        __doc__ = PruneAtStart.__doc__.replace("Settings and state shared by the trainer callbacks.",
                                               "A transformers TrainerCallback that prunes at on_train_begin and "
                                               "keeps pruned weights and their optimizer state zero.")

        def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
            if model is None or optimizer is None:
                raise ValueError("WidetopoPruning: on_train_begin got no model or optimizer from the Trainer")
            target = self.target(model)
            if self.masks is None:
                if state.global_step > 0:
                    self.resumed("WidetopoPruning")
                else:
                    loader = None if self.data is not None or train_dataloader is None else _plain_loader(train_dataloader)
                    self.prune(target, loader)
                    if state.is_world_process_zero:
                        self.save()
            self.attach(target, [optimizer])

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            # a Trainer subclass that replaced its optimizer gets the enforcer re-attached
            if self.masks is not None and optimizer is not None and not self.attached_to([optimizer]):
                self.attach(self.target(model), [optimizer])

        def on_train_end(self, args, state, control, **kwargs):
            self.detach()

    WidetopoPruning.__qualname__ = WidetopoPruning.__name__
    WidetopoPruning.__module__ = __name__
    return WidetopoPruning


__getattr__ = lazy_class(globals(), "WidetopoPruning", callback_class)  # the framework loads on first use
