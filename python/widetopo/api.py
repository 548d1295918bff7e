"""`widetopo.prune`: prune a classification model at initialization in one call.

    masks = widetopo.prune(model, loader, density=0.05, method="widetopo-s", seed=0)

Presets (METHODS) follow the published configurations (DESIGN 2.3): WideTopo T = 50 rounds,
R = 2 restorations of J = 50 steps, T' = 50 rounds each; WideTopo-S the same with T = T' = 10;
Random/Magnitude/SNIP one round; SynFlow 100 rounds; no restoration for the baselines.
Every preset value can be overridden by an option of the same name.
"""
from __future__ import annotations

from typing import Iterable, Union

from torch import nn

from widetopo.engine import Pruner
from widetopo.masks import Masks
from widetopo.params import select_prunable
from widetopo.schedule import _check_density
from widetopo.scores.base import Scorer

#: Engine defaults shared by every method.
ENGINE_DEFAULTS = {
    "rounds": 1,
    "restorations": 0,
    "restore_steps": 50,
    "restore_rounds": None,
    "schedule": "poly",
    "compression_factor": 5.0,
    "count": "exact",
    "seed": 0,
    "noise_scale": 1e-5,
    "verbose": True,
    "max_samples": None,
    "checkpoint": None,
    "device": None,
}

_WIDETOPO_SCORER = {"mu1": 0.01, "mu2": 1.0, "eps": 5e-4, "probes": 1}

#: Method presets: engine options and scorer option defaults. A method also accepts every
#: other keyword of its scorer's constructor (widetopo.scores.scorer_options).
METHODS = {
    "widetopo": {
        "engine": {"rounds": 50, "restorations": 2, "restore_steps": 50, "restore_rounds": 50},
        "scorer": dict(_WIDETOPO_SCORER),
    },
    "widetopo-s": {
        "engine": {"rounds": 10, "restorations": 2, "restore_steps": 50, "restore_rounds": 10},
        "scorer": dict(_WIDETOPO_SCORER),
    },
    "random": {"engine": {"rounds": 1, "restorations": 0}, "scorer": {}},
    "magnitude": {"engine": {"rounds": 1, "restorations": 0}, "scorer": {}},
    "snip": {"engine": {"rounds": 1, "restorations": 0}, "scorer": {}},
    "synflow": {"engine": {"rounds": 100, "restorations": 0}, "scorer": {}},
}

SELECTION_OPTIONS = ("include", "names", "pattern", "include_bias", "include_norm", "include_tokens")


def _allowed_options(scorer_options) -> list:
    return sorted(set(ENGINE_DEFAULTS) | set(SELECTION_OPTIONS) | set(scorer_options))


def prune(model: nn.Module, data: Iterable, density: float, method: Union[str, Scorer] = "widetopo", **options) -> Masks:
    """Prune `model` at initialization to `density` (fraction of prunable weights kept).

    model:   any nn.Module whose forward(x) returns logits; it is left unchanged.
    data:    iterable of input tensors or (input, target) batches (a DataLoader works).
    method:  one of METHODS, or a Scorer instance (one round, no restoration unless overridden).
    options: rounds, restorations, restore_steps, restore_rounds, schedule ("poly" | "linear" |
             "cosine"), compression_factor (5.0), count ("exact" | "official"), seed (0),
             noise_scale (1e-5), verbose (True), max_samples (read only this many samples of
             `data`; None = all), checkpoint (path or None), device; for WideTopo
             mu1 (0.01), mu2 (1.0), eps (5e-4), probes (1); prunable selection: include, names,
             pattern, include_bias, include_norm, include_tokens (see widetopo.params.select_prunable).
    Returns Masks (name -> bool tensor) with .meta describing the run.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(method, Scorer):
        preset_name, preset = None, {"engine": {}, "scorer": {}}
    elif isinstance(method, str) and method.lower() in METHODS:
        preset_name = method.lower()
        preset = METHODS[preset_name]
    else:
        raise ValueError(f"method must be one of {sorted(METHODS)} or a Scorer instance, got {method!r}")
    scorer_keys = set(preset["scorer"])
    if preset_name is not None:
        from widetopo.scores import scorer_options

        scorer_keys |= set(scorer_options(preset_name))
    allowed = _allowed_options(scorer_keys)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {preset_name or type(method).__name__!r}; allowed: {allowed}"
        )
    density = _check_density("density", density)

    engine_opts = dict(ENGINE_DEFAULTS)
    engine_opts.update(preset["engine"])
    engine_opts.update({k: v for k, v in options.items() if k in ENGINE_DEFAULTS})
    scorer_opts = dict(preset["scorer"])
    scorer_opts.update({k: v for k, v in options.items() if k in scorer_keys})
    selection = {k: v for k, v in options.items() if k in SELECTION_OPTIONS}
    names = select_prunable(model, **selection)

    if preset_name is None:
        scorer = method
    else:
        from widetopo.scores import make_scorer

        try:
            scorer = make_scorer(preset_name, **scorer_opts)
        except TypeError as exc:
            raise ValueError(f"invalid scorer options for {preset_name!r}: {exc}") from None

    meta = {"method": getattr(scorer, "name", None) or preset_name, "preset": preset_name}
    meta.update(scorer_opts)
    if selection:
        meta["selection"] = repr(selection)
    pruner = Pruner(model, scorer, density, names, meta=meta, **engine_opts)
    return pruner.run(data)
