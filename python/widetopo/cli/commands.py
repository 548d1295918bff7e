"""The `widetopo` command line: prune at initialization, train under a mask, report, benchmark.

    widetopo run                          # WideTopo-S at density 0.05, small CNN, digits; dense vs pruned
    widetopo prune --model resnet20 --dataset cifar10 --data-dir DIR --density 0.01 -o r20.wtm
    widetopo train r20.wtm --epochs 160 --data-dir DIR
    widetopo report r20.wtm --json r20.json --plots plots/
    widetopo compare                      # accuracy vs density of several methods (built-in demo, ~10 min)
    widetopo compare --methods snip,widetopo-s --densities 0.1,0.01 --seeds 0,1 -o results/
    widetopo bench

Global flags (-q, -v, --threads) go before or after the command.

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

logger = logging.getLogger("widetopo.cli.commands")

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


def _add_model_data(p, required_defaults: bool = True, seed: bool = True):
    d = DEFAULTS if required_defaults else {}
    dflt = "%(default)s" if required_defaults else "from the mask file (cnn / digits with --dense)"
    p.add_argument("--model", type=_choices(_model_names()), default=d.get("model"),
                   help=f"network ({', '.join(_model_names())}); default: {dflt}")
    p.add_argument("--dataset", type=_choices(_dataset_names()), default=d.get("dataset"),
                   help=f"dataset ({', '.join(_dataset_names())}); default: {dflt}")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (cifar, fashion-mnist, folder)")
    if seed:
        p.add_argument("--seed", type=int, default=None if not required_defaults else 0,
                       help="seed of the network initialization and of the pruning randomness; default: "
                            + ("%(default)s" if required_defaults else "from the mask file (0 with --dense)"))
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:N or auto; default: %(default)s")
    p.add_argument("--max-train-samples", type=_int_at_least(1), default=None, help="use only the first N training samples")
    p.add_argument("--max-test-samples", type=_int_at_least(1), default=None, help="use only the first N test samples")


def _add_prune(p, single: bool = True):
    if single:  # compare takes lists instead (--methods, --densities)
        p.add_argument("--method", type=_method, default=DEFAULTS["method"],
                       help=f"pruning method ({', '.join(_method_names())}); `widetopo methods` lists their "
                            "schedules and options; default: %(default)s")
        p.add_argument("--option", metavar="KEY=VALUE", action="append", default=[],
                       help="set a method option (repeatable), e.g. --option eps=0.01; `widetopo methods` lists them")
        p.add_argument("--density", type=_density, default=DEFAULTS["density"],
                       help="fraction of prunable weights kept, in (0, 1]; default: %(default)s")
    p.add_argument("--samples", type=_int_at_least(1), default=1000, help="pruning samples; default: %(default)s")
    p.add_argument("--samples-per-class", type=_int_at_least(1), default=None,
                   help="a class-balanced pruning set of N samples per class instead of --samples (the papers use 10)")
    p.add_argument("--prune-batch-size", type=_int_at_least(1), default=256, help="pruning batch size; default: %(default)s")
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="schedule preset of the method: default (its published CIFAR configuration) or imagenet "
                        "(WideTopo's ImageNet configuration, T = T' = 5); default: %(default)s")
    p.add_argument("--rounds", type=_int_at_least(1), default=None, help="override the preset's scoring rounds T")
    p.add_argument("--restorations", type=_int_at_least(0), default=None, help="override the preset's restorations R")
    p.add_argument("--restore-rounds", type=_int_at_least(1), default=None, help="override the preset's rounds after each restoration T'")
    p.add_argument("--restore-steps", type=_int_at_least(1), default=None, help="override the preset's restoration steps J")
    p.add_argument("--count", choices=("exact", "official"), default=None, help="exact-K (default) or the official threshold counting")


def _add_train(p, epochs_default: int, results: bool = True):
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
    if results:
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
    _add_init(p)

    p = sub.add_parser("train", help="train a network under a mask file and report accuracy",
                       description="Rebuild the network a mask file was computed for (same model, dataset and "
                                   "initialization seed, from the file's metadata unless overridden) and train it sparse.")
    p.add_argument("masks", help="mask file written by `widetopo prune` (or `--dense` to train without one)", nargs="?")
    p.add_argument("--dense", action="store_true", help="train the dense network (no mask file)")
    _add_model_data(p, required_defaults=False)
    _add_train(p, epochs_default=10)
    p.add_argument("--save-model", default=None, help="write the trained state_dict (torch.save) here")
    _add_init(p, train=True)

    p = sub.add_parser("run", help="prune, then train dense and pruned; the built-in demo without arguments",
                       description="Prune at initialization, then train the pruned network and (unless --no-dense) the "
                                   "dense network from the same initialization; print both accuracies. Without "
                                   "arguments: WideTopo-S, density 0.05, small CNN on scikit-learn digits.")
    _add_model_data(p)
    _add_prune(p)
    _add_train(p, epochs_default=10)
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("-o", "--output", default=None, help="also write the mask file here")
    _add_init(p)

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

    _add_compare_parser(sub)
    for command_parser in sub.choices.values():
        _add_global_flags(command_parser)
    return parser


# ------------------------------------------------------------------------------ parser pieces (issue 10)

def _add_global_flags(p) -> None:
    """-q/-v/--threads after the command as well; SUPPRESS keeps the values given before it."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="only results and errors; no progress bars (also accepted before the command)")
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug messages and tracebacks on errors (also accepted before the command)")
    p.add_argument("--threads", type=_threads, default=argparse.SUPPRESS,
                   help="intra-op CPU threads: a number or auto (also accepted before the command)")


def _add_init(p, train: bool = False) -> None:
    if train:
        help_text = ("start training from this state_dict file instead of the initialization the mask file records "
                     "(by default an --init file recorded in the mask file is reloaded, after checking its checksum)")
    else:
        help_text = ("load this state_dict (torch.save of a state_dict, or of a checkpoint dict holding one under "
                     "state_dict/model_state_dict/model) into the network before pruning; training starts from it too")
    p.add_argument("--init", metavar="FILE", default=None, help=help_text)


def _float_list(text: str) -> List[float]:
    values = [_density(t.strip()) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of densities in (0, 1], got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"densities repeat in {text!r}")
    return values


def _int_list(text: str) -> List[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integer seeds, got {text!r}")
    return values


def _method_variant(text: str) -> str:
    """NAME or NAME:KEY=VALUE[:KEY=VALUE...] (a method with some options set) -> canonical form."""
    from widetopo.methods import get_method
    from widetopo.options import parse_assignment

    name, *assignments = [t.strip() for t in text.split(":")]
    try:
        name = _method(name)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"invalid method {name!r} in {text!r} (choose from "
                                         f"{', '.join(_method_names())})") from None
    values = {}
    for a in assignments:
        try:
            key, value = parse_assignment([get_method(name).options], a)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
        values[key] = value
    try:
        get_method(name).make_options(**values)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return ":".join([name] + [f"{k}={v}" for k, v in values.items()])


def split_method_variant(spec: str):
    """(method name, {option: value}) of a NAME[:KEY=VALUE...] variant made by _method_variant."""
    from widetopo.methods import get_method
    from widetopo.options import parse_assignment

    name, *assignments = spec.split(":")
    return name, dict(parse_assignment([get_method(name).options], a) for a in assignments)


def _method_list(text: str) -> List[str]:
    """Comma-separated registered methods (names or aliases -> names), or all of them."""
    if text.strip().lower() == "all":
        return list(_method_names())
    values = [t.strip() for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated methods, got {text!r}")
    if any(v.lower() == "dense" for v in values):
        raise argparse.ArgumentTypeError("'dense' is always included; list pruning methods only")
    names, bad = [], []
    for v in values:
        try:
            names.append(_method_variant(v))
        except argparse.ArgumentTypeError:
            if ":" in v:
                raise  # a known method with a bad option: its own message
            bad.append(v)
    if bad:
        raise argparse.ArgumentTypeError(f"invalid method(s) {', '.join(bad)} (choose from {', '.join(_method_names())}, "
                                         "or all, each optionally as NAME:KEY=VALUE; `widetopo methods` lists them)")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"methods repeat in {text!r}")
    return names


def _add_compare_parser(sub) -> None:
    from widetopo.experiments.compare import DEFAULT_DENSITIES, DEFAULT_METHODS, DEFAULT_SEEDS

    p = sub.add_parser(
        "compare", help="accuracy vs density of several methods over seeds: results table and plots",
        description="Run every (method, density, seed) cell: prune the network initialized with the seed, train it "
                    "with one recipe shared by all methods, evaluate; train the dense network once per seed. Writes "
                    "DIR/results.csv and .json (one row per cell; the journal a rerun resumes from), DIR/accuracy.png, "
                    "DIR/node_ratio.png and DIR/masks/, and prints mean ± std per method and density. Without "
                    f"arguments: {', '.join(DEFAULT_METHODS)} at densities {', '.join(map(str, DEFAULT_DENSITIES))}, "
                    f"seeds {', '.join(map(str, DEFAULT_SEEDS))}, small CNN on scikit-learn digits, 10 epochs "
                    "(about 5 minutes on 2 CPU cores).")
    _add_model_data(p, seed=False)
    p.add_argument("--methods", type=_method_list, default=list(DEFAULT_METHODS),
                   help=f"comma-separated methods, or all ({', '.join(_method_names())}); a method with options set "
                        "is NAME:KEY=VALUE[:KEY=VALUE], e.g. px:batchnorm=eval; default: "
                        f"{','.join(DEFAULT_METHODS)}")
    p.add_argument("--densities", type=_float_list, default=list(DEFAULT_DENSITIES),
                   help=f"comma-separated densities in (0, 1]; default: {','.join(map(str, DEFAULT_DENSITIES))}")
    p.add_argument("--seeds", type=_int_list, default=list(DEFAULT_SEEDS),
                   help=f"comma-separated seeds (initialization, pruning randomness, data order); default: "
                        f"{','.join(map(str, DEFAULT_SEEDS))}")
    _add_prune(p, single=False)
    _add_train(p, epochs_default=10, results=False)
    p.add_argument("-o", "--output", default="widetopo-compare", metavar="DIR",
                   help="results folder (rerunning with the same DIR resumes); default: %(default)s")
    p.add_argument("--no-plots", action="store_true", help="skip accuracy.png and node_ratio.png")
    _add_init(p)


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
    from widetopo.models import MODEL_TASKS, build_model

    task = getattr(train_ds, "task", "classification")
    if MODEL_TASKS.get(args.model, task) != task:
        raise CLIError(f"model {args.model!r} is a {MODEL_TASKS[args.model]} network, but dataset "
                       f"{args.dataset!r} is a {task} dataset; choose a matching pair (e.g. unet with shapes)")
    torch.manual_seed(int(args.seed))
    model = build_model(args.model, in_channels=train_ds.in_channels, num_classes=train_ds.num_classes,
                        image_size=train_ds.image_size)
    _load_init(args, model)
    return model


def _prune(args, model, train_ds, quiet: bool):
    import widetopo
    from widetopo.data import data_loader

    per_class = getattr(args, "samples_per_class", None)
    if per_class:
        subset = train_ds.balanced_subset(per_class, seed=args.seed)
    else:
        subset = train_ds.subset(min(args.samples, len(train_ds)), seed=args.seed)
    n = len(subset)
    loader = data_loader(subset, batch_size=args.prune_batch_size, shuffle=False)
    options = {"seed": int(args.seed), "verbose": not quiet, "device": args.device}
    options.update(PRESETS[args.preset])
    options.update(args.method_options)
    ignore = getattr(train_ds, "ignore_index", None)
    if ignore is not None and "ignore_index" in _method_option_names(args.method):
        options.setdefault("ignore_index", ignore)
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
    if getattr(args, "_init_info", None):
        masks.meta.update(args._init_info)
    masks.meta.setdefault("preset", args.method)
    if args.preset != "default":
        masks.meta["preset"] = f"{args.method}/{args.preset}"
    return masks, seconds


def _collapsed_note(masks) -> str:
    from widetopo.sparsity.report import mask_report

    rep = mask_report(masks)
    return f"{len(rep['collapsed'])} collapsed layer(s)" + (f": {', '.join(rep['collapsed'])}" if rep["collapsed"] else "")


def _train(args, model, masks, train_ds, test_ds, quiet: bool, label: str) -> dict:
    from widetopo.data import data_loader
    from widetopo.experiments.training import fit

    train_loader = data_loader(train_ds, batch_size=args.batch_size, shuffle=True, seed=int(args.seed))
    test_loader = data_loader(test_ds, batch_size=512)
    start = time.perf_counter()
    out = fit(model, train_loader, test_loader, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
              weight_decay=args.weight_decay, schedule=args.schedule, masks=masks, mask_mode=args.mask_mode,
              device=args.device, progress=not quiet, desc=label,
              **({} if getattr(train_ds, "ignore_index", None) is None else {"ignore_index": train_ds.ignore_index}))
    out["seconds"] = time.perf_counter() - start
    return out


# ------------------------------------------------------------------------------ commands

# ------------------------------------------------------------------------------ --init, output checks, compare (issue 10)

def _load_init(args, model) -> None:
    """--init FILE: load the state_dict into the freshly built model; the file and its checksum
    go into args._init_info (and from there into the mask metadata)."""
    path = getattr(args, "init", None)
    if not path:
        return
    from widetopo.experiments.pretrained import load_init

    info = load_init(model, path)
    expected = getattr(args, "_init_expected_sha", None)
    if expected is not None and info["init_sha256"] != expected:
        raise CLIError(f"init file {path!r} changed since the masks were computed (checksum {info['init_sha256'][:12]}, "
                       f"recorded {expected[:12]}); pass --init with the original file")
    args._init_info = info


def _init_from_meta(args, meta: dict) -> None:
    """`train MASKFILE`: reload the --init file recorded in the mask file, refusing a changed one."""
    recorded = meta.get("init_file")
    if args.init is not None:
        if recorded and meta.get("init_sha256"):
            from widetopo.experiments.pretrained import file_sha256

            if os.path.isfile(args.init) and file_sha256(args.init) != meta["init_sha256"]:
                logger.warning("training from --init %s, but the masks were computed from %s (another checksum)",
                               args.init, recorded)
        return
    if not recorded:
        return
    if not os.path.isfile(recorded):
        raise CLIError(f"the masks were computed from init file {recorded!r}, which does not exist any more; "
                       "pass --init FILE to train from another state_dict")
    args.init = recorded
    args._init_expected_sha = meta.get("init_sha256")


def _check_file_writable(path, flag: str) -> None:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CLIError(f"cannot write {flag} {path!r}: it is a directory")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise CLIError(f"cannot write {flag} {path!r}: permission denied")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"cannot write {flag} {path!r}: directory {os.path.dirname(path) or parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write {flag} {path!r}: directory {parent!r} is not writable")


def _check_dir_writable(path, flag: str) -> None:
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise CLIError(f"cannot write {flag} {path!r}: {probe!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write {flag} {path!r}: directory {probe!r} is not writable")


#: command -> [(attribute, flag, kind)] of the outputs checked before any work starts
OUTPUTS = {
    "prune": [("output", "-o/--output", "file")],
    "train": [("results", "--results", "file"), ("save_model", "--save-model", "file")],
    "run": [("output", "-o/--output", "file"), ("results", "--results", "file")],
    "report": [("json", "--json", "file"), ("plots", "--plots", "dir")],
    "compare": [("output", "-o/--output", "dir")],
}


def _check_outputs(args) -> None:
    """Fail before pruning or training when an output cannot be written (naming the path)."""
    for attr, flag, kind in OUTPUTS.get(args.command, []):
        path = getattr(args, attr, None)
        if path:
            (_check_file_writable if kind == "file" else _check_dir_writable)(path, flag)
    if args.command == "compare" and args.output and os.path.exists(os.path.join(args.output, "results.json")):
        _check_file_writable(os.path.join(args.output, "results.json"), "the journal")


def cmd_compare(args, quiet: bool) -> int:
    from widetopo.experiments import compare

    cells = compare.plan(args.methods, args.densities, args.seeds)
    _out(f"widetopo compare: {', '.join(args.methods)} at densities {', '.join(f'{d:g}' for d in args.densities)}, "
         f"seeds {', '.join(map(str, args.seeds))}, on {args.model} / {args.dataset}, {args.epochs} epochs; "
         f"{len(cells)} cells (dense once per seed) -> {args.output}")
    if args.init:
        _out(f"every network starts from --init {args.init}")
    if args.init:  # checks the file and records its checksum in the journal's options before any cell runs
        from widetopo.experiments.pretrained import file_sha256, read_state_dict

        read_state_dict(args.init)
        args._init_info = {"init_file": os.path.abspath(args.init), "init_sha256": file_sha256(args.init)}
        args._init_expected_sha = args._init_info["init_sha256"]
    try:
        result = compare.run(args, cells, args.output, quiet=quiet)
    except compare.CompareError as exc:
        raise CLIError(str(exc)) from None
    rows = [r for r in result["rows"] if (r["method"], float(r["density_target"]), int(r["seed"])) in {c.key for c in cells}]
    _out(f"ran {result['ran']} cell(s) in {result['seconds']:.0f} s" + (f", {result['skipped']} already in the journal" if result["skipped"] else ""))
    _out("")
    _out(compare.summary_table(rows))
    _out("")
    for f in result.get("failed", []):
        _out(f"failed: {f['method']} d={f['density_target']:g} s{f['seed']}: {f['error']}")
    out_dir = args.output
    _out(f"wrote {os.path.join(out_dir, 'results.csv')}, {os.path.join(out_dir, 'results.json')} and "
         f"{len([c for c in cells if c.method != 'dense'])} mask files in {os.path.join(out_dir, 'masks')}")
    if not args.no_plots:
        try:
            paths = compare.save_plots(rows, out_dir)
        except ImportError as exc:
            logger.warning("%s", exc)
        else:
            _out(f"wrote {', '.join(paths)}")
    if result.get("failed"):
        print(f"widetopo compare: {len(result['failed'])} cell(s) failed (listed above and in results.json); "
              "a rerun tries them again", file=sys.stderr)
        return 1
    return 0


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
    from widetopo.sparsity.maskfile import read_header

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
        _init_from_meta(args, meta)
    train_ds = _load_data(args, "train", args.max_train_samples, augment=args.augment)
    test_ds = _load_data(args, "test", args.max_test_samples)
    model = _build(args, train_ds)
    masks = None
    if args.masks:
        from widetopo.sparsity.maskfile import load_masks

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
    from widetopo.sparsity.maskfile import load_masks, read_header
    from widetopo.sparsity.report import format_table, mask_report, plot_report, write_json

    if not os.path.isfile(args.masks):
        raise CLIError(f"mask file {args.masks!r} does not exist" if not os.path.exists(args.masks)
                       else f"{args.masks!r} is not a file")
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
    from widetopo.sparsity.selection import select_prunable
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


def _method_option_names(method: str):
    from widetopo.scores import scorer_options

    return set(scorer_options(method))


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
            "methods": cmd_methods, "compare": cmd_compare}


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
        print(f"widetopo: error: a command is required ({', '.join(COMMANDS)}); "
              "try `widetopo run` for the built-in demo", file=sys.stderr)
        return 2
    if args.quiet and args.verbose:
        parser.print_usage(sys.stderr)
        print("widetopo: error: -q/--quiet and -v/--verbose exclude each other", file=sys.stderr)
        return 2
    try:
        _parse_method_options(args)
    except (ValueError, TypeError) as exc:
        parser.print_usage(sys.stderr)
        print(f"widetopo {args.command}: error: --option: {exc}", file=sys.stderr)
        return 2
    _setup_logging(args.quiet, args.verbose)
    try:
        _check_outputs(args)
        _set_threads(args.threads)
        return COMMANDS[args.command](args, args.quiet)
    except KeyboardInterrupt:
        print("widetopo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # runtime error: one line, traceback only with --verbose
        if args.verbose:
            logger.exception("%s failed", args.command)
        message = str(exc).strip() or type(exc).__name__
        sys.stderr.write(f"widetopo {args.command}: error: {message}\n")
        sys.stderr.flush()
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
