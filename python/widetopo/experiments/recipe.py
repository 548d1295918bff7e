"""The papers' recipe, shared by `widetopo prune`, `train`, `run` and `compare`: build the network
(optionally from an --init state_dict), load the data, prune at initialization, train under the
masks. Every step takes its settings as explicit frozen dataclasses:

    Setup        what is built and from which data (model, dataset, seed, device, init file)
    PruneConfig  how it is pruned (method and its options, density, pruning set, schedule overrides)
    TrainConfig  how it is trained (SGD epochs, learning rate, schedule, mask mode, augmentation)
    Recipe       the three together (one per `compare` experiment)

Field names equal the CLI's option names (dashes -> underscores), so `configs(**values)` routes
keywords such as epochs=1 or model="mlp" to the right dataclass.
"""
from __future__ import annotations

import dataclasses
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from widetopo import api
from widetopo.data import data_loader, load_dataset
from widetopo.errors import RecipeError  # noqa: F401  (raised here; importable from here too)
from widetopo.experiments.pretrained import file_sha256, load_init, read_state_dict
from widetopo.experiments.training import fit
from widetopo.methods import get_method
from widetopo.models import MODEL_TASKS, build_model
from widetopo.options import parse_assignment

logger = logging.getLogger(__name__)

__all__ = ["Setup", "PruneConfig", "TrainConfig", "Recipe", "Datasets", "RecipeError", "PRESETS", "ENGINE_OVERRIDES",
           "configs", "from_values", "method_options", "with_init_checksum", "init_record", "load_data",
           "load_datasets", "build", "prune", "train"]

#: preset name -> schedule options applied on top of the method's own schedule (explicit ones win)
PRESETS = {"default": {}, "imagenet": {"rounds": 5, "restore_rounds": 5}}

#: EngineOptions fields a recipe may override (the CLI's --rounds, --restorations, ...)
ENGINE_OVERRIDES = ("rounds", "restorations", "restore_rounds", "restore_steps", "count")


@dataclass(frozen=True)
class Setup:
    """The network and its data. `init`: a state_dict file loaded after the seeded initialization;
    `init_sha256`: its expected checksum (a changed file is refused)."""

    model: str = "cnn"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    seed: int = 0
    device: str = "cpu"
    max_train_samples: Optional[int] = None
    max_test_samples: Optional[int] = None
    init: Optional[str] = None
    init_sha256: Optional[str] = None


@dataclass(frozen=True)
class PruneConfig:
    """Pruning at initialization. `options`: the method's options (its Options dataclass);
    `engine`: EngineOptions overrides (ENGINE_OVERRIDES), on top of `preset` (PRESETS)."""

    method: str = "widetopo-s"
    density: float = 0.05
    options: Mapping[str, Any] = field(default_factory=dict)
    samples: int = 1000
    samples_per_class: Optional[int] = None
    prune_batch_size: int = 256
    preset: str = "default"
    engine: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        unknown = sorted(set(self.engine) - set(ENGINE_OVERRIDES))
        if unknown:
            raise ValueError(f"engine: unknown override(s) {', '.join(unknown)}; allowed: {', '.join(ENGINE_OVERRIDES)}")


@dataclass(frozen=True)
class TrainConfig:
    """SGD with momentum and weight decay, a per-batch learning-rate schedule (experiments.training.fit)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    mask_mode: str = "enforcer"
    augment: bool = False


@dataclass(frozen=True)
class Recipe:
    """The three together: what `compare` runs for every cell (whose seed, method and density
    replace setup.seed, prune.method and prune.density)."""

    setup: Setup = field(default_factory=Setup)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class Datasets(NamedTuple):
    train: Any
    test: Any
    train_aug: Any  # the training set with augmentation (train itself without)


def from_values(cls, values: Mapping[str, Any], **extra):
    """An instance of dataclass `cls` from the entries of `values` named like its fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names}, **extra)


def configs(setup: Optional[Setup] = None, prune: Optional[PruneConfig] = None, train: Optional[TrainConfig] = None,
            **values) -> Tuple[Setup, PruneConfig, TrainConfig]:
    """(Setup, PruneConfig, TrainConfig) with `values` (field names, or engine overrides such as
    rounds=2) replacing fields of the given or default dataclasses; an unknown name is a TypeError."""
    parts = [setup or Setup(), prune or PruneConfig(), train or TrainConfig()]
    engine = {k: values.pop(k) for k in ENGINE_OVERRIDES if k in values}
    out = []
    for part in parts:
        names = {f.name for f in dataclasses.fields(part)}
        out.append(dataclasses.replace(part, **{k: values.pop(k) for k in list(values) if k in names}))
    if values:
        raise TypeError(f"unknown setting(s) {', '.join(sorted(values))}; allowed: "
                        + ", ".join(f.name for p in parts for f in dataclasses.fields(p)) + ", " + ", ".join(ENGINE_OVERRIDES))
    if engine:
        out[1] = dataclasses.replace(out[1], engine={**out[1].engine, **engine})
    return out[0], out[1], out[2]


def method_options(method: str, assignments: Sequence[str]) -> Dict[str, Any]:
    """"KEY=VALUE" texts -> {option: typed value} for `method`'s Options dataclass, validated
    (ValueError/TypeError naming the option and what is allowed)."""
    spec = get_method(method)
    values = dict(parse_assignment([spec.options], text) for text in assignments)
    spec.make_options(**values)  # validate now, before any work
    return values


# ------------------------------------------------------------------------------ init file

def with_init_checksum(setup: Setup) -> Setup:
    """`setup` with its init file read (a state_dict, else ValueError) and its checksum recorded,
    so every later build() loads exactly these bytes."""
    if not setup.init or setup.init_sha256:
        return setup

    read_state_dict(setup.init)
    return dataclasses.replace(setup, init=os.path.abspath(os.fspath(setup.init)), init_sha256=file_sha256(setup.init))


def init_record(setup: Setup) -> Dict[str, str]:
    """{"init_file", "init_sha256"} for the mask metadata; {} without an init file."""
    if not setup.init:
        return {}

    return {"init_file": os.path.abspath(os.fspath(setup.init)), "init_sha256": setup.init_sha256 or file_sha256(setup.init)}


# ------------------------------------------------------------------------------ steps

def load_data(setup: Setup, split: str, augment: bool = False):
    """The `split` ("train" or "test") of setup.dataset, cut to setup.max_{split}_samples."""
    limit = setup.max_train_samples if split == "train" else setup.max_test_samples
    return load_dataset(setup.dataset, split=split, data_dir=setup.data_dir, max_samples=limit, augment=augment)


def load_datasets(setup: Setup, augment: bool = False) -> Datasets:
    train_ds = load_data(setup, "train")
    return Datasets(train_ds, load_data(setup, "test"), load_data(setup, "train", augment=True) if augment else train_ds)


def build(setup: Setup, train_ds):
    """setup.model for the shapes of `train_ds`, initialised under torch.manual_seed(setup.seed),
    then loaded from setup.init if given (refused when its checksum is not setup.init_sha256)."""
    task = getattr(train_ds, "task", "classification")
    if MODEL_TASKS.get(setup.model, task) != task:
        raise RecipeError(f"model {setup.model!r} is a {MODEL_TASKS[setup.model]} network, but dataset "
                          f"{setup.dataset!r} is a {task} dataset; choose a matching pair (e.g. unet with shapes)")
    torch.manual_seed(int(setup.seed))
    model = build_model(setup.model, in_channels=train_ds.in_channels, num_classes=train_ds.num_classes,
                        image_size=train_ds.image_size)
    if setup.init:

        sha = load_init(model, setup.init)["init_sha256"]
        if setup.init_sha256 is not None and sha != setup.init_sha256:
            raise RecipeError(f"init file {setup.init!r} changed since the masks were computed (checksum {sha[:12]}, "
                              f"recorded {setup.init_sha256[:12]}); pass --init with the original file")
    return model


def prune(setup: Setup, cfg: PruneConfig, model, train_ds, quiet: bool = True):
    """widetopo.prune on the pruning set (cfg.samples drawn with setup.seed, or cfg.samples_per_class
    per class); (Masks with the recipe in .meta, seconds)."""
    seed = int(setup.seed)
    if cfg.samples_per_class:
        subset = train_ds.balanced_subset(cfg.samples_per_class, seed=seed)
    else:
        subset = train_ds.subset(min(cfg.samples, len(train_ds)), seed=seed)
    loader = data_loader(subset, batch_size=cfg.prune_batch_size, shuffle=False)
    options = {"seed": seed, "verbose": not quiet, "device": setup.device, **PRESETS[cfg.preset], **cfg.options}
    ignore = getattr(train_ds, "ignore_index", None)
    if ignore is not None and "ignore_index" in get_method(cfg.method).option_names:
        options.setdefault("ignore_index", ignore)
    options.update({k: v for k, v in cfg.engine.items() if v is not None})
    logger.info("pruning %s to density %g with %s on %d %s samples ...", setup.model, cfg.density, cfg.method,
                len(subset), setup.dataset)
    start = time.perf_counter()
    masks = api.prune(model, loader, cfg.density, method=cfg.method, **options)
    seconds = time.perf_counter() - start
    masks.meta.update({
        "model": setup.model, "dataset": setup.dataset, "seed": seed, "target_density": cfg.density,
        "in_channels": train_ds.in_channels, "num_classes": train_ds.num_classes,
        "image_size": train_ds.image_size, "pruning_samples": len(subset), "pruning_seconds": round(seconds, 3),
        "samples_per_class": cfg.samples_per_class, "max_train_samples": setup.max_train_samples,
        **init_record(setup),
    })
    masks.meta.setdefault("preset", cfg.method)
    if cfg.preset != "default":
        masks.meta["preset"] = f"{cfg.method}/{cfg.preset}"
    return masks, seconds


def train(setup: Setup, cfg: TrainConfig, model, masks, train_ds, test_ds, quiet: bool = True, label: str = "") -> dict:
    """experiments.training.fit under `masks` (None: dense), data order seeded with setup.seed;
    its result plus "seconds"."""
    train_loader = data_loader(train_ds, batch_size=cfg.batch_size, shuffle=True, seed=int(setup.seed))
    test_loader = data_loader(test_ds, batch_size=512)
    ignore = getattr(train_ds, "ignore_index", None)
    start = time.perf_counter()
    out = fit(model, train_loader, test_loader, epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum,
              weight_decay=cfg.weight_decay, schedule=cfg.schedule, masks=masks, mask_mode=cfg.mask_mode,
              device=setup.device, progress=not quiet, desc=label, **({} if ignore is None else {"ignore_index": ignore}))
    out["seconds"] = time.perf_counter() - start
    return out


@contextlib.contextmanager
def quiet_loggers(names=("widetopo.experiments.recipe", "widetopo.engine.pruner", "widetopo.experiments.training",
                          "widetopo.experiments.pretrained", "widetopo.sparsity.maskfile", "widetopo.progress")):
    """Silence the INFO lines of pruning and training (pruning done, epoch k/n) for a block whose
    own output (a progress bar, a table) they would interleave with."""
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
