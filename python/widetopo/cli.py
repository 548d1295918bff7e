"""The `widetopo` command line: prune at initialization, train under a mask, report, benchmark.

    widetopo run                          # WideTopo-S at density 0.05, small CNN, digits; dense vs pruned
    widetopo prune --model resnet20 --dataset cifar10 --data-dir DIR --density 0.01 -o r20.wtm
    widetopo train r20.wtm --epochs 160 --data-dir DIR
    widetopo report r20.wtm --json r20.json --plots plots/
    widetopo bench

Exit status: 0 success, 1 runtime error (message on stderr), 2 usage error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional

logger = logging.getLogger("widetopo.cli")

DEFAULTS = {"model": "cnn", "dataset": "digits", "method": "widetopo-s", "density": 0.05}

#: --preset: schedule options applied on top of the method's own preset (explicit options win).
PRESETS = {"default": {}, "imagenet": {"rounds": 5, "restore_rounds": 5}}


class CLIError(Exception):
    """A runtime problem to report as one line on stderr (exit status 1)."""


# ------------------------------------------------------------------------------ argument types

def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"density must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text}")
    return value


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _device(text: str) -> str:
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but CUDA is not available (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")
    return str(dev)


def _threads(text: str):
    if text == "auto":
        return text
    return _int_at_least(1)(text)


def _set_threads(choice) -> int:
    """Apply --threads; auto -> 1 when the 1-minute load average says the cores are taken."""
    import torch

    if choice == "auto":
        cores = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0] > cores - 0.5
        except (AttributeError, OSError):  # not available on this platform
            busy = False
        if busy:
            torch.set_num_threads(1)
            logger.info("machine busy (load %.1f on %d cores): using 1 CPU thread (--threads to override)", os.getloadavg()[0], cores)
    else:
        torch.set_num_threads(int(choice))
    return torch.get_num_threads()


def _choices(names):
    def parse(text: str) -> str:
        key = text.strip().lower()
        if key not in names:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(names)})")
        return key

    return parse


# ------------------------------------------------------------------------------ parser

def _model_names():
    from widetopo.models import MODELS

    return sorted(MODELS)


def _dataset_names():
    from widetopo.data import DATASETS

    return sorted(DATASETS)


def _method_names(aliases: bool = False):
    from widetopo.methods import method_names

    return method_names(aliases=aliases)


def _method(text: str) -> str:
    """A registered method name or alias -> its registered name."""
    from widetopo.methods import get_method

    try:
        return get_method(text.strip()).name
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid choice {text!r} (choose from {', '.join(_method_names())}; `widetopo methods` lists them)"
        ) from None


def _add_model_data(p, required_defaults: bool = True):
    d = DEFAULTS if required_defaults else {}
    dflt = "%(default)s" if required_defaults else "from the mask file (cnn / digits with --dense)"
    p.add_argument("--model", type=_choices(_model_names()), default=d.get("model"),
                   help=f"network ({', '.join(_model_names())}); default: {dflt}")
    p.add_argument("--dataset", type=_choices(_dataset_names()), default=d.get("dataset"),
                   help=f"dataset ({', '.join(_dataset_names())}); default: {dflt}")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (cifar, fashion-mnist, folder)")
    p.add_argument("--seed", type=int, default=None if not required_defaults else 0,
                   help="seed of the network initialization and of the pruning randomness; default: "
                        + ("%(default)s" if required_defaults else "from the mask file (0 with --dense)"))
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:N or auto; default: %(default)s")
    p.add_argument("--max-train-samples", type=_int_at_least(1), default=None, help="use only the first N training samples")
    p.add_argument("--max-test-samples", type=_int_at_least(1), default=None, help="use only the first N test samples")


def _add_prune(p):
    p.add_argument("--method", type=_method, default=DEFAULTS["method"],
                   help=f"pruning method ({', '.join(_method_names())}); `widetopo methods` lists their "
                        "schedules and options; default: %(default)s")
    p.add_argument("--option", metavar="KEY=VALUE", action="append", default=[],
                   help="set a method option (repeatable), e.g. --option eps=0.01; `widetopo methods` lists them")
    p.add_argument("--density", type=_density, default=DEFAULTS["density"],
                   help="fraction of prunable weights kept, in (0, 1]; default: %(default)s")
    p.add_argument("--samples", type=_int_at_least(1), default=1000, help="pruning samples; default: %(default)s")
    p.add_argument("--prune-batch-size", type=_int_at_least(1), default=256, help="pruning batch size; default: %(default)s")
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="schedule preset of the method: default (its published CIFAR configuration) or imagenet "
                        "(WideTopo's ImageNet configuration, T = T' = 5); default: %(default)s")
    p.add_argument("--rounds", type=_int_at_least(1), default=None, help="override the preset's scoring rounds T")
    p.add_argument("--restorations", type=_int_at_least(0), default=None, help="override the preset's restorations R")
    p.add_argument("--restore-rounds", type=_int_at_least(1), default=None, help="override the preset's rounds after each restoration T'")
    p.add_argument("--restore-steps", type=_int_at_least(1), default=None, help="override the preset's restoration steps J")
    p.add_argument("--count", choices=("exact", "official"), default=None, help="exact-K (default) or the official threshold counting")


def _add_train(p, epochs_default: int):
    p.add_argument("--epochs", type=_int_at_least(0), default=epochs_default, help="training epochs; default: %(default)s")
    p.add_argument("--batch-size", type=_int_at_least(1), default=128, help="training batch size; default: %(default)s")
    p.add_argument("--lr", type=_positive_float, default=0.1, help="SGD learning rate; default: %(default)s")
    p.add_argument("--momentum", type=_nonneg_float, default=0.9, help="SGD momentum; default: %(default)s")
    p.add_argument("--weight-decay", type=_nonneg_float, default=5e-4, help="SGD weight decay; default: %(default)s")
    p.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine",
                   help="learning-rate schedule (per batch; step: x0.1 at 50%% and 75%%); default: %(default)s")
    p.add_argument("--mask-mode", choices=("enforcer", "prune"), default="enforcer",
                   help="enforcer: plain parameters + MaskEnforcer; prune: torch.nn.utils.prune form; default: %(default)s")
    p.add_argument("--augment", action="store_true", help="random crop (+ flip for natural images) while training")
    p.add_argument("--results", metavar="JSON", default=None, help="write the training results as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="widetopo",
        description="Foresight pruning with WideTopo: prune a network at initialization, train it sparse, report.",
        epilog="Run `widetopo run` with no arguments for the built-in demo (a few minutes on 2 CPU cores).",
    )
    from widetopo import __version__

    parser.add_argument("--version", action="version", version=f"widetopo {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only results and errors; no progress bars")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug messages and tracebacks on errors")
    parser.add_argument("--threads", type=_threads, default="auto",
                        help="intra-op CPU threads: a number, or auto = all cores when the machine is idle, 1 when "
                             "it is busy (oversubscribed threads slow small models down many times); default: auto")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a freshly initialized network and write a mask file",
                       description="Prune a freshly initialized network at initialization; write a mask file.")
    _add_model_data(p)
    _add_prune(p)
    p.add_argument("-o", "--output", default="masks.wtm", help="mask file to write; default: %(default)s")

    p = sub.add_parser("train", help="train a network under a mask file and report accuracy",
                       description="Rebuild the network a mask file was computed for (same model, dataset and "
                                   "initialization seed, from the file's metadata unless overridden) and train it sparse.")
    p.add_argument("masks", help="mask file written by `widetopo prune` (or `--dense` to train without one)", nargs="?")
    p.add_argument("--dense", action="store_true", help="train the dense network (no mask file)")
    _add_model_data(p, required_defaults=False)
    _add_train(p, epochs_default=10)
    p.add_argument("--save-model", default=None, help="write the trained state_dict (torch.save) here")

    p = sub.add_parser("run", help="prune, then train dense and pruned; the built-in demo without arguments",
                       description="Prune at initialization, then train the pruned network and (unless --no-dense) the "
                                   "dense network from the same initialization; print both accuracies. Without "
                                   "arguments: WideTopo-S, density 0.05, small CNN on scikit-learn digits.")
    _add_model_data(p)
    _add_prune(p)
    _add_train(p, epochs_default=10)
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("-o", "--output", default=None, help="also write the mask file here")

    p = sub.add_parser("report", help="per-layer density, active units and collapsed layers of a mask file",
                       description="Per-layer table of a mask file; optional JSON and PNG plots.")
    p.add_argument("masks", help="mask file")
    p.add_argument("--json", metavar="PATH", default=None, help="write the report as JSON")
    p.add_argument("--plots", metavar="DIR", default=None, help="write PNG plots (needs matplotlib) into DIR")
    p.add_argument("--model", type=_choices(_model_names()), default=None,
                   help="check the masks against this network (default: the one named in the file, if any)")

    p = sub.add_parser("methods", help="list every pruning method with its schedule, options and defaults",
                       description="Every registered pruning method: aliases, schedule defaults (rounds T, "
                                   "restorations R, steps J, rounds after each restoration T'), options with "
                                   "their defaults, and what it scores.")
    p.add_argument("--markdown", action="store_true", help="print the README's method table instead")

    p = sub.add_parser("bench", help="time one pruning round and the ops on this machine",
                       description="Time one WideTopo scoring round and the compiled ops, against plain PyTorch.")
    _add_model_data(p)
    p.add_argument("--samples", type=_int_at_least(1), default=256, help="pruning samples; default: %(default)s")
    p.add_argument("--prune-batch-size", type=_int_at_least(1), default=128, help="pruning batch size; default: %(default)s")
    p.add_argument("--ops-model", type=_choices(_model_names()), default="resnet20",
                   help="network whose parameter shapes the op timings use; default: %(default)s")
    p.add_argument("--repeat", type=_int_at_least(1), default=5, help="timing repetitions (best is reported); default: %(default)s")
    p.add_argument("--density", type=_density, default=0.05, help="mask density for the op timings; default: %(default)s")
    return parser


# ------------------------------------------------------------------------------ logging / output

def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("widetopo")
    for handler in list(root.handlers):
        if getattr(handler, "_widetopo_cli", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    handler._widetopo_cli = True
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def _out(text: str = "") -> None:
    print(text, file=sys.stdout, flush=True)


# ------------------------------------------------------------------------------ shared steps

def _load_data(args, split: str, max_samples=None, augment=False, info_only=False):
    from widetopo.data import load_dataset

    return load_dataset(args.dataset, split=split, data_dir=args.data_dir, max_samples=max_samples, augment=augment)


def _build(args, train_ds):
    import torch
    from widetopo.models import build_model

    torch.manual_seed(int(args.seed))
    return build_model(args.model, in_channels=train_ds.in_channels, num_classes=train_ds.num_classes,
                       image_size=train_ds.image_size)


def _prune(args, model, train_ds, quiet: bool):
    import widetopo
    from widetopo.data import data_loader

    n = min(args.samples, len(train_ds))
    subset = train_ds.subset(n, seed=args.seed)
    loader = data_loader(subset, batch_size=args.prune_batch_size, shuffle=False)
    options = {"seed": int(args.seed), "verbose": not quiet, "device": args.device}
    options.update(PRESETS[args.preset])
    options.update(args.method_options)
    for key in ("rounds", "restorations", "restore_rounds", "restore_steps", "count"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    logger.info("pruning %s to density %g with %s on %d %s samples ...", args.model, args.density, args.method, n, args.dataset)
    start = time.perf_counter()
    masks = widetopo.prune(model, loader, args.density, method=args.method, **options)
    seconds = time.perf_counter() - start
    masks.meta.update({
        "model": args.model, "dataset": args.dataset, "seed": int(args.seed), "target_density": args.density,
        "in_channels": train_ds.in_channels, "num_classes": train_ds.num_classes,
        "image_size": train_ds.image_size, "pruning_samples": n, "pruning_seconds": round(seconds, 3),
    })
    masks.meta.setdefault("preset", args.method)
    if args.preset != "default":
        masks.meta["preset"] = f"{args.method}/{args.preset}"
    return masks, seconds


def _collapsed_note(masks) -> str:
    from widetopo.report import mask_report

    rep = mask_report(masks)
    return f"{len(rep['collapsed'])} collapsed layer(s)" + (f": {', '.join(rep['collapsed'])}" if rep["collapsed"] else "")


def _train(args, model, masks, train_ds, test_ds, quiet: bool, label: str) -> dict:
    from widetopo.data import data_loader
    from widetopo.training import fit

    train_loader = data_loader(train_ds, batch_size=args.batch_size, shuffle=True, seed=int(args.seed))
    test_loader = data_loader(test_ds, batch_size=512)
    start = time.perf_counter()
    out = fit(model, train_loader, test_loader, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
              weight_decay=args.weight_decay, schedule=args.schedule, masks=masks, mask_mode=args.mask_mode,
              device=args.device, progress=not quiet, desc=label)
    out["seconds"] = time.perf_counter() - start
    return out


# ------------------------------------------------------------------------------ commands

def cmd_prune(args, quiet: bool) -> int:
    train_ds = _load_data(args, "train", args.max_train_samples)
    model = _build(args, train_ds)
    masks, seconds = _prune(args, model, train_ds, quiet)
    masks.save(args.output)
    _out(f"pruned {args.model} on {args.dataset} with {args.method}: density {masks.density:.6f} "
         f"({masks.kept} of {masks.numel} prunable weights) in {seconds:.1f} s; {_collapsed_note(masks)}")
    _out(f"wrote {args.output}")
    return 0


def _fill_from_meta(args, meta: dict) -> None:
    for key in ("model", "dataset"):
        if getattr(args, key) is None:
            value = meta.get(key)
            if value is None:
                raise CLIError(f"the mask file does not name a {key}; pass --{key}")
            setattr(args, key, value)
    if args.seed is None:
        args.seed = int(meta.get("seed", 0))


def cmd_train(args, quiet: bool) -> int:
    from widetopo.maskfile import read_header

    if args.dense == (args.masks is not None):
        raise CLIError("give a mask file, or --dense to train without one (not both)")
    meta = read_header(args.masks)["meta"] if args.masks else {}
    if args.dense:
        for key in ("model", "dataset"):
            if getattr(args, key) is None:
                setattr(args, key, DEFAULTS[key])
        args.seed = 0 if args.seed is None else args.seed
    else:
        _fill_from_meta(args, meta)
    train_ds = _load_data(args, "train", args.max_train_samples, augment=args.augment)
    test_ds = _load_data(args, "test", args.max_test_samples)
    model = _build(args, train_ds)
    masks = None
    if args.masks:
        from widetopo.maskfile import load_masks

        masks = load_masks(args.masks, model=model)
        if meta.get("seed") is not None and int(meta["seed"]) != int(args.seed):
            logger.warning("training from initialization seed %d, but the masks were computed for seed %s", args.seed, meta["seed"])
    label = "pruned" if masks is not None else "dense"
    out = _train(args, model, masks, train_ds, test_ds, quiet, label)
    acc = out["final"]["accuracy"]
    density = masks.density if masks is not None else 1.0
    _out(f"{label} {args.model} on {args.dataset} (density {density:.4f}), {args.epochs} epochs in {out['seconds']:.1f} s: "
         f"test accuracy {acc:.4f}")
    if args.results:
        _write_json(args.results, {"model": args.model, "dataset": args.dataset, "density": density,
                                   "epochs": args.epochs, "test_accuracy": acc, "history": out["history"], "mask_meta": meta})
    if args.save_model:
        import torch

        torch.save(model.state_dict(), args.save_model)
        _out(f"wrote {args.save_model}")
    return 0


def cmd_run(args, quiet: bool) -> int:
    train_ds = _load_data(args, "train", args.max_train_samples)
    test_ds = _load_data(args, "test", args.max_test_samples)
    train_aug = _load_data(args, "train", args.max_train_samples, augment=True) if args.augment else train_ds
    model = _build(args, train_ds)
    _out(f"widetopo run: {args.method} at density {args.density} on {args.model} / {args.dataset} "
         f"({len(train_ds)} train, {len(test_ds)} test samples), seed {args.seed}")
    masks, seconds = _prune(args, model, train_ds, quiet)
    _out(f"pruned in {seconds:.1f} s: density {masks.density:.6f} ({masks.kept} of {masks.numel} prunable weights); "
         f"{_collapsed_note(masks)}")
    if args.output:
        masks.save(args.output)
        _out(f"wrote {args.output}")
    results = {}
    runs = [("pruned", masks)] + ([] if args.no_dense else [("dense", None)])
    for label, m in runs:
        net = _build(args, train_ds)  # the same initialization the masks were computed for
        out = _train(args, net, m, train_aug, test_ds, quiet, label)
        results[label] = out
        _out(f"{label:>6}: test accuracy {out['final']['accuracy']:.4f} after {args.epochs} epochs ({out['seconds']:.1f} s)")
    _out("")
    _out(f"{'':8}{'density':>10}{'test acc':>10}")
    for label, m in runs:
        d = masks.density if m is not None else 1.0
        _out(f"{label:<8}{d:>10.4f}{results[label]['final']['accuracy']:>10.4f}")
    if args.results:
        _write_json(args.results, {
            "model": args.model, "dataset": args.dataset, "method": args.method, "density": masks.density,
            "pruning_seconds": seconds, "mask_meta": masks.meta,
            **{label: {"test_accuracy": r["final"]["accuracy"], "history": r["history"]} for label, r in results.items()},
        })
    return 0


def cmd_report(args, quiet: bool) -> int:
    from widetopo.maskfile import load_masks, read_header
    from widetopo.report import format_table, mask_report, plot_report, write_json

    meta = read_header(args.masks)["meta"]
    model = None
    name = args.model or meta.get("model")
    if name is not None and all(k in meta for k in ("in_channels", "num_classes", "image_size")):
        from widetopo.models import build_model

        size = meta["image_size"]
        model = build_model(name, in_channels=meta["in_channels"], num_classes=meta["num_classes"],
                            image_size=tuple(size) if isinstance(size, list) else size)
    elif args.model is not None:
        raise CLIError("the mask file does not record in_channels/num_classes/image_size, so --model cannot be checked")
    masks = load_masks(args.masks, model=model)
    rep = mask_report(masks, model)
    rep["file"] = os.fspath(args.masks)
    info = ", ".join(f"{k} {meta[k]}" for k in ("method", "model", "dataset", "seed") if k in meta)
    _out(f"{args.masks}: {info}")
    _out(format_table(rep))
    if args.json:
        write_json(rep, args.json)
        _out(f"wrote {args.json}")
    if args.plots:
        for path in plot_report(rep, args.plots, prefix=os.path.splitext(os.path.basename(args.masks))[0]):
            _out(f"wrote {path}")
    return 0


def _best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def cmd_bench(args, quiet: bool) -> int:
    import torch
    import widetopo
    import widetopo_ext
    from widetopo.data import data_loader
    from widetopo.models import build_model
    from widetopo.params import select_prunable
    from widetopo_ext import reference

    _out(f"widetopo bench: torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    kernels = widetopo_ext.build_info()["cpu_kernels" if args.device == "cpu" else "cuda_kernels"]

    # --- ops on the parameter shapes of a real network
    torch.manual_seed(0)
    net = build_model(args.ops_model)
    names = select_prunable(net)
    params = dict(net.named_parameters())
    gen = torch.Generator().manual_seed(0)
    tensors = [params[n].detach().to(args.device).clone() for n in names]
    masks = [(torch.rand(t.shape, generator=gen) < args.density).to(args.device) for t in tensors]
    scores = [torch.rand(t.shape, generator=gen).to(args.device) for t in tensors]
    n = sum(t.numel() for t in tensors)
    keep = int(round(args.density * n))
    cases = {
        "apply_masks_": (lambda f: f([t.clone() for t in tensors], masks)),
        "mask_stats": (lambda f: f(masks)),
        "global_threshold": (lambda f: f(scores, [m.clone() for m in masks], keep)),
        "density_decay_": (lambda f: f([s.clone() for s in scores], masks, 0.2)),
        "masked_sq_norm": (lambda f: f(tensors, masks)),
    }
    _out(f"\nops on the {len(tensors)} prunable tensors of {args.ops_model} ({n} weights), best of {args.repeat}:")
    _out(f"  {'op':<18}{'widetopo_ext':>14}{'plain PyTorch':>15}{'speedup':>9}")
    for op, call in cases.items():
        plain = _best_time(lambda: call(getattr(reference, op)), args.repeat)
        if not kernels.get(op, False):
            _out(f"  {op:<18}{'no kernel':>14}{plain * 1e3:>13.2f}ms{'':>9}")
            continue
        ours = _best_time(lambda: call(getattr(widetopo_ext, op)), args.repeat)
        _out(f"  {op:<18}{ours * 1e3:>12.2f}ms{plain * 1e3:>13.2f}ms{plain / ours:>8.2f}x")

    # --- one WideTopo scoring round, against one plain forward+backward pass over the same data
    train_ds = _load_data(args, "train", args.max_train_samples)
    torch.manual_seed(int(args.seed))
    model = build_model(args.model, in_channels=train_ds.in_channels, num_classes=train_ds.num_classes,
                        image_size=train_ds.image_size).to(args.device)
    loader = data_loader(train_ds.subset(min(args.samples, len(train_ds)), seed=args.seed), batch_size=args.prune_batch_size)
    batches = [(x.to(args.device), y.to(args.device)) for x, y in loader]

    def plain_pass():
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            torch.nn.functional.cross_entropy(model(x), y).backward()

    def one_round():
        widetopo.prune(model, batches, 0.5, method="widetopo", rounds=1, restorations=0, verbose=False,
                       seed=int(args.seed), device=args.device)

    plain_pass(), one_round()  # warm-up (first double-backward call loads lazy torch modules)
    base = _best_time(plain_pass, max(2, args.repeat // 2))
    rnd = _best_time(one_round, max(2, args.repeat // 2))
    model.zero_grad(set_to_none=True)
    nsamp = sum(x.shape[0] for x, _ in batches)
    _out(f"\none WideTopo scoring round ({args.model}, {nsamp} {args.dataset} samples, {len(batches)} batches):")
    _out(f"  widetopo round            {rnd:8.3f} s")
    _out(f"  plain forward+backward    {base:8.3f} s   (round = {rnd / base:.1f}x one training pass)")
    _out(f"  so on this pruning set: WideTopo-S (30 scoring rounds) ~{30 * rnd:.0f} s, WideTopo (150) ~{150 * rnd:.0f} s")
    return 0


def _write_json(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=lambda o: repr(o))
        f.write("\n")
    _out(f"wrote {path}")


def cmd_methods(args, quiet: bool) -> int:
    from widetopo.methods import all_methods, methods_markdown
    from widetopo.options import describe

    if args.markdown:
        _out(methods_markdown())
        return 0
    for m in all_methods():
        s = m.schedule
        schedule = f"T = {s.rounds}" + (f", R = {s.restorations} x (J = {s.restore_steps}, T' = "
                                        f"{s.restore_rounds or s.rounds})" if s.restorations else "")
        aliases = f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""
        _out(f"{m.name}{aliases}: {m.summary}")
        _out(f"    schedule: {schedule}; selection: {m.scorer.selection}"
             + ("; needs targets" if m.scorer.needs_targets else ""))
        for name, tname, default, help_text in describe(m.options):
            _out(f"    --option {name}={default!r:<10} {tname:<14} {help_text}")
    return 0


def _parse_method_options(args) -> None:
    """--option KEY=VALUE against the chosen method's options (a usage error otherwise)."""
    from widetopo.methods import get_method
    from widetopo.options import parse_assignment

    args.method_options = {}
    texts = getattr(args, "option", None) or []
    if not texts:
        return
    spec = get_method(args.method)
    for text in texts:
        key, value = parse_assignment([spec.options], text)
        args.method_options[key] = value
    spec.make_options(**args.method_options)  # validate values now, before any work


COMMANDS = {"prune": cmd_prune, "train": cmd_train, "run": cmd_run, "report": cmd_report, "bench": cmd_bench,
            "methods": cmd_methods}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `widetopo` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help/--version (0)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("widetopo: error: a command is required (prune, train, run, report, methods, bench); "
              "try `widetopo run` for the built-in demo", file=sys.stderr)
        return 2
    try:
        _parse_method_options(args)
    except (ValueError, TypeError) as exc:
        parser.print_usage(sys.stderr)
        print(f"widetopo {args.command}: error: --option: {exc}", file=sys.stderr)
        return 2
    _setup_logging(args.quiet, args.verbose)
    try:
        _set_threads(args.threads)
        return COMMANDS[args.command](args, args.quiet)
    except KeyboardInterrupt:
        print("widetopo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # runtime error: one line, traceback only with --verbose
        if args.verbose:
            logger.exception("%s failed", args.command)
        message = str(exc).strip() or type(exc).__name__
        print(f"widetopo {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
