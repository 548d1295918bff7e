"""`widetopo train`: rebuild the network a mask file was computed for and train it sparse (or dense)."""
from __future__ import annotations

import logging
import os

import torch

from widetopo.cli import args as cli_args
from widetopo.cli.args import DEFAULTS, CLIError, UsageError, out
from widetopo.experiments import recipe
from widetopo.experiments.pretrained import file_sha256
from widetopo.sparsity.maskfile import load_masks, read_header

logger = logging.getLogger(__name__)

OUTPUTS = [("results", "--results", "file"), ("save_model", "--save-model", "file")]


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a network under a mask file and report accuracy",
                       description="Rebuild the network a mask file was computed for (same model, dataset and "
                                   "initialization seed, from the file's metadata unless overridden) and train it sparse.")
    p.add_argument("masks", help="mask file written by `widetopo prune` (or `--dense` to train without one)", nargs="?")
    p.add_argument("--dense", action="store_true", help="train the dense network (no mask file)")
    cli_args.add_model_data(p, required_defaults=False)
    cli_args.add_train(p, epochs_default=10)
    p.add_argument("--save-model", default=None, help="write the trained state_dict (torch.save) here")
    cli_args.add_init(p, train=True)


def _from_meta(args, meta: dict) -> dict:
    """model, dataset and seed from the flags, else from the mask file's metadata."""
    values = {}
    for key in ("model", "dataset"):
        values[key] = getattr(args, key) if getattr(args, key) is not None else meta.get(key)
        if values[key] is None:
            raise CLIError(f"the mask file does not name a {key}; pass --{key}")
    values["seed"] = int(meta.get("seed", 0)) if args.seed is None else args.seed
    return values


def _init_from_meta(args, meta: dict) -> dict:
    """The init file to train from: --init, else the one recorded in the mask file (refused when
    it is gone; its recorded checksum is checked when it is loaded)."""
    recorded = meta.get("init_file")
    if args.init is not None:
        if recorded and meta.get("init_sha256"):
            if os.path.isfile(args.init) and file_sha256(args.init) != meta["init_sha256"]:
                logger.warning("training from --init %s, but the masks were computed from %s (another checksum)",
                               args.init, recorded)
        return {}
    if not recorded:
        return {}
    if not os.path.isfile(recorded):
        raise CLIError(f"the masks were computed from init file {recorded!r}, which does not exist any more; "
                       "pass --init FILE to train from another state_dict")
    return {"init": recorded, "init_sha256": meta.get("init_sha256")}


def run(args, quiet: bool) -> int:
    if args.dense == (args.masks is not None):
        raise UsageError("give a mask file, or --dense to train without one (not both)")
    meta = read_header(args.masks)["meta"] if args.masks else {}
    if args.dense:
        values = {key: getattr(args, key) or DEFAULTS[key] for key in ("model", "dataset")}
        values["seed"] = 0 if args.seed is None else args.seed
    else:
        values = {**_from_meta(args, meta), **_init_from_meta(args, meta)}
    setup, tcfg = cli_args.setup_from(args, **values), cli_args.train_from(args)
    train_ds = recipe.load_data(setup, "train", augment=tcfg.augment)
    test_ds = recipe.load_data(setup, "test")
    model = recipe.build(setup, train_ds)
    masks = None
    if args.masks:
        masks = load_masks(args.masks, model=model)
        if meta.get("seed") is not None and int(meta["seed"]) != int(setup.seed):
            logger.warning("training from initialization seed %d, but the masks were computed for seed %s",
                           setup.seed, meta["seed"])
    label = "pruned" if masks is not None else "dense"
    result = recipe.train(setup, tcfg, model, masks, train_ds, test_ds, quiet, label)
    acc = result["final"]["accuracy"]
    density = masks.density if masks is not None else 1.0
    out(f"{label} {setup.model} on {setup.dataset} (density {density:.4f}), {tcfg.epochs} epochs in "
        f"{result['seconds']:.1f} s: test accuracy {acc:.4f}")
    if args.results:
        cli_args.write_json(args.results, {"model": setup.model, "dataset": setup.dataset, "density": density,
                                           "epochs": tcfg.epochs, "test_accuracy": acc, "history": result["history"],
                                           "mask_meta": meta})
    if args.save_model:
        torch.save(model.state_dict(), args.save_model)
        out(f"wrote {args.save_model}")
    return 0
