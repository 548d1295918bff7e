"""`widetopo.prune` and `widetopo.saliency`: one call for any registered method.

    masks = widetopo.prune(model, loader, density=0.05, method="widetopo-s", seed=0)
    scores = widetopo.saliency(model, loader, "snip")          # raw scores of one round

Methods, their options and schedule defaults come from the registry (widetopo.methods); the
engine options from widetopo.engine.options.EngineOptions; the prunable selection from
widetopo.sparsity.selection.select_prunable. Every option is a keyword of the same name.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from widetopo.distributed.collectives import collective_device, fail_together
from widetopo.engine.pruner import Pruner
from widetopo.sparsity.masks import Masks
from widetopo.methods import Method, get_method
from widetopo.options import as_dict
from widetopo.sparsity.selection import select_prunable
from widetopo.engine.schedule import _check_density
from widetopo.scores.base import Scorer
from widetopo.engine.options import EngineOptions

__all__ = ["prune", "saliency", "ENGINE_OPTIONS", "SELECTION_OPTIONS"]

#: keyword options of the engine (widetopo.engine.options.EngineOptions)
ENGINE_OPTIONS: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EngineOptions))
#: keyword options of the prunable selection (widetopo.sparsity.selection.select_prunable)
SELECTION_OPTIONS: Tuple[str, ...] = tuple(n for n in inspect.signature(select_prunable).parameters if n != "model")


def _resolve(method: Union[str, Scorer, Method], options: dict):
    """(scorer, engine option dict, selection dict, meta) for `method` and the caller's options."""
    if isinstance(method, Scorer):
        spec, method_opts = None, ()
    else:
        spec = method if isinstance(method, Method) else get_method(method)
        method_opts = spec.option_names
    allowed = sorted(set(ENGINE_OPTIONS) | set(SELECTION_OPTIONS) | set(method_opts))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        who = spec.name if spec is not None else type(method).__name__
        raise ValueError(f"unknown option(s) {unknown} for method {who!r}; allowed: {allowed}")
    engine = {} if spec is None else spec.schedule.options()
    engine.update({k: v for k, v in options.items() if k in ENGINE_OPTIONS})
    selection = {k: v for k, v in options.items() if k in SELECTION_OPTIONS}
    if spec is None:
        scorer = method
        meta = {"method": scorer.name, "preset": None}
    else:
        scorer = spec.make_scorer(**{k: v for k, v in options.items() if k in method_opts})
        meta = {"method": spec.name, "preset": spec.name}
    meta.update(as_dict(scorer.options))
    if selection:
        meta["selection"] = repr(selection)
    return scorer, engine, selection, meta


def _refuse_applied_masks(model: nn.Module) -> None:
    """A model in torch.nn.utils.prune form holds `weight_orig` parameters: masks computed on it
    would carry those names and fit neither the model after remove_masks nor a fresh one."""
    masked = [f"{mod}.{n}" if mod else n for mod, module in model.named_modules()
              for n, _ in module.named_parameters(recurse=False) if n.endswith("_orig")
              and (n[:-len("_orig")] + "_mask") in module._buffers]
    if masked:
        raise ValueError(f"model already has masks applied in torch.nn.utils.prune form ({', '.join(masked[:3])}"
                         f"{' ...' if len(masked) > 3 else ''}); call widetopo.remove_masks(model) first to make "
                         f"them permanent, or prune the model before apply_masks")


def _pruner(model, density, method, options) -> Pruner:
    """The checked Pruner. Under torch.distributed a rank that refuses its arguments makes every
    rank raise here (one fail_together around every check, Pruner.__init__'s included), instead
    of leaving the others waiting in the first collective of the run until the timeout."""
    with fail_together(collective_device(model), "checking the arguments of the pruning call"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _refuse_applied_masks(model)
        scorer, engine, selection, meta = _resolve(method, options)
        density = _check_density("density", density)
        names = select_prunable(model, **selection)
        return Pruner(model, scorer, density, names, meta=meta, **engine)


def prune(model: nn.Module, data: Iterable, density: float, method: Union[str, Scorer] = "widetopo",
          **options) -> Masks:
    """Prune `model` at initialization to `density` (fraction of prunable weights kept).

    model:   any nn.Module returning logits (a tensor, a ModelOutput/dict with "logits", or a
             tuple starting with them); it is left unchanged.
    data:    iterable of input tensors, (input, target) batches, or dict batches fed as
             model(**batch) with the targets under "labels"/"targets" taken out (a DataLoader
             works; docs/design.md §2.5).
    method:  a registered method name or alias (`widetopo methods` lists them with their
             options), or a Scorer instance (one round, no restoration unless overridden).
    options: the method's options (e.g. eps=0.01 for ntk-sap), the engine's (rounds,
             restorations, restore_steps, restore_rounds, schedule, compression_factor, count,
             seed, noise_scale, verbose, max_samples, checkpoint, device, data_device,
             shard_scores, forward_fn(model, inputs), loss_fn(output, target)) and the
             prunable selection (include, names, pattern, include_bias, include_norm,
             include_tokens; see widetopo.sparsity.selection.select_prunable).
    Returns Masks (name -> bool tensor) with .meta describing the run.
    """
    return _pruner(model, density, method, options).run(data)


def saliency(model: nn.Module, data: Iterable, method: Union[str, Scorer] = "widetopo",
             masks: Optional[Mapping[str, torch.Tensor]] = None, **options) -> Dict[str, torch.Tensor]:
    """The raw scores of one scoring round of `method` for `masks` (dense if None): summed over
    every batch (and process) and finalized, before density decay and thresholding. Higher =
    keep. Takes the same options as prune(); the model is left unchanged."""
    return _pruner(model, 1.0, method, options).saliency(data, masks)
