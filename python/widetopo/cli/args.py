"""What the commands share: argument types, flag groups, their translation into the recipe's
dataclasses (widetopo.experiments.recipe), output checks, CLIError and out(). The engine flags
and method options are generated from their option dataclasses (EngineOptions, each method's
Options), so their types, checks and help texts are declared once."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import List

import torch

from widetopo import methods as registry
from widetopo.data import DATASETS
from widetopo.engine.options import EngineOptions
from widetopo.models import MODELS
from widetopo.options import parse_field
from widetopo.experiments import recipe
from widetopo.sparsity.report import PLOT_FORMATS

DEFAULTS = {"model": "cnn", "dataset": "digits", "method": "widetopo-s", "density": 0.05}


class CLIError(Exception):
    """A runtime problem to report as one line on stderr (exit status 1)."""


def add_plot_flags(p) -> None:
    """--plot-format and --dpi of the commands that draw plots."""
    p.add_argument("--plot-format", choices=PLOT_FORMATS, default="png", help="file format of the plots; default: png")
    p.add_argument("--dpi", type=_dpi, default=100, help="resolution of the plots, 10 to 1200; default: %(default)s")


def _dpi(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 10 <= value <= 1200:
        raise argparse.ArgumentTypeError(f"must be in [10, 1200], got {text}")
    return value


class UsageError(CLIError):
    """Arguments that argparse cannot check alone (e.g. a mask file or --dense): exit status 2."""


def out(text: str = "") -> None:
    """A result line on stdout (messages go to logging, on stderr)."""
    print(text, file=sys.stdout, flush=True)


# ------------------------------------------------------------------------------ argument types

def _number(text: str, kind, what: str, ok) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"density must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text}")
    return value


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        return _number(text, int, f"an integer >= {minimum}", lambda v: v >= minimum)

    parse.__name__ = f"int>={minimum}"
    return parse


def positive_float(text: str) -> float:
    return _number(text, float, "a positive number", lambda v: v > 0)


def nonneg_float(text: str) -> float:
    return _number(text, float, "a number >= 0", lambda v: v >= 0)


def device(text: str) -> str:
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


def threads(text: str):
    return text if text == "auto" else int_at_least(1)(text)


def choices(names):
    def parse(text: str) -> str:
        key = text.strip().lower()
        if key not in names:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(names)})")
        return key

    return parse


def option_type(cls, name: str):
    """The argparse type of field `name` of an options dataclass: its type hint reads the text,
    its check validates the value (the message names the option and what is allowed)."""
    def parse(text: str):
        try:
            return parse_field(cls, name, text)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name
    return parse


def model_names():
    return sorted(MODELS)


def dataset_names():
    return sorted(DATASETS)


def method_names():
    return registry.method_names()


def method(text: str) -> str:
    """A registered method name or alias -> its registered name."""
    try:
        return registry.get_method(text.strip()).name
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid choice {text!r} (choose from {', '.join(method_names())}; `widetopo methods` lists them)"
        ) from None


# ------------------------------------------------------------------------------ flag groups

def add_global_flags(p, before_command: bool = False) -> None:
    """-q/-v/--threads, before the command (with defaults) or after it (SUPPRESS keeps the values
    given before it)."""
    keep = {} if before_command else {"default": argparse.SUPPRESS}
    also = "" if before_command else " (also accepted before the command)"
    group = p.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="only results and errors; no progress bars" + also, **keep)
    group.add_argument("-v", "--verbose", action="store_true", help="debug messages and tracebacks on errors" + also, **keep)
    threads_help = ("intra-op CPU threads: a number, or auto = all cores when the machine is idle, 1 when it is busy "
                    "(oversubscribed threads slow small models down many times); default: auto") if before_command \
        else "intra-op CPU threads: a number or auto" + also
    p.add_argument("--threads", type=threads, help=threads_help, **(keep or {"default": "auto"}))


def add_model_data(p, required_defaults: bool = True, seed: bool = True) -> None:
    d = DEFAULTS if required_defaults else {}
    dflt = "%(default)s" if required_defaults else "from the mask file (cnn / digits with --dense)"
    p.add_argument("--model", type=choices(model_names()), default=d.get("model"),
                   help=f"network ({', '.join(model_names())}); default: {dflt}")
    p.add_argument("--dataset", type=choices(dataset_names()), default=d.get("dataset"),
                   help=f"dataset ({', '.join(dataset_names())}); default: {dflt}")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (cifar, fashion-mnist, folder)")
    if seed:
        p.add_argument("--seed", type=int, default=None if not required_defaults else 0,
                       help="seed of the network initialization and of the pruning randomness; default: "
                            + ("%(default)s" if required_defaults else "from the mask file (0 with --dense)"))
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or auto; default: %(default)s")
    p.add_argument("--max-train-samples", type=int_at_least(1), default=None, help="use only the first N training samples")
    p.add_argument("--max-test-samples", type=int_at_least(1), default=None, help="use only the first N test samples")


def add_engine_flags(p) -> None:
    """--rounds, --restorations, --restore-rounds, --restore-steps, --count: generated from the
    EngineOptions fields named in recipe.ENGINE_OVERRIDES (type, check and help text)."""
    fields = {f.name: f for f in dataclasses.fields(EngineOptions)}
    for name in recipe.ENGINE_OVERRIDES:
        p.add_argument("--" + name.replace("_", "-"), type=option_type(EngineOptions, name), default=None,
                       help=f"{fields[name].metadata['help']}; default: the method's preset")


def add_prune(p, single: bool = True) -> None:
    if single:  # compare takes lists instead (--methods, --densities)
        p.add_argument("--method", type=method, default=DEFAULTS["method"],
                       help=f"pruning method ({', '.join(method_names())}); `widetopo methods` lists their "
                            "schedules and options; default: %(default)s")
        p.add_argument("--option", metavar="KEY=VALUE", action="append", default=[],
                       help="set a method option (repeatable), e.g. --option eps=0.01; `widetopo methods` lists them")
        p.add_argument("--density", type=density, default=DEFAULTS["density"],
                       help="fraction of prunable weights kept, in (0, 1]; default: %(default)s")
    p.add_argument("--samples", type=int_at_least(1), default=1000, help="pruning samples; default: %(default)s")
    p.add_argument("--samples-per-class", type=int_at_least(1), default=None,
                   help="a class-balanced pruning set of N samples per class instead of --samples (the papers use 10)")
    p.add_argument("--prune-batch-size", type=int_at_least(1), default=256, help="pruning batch size; default: %(default)s")
    p.add_argument("--preset", choices=tuple(recipe.PRESETS), default="default",
                   help="schedule preset of the method: default (its published CIFAR configuration) or imagenet "
                        "(WideTopo's ImageNet configuration, T = T' = 5); default: %(default)s")
    add_engine_flags(p)


def add_train(p, epochs_default: int, results: bool = True) -> None:
    p.add_argument("--epochs", type=int_at_least(0), default=epochs_default, help="training epochs; default: %(default)s")
    p.add_argument("--batch-size", type=int_at_least(1), default=128, help="training batch size; default: %(default)s")
    p.add_argument("--lr", type=positive_float, default=0.1, help="SGD learning rate; default: %(default)s")
    p.add_argument("--momentum", type=nonneg_float, default=0.9, help="SGD momentum; default: %(default)s")
    p.add_argument("--weight-decay", type=nonneg_float, default=5e-4, help="SGD weight decay; default: %(default)s")
    p.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine",
                   help="learning-rate schedule (per batch; step: x0.1 at 50%% and 75%%); default: %(default)s")
    p.add_argument("--mask-mode", choices=("enforcer", "prune"), default="enforcer",
                   help="enforcer: plain parameters + MaskEnforcer; prune: torch.nn.utils.prune form; default: %(default)s")
    p.add_argument("--augment", action="store_true", help="random crop (+ flip for natural images) while training")
    if results:
        p.add_argument("--results", metavar="JSON", default=None, help="write the training results as JSON")


def add_init(p, train: bool = False) -> None:
    if train:
        help_text = ("start training from this state_dict file instead of the initialization the mask file records "
                     "(by default an --init file recorded in the mask file is reloaded, after checking its checksum)")
    else:
        help_text = ("load this state_dict (torch.save of a state_dict, or of a checkpoint dict holding one under "
                     "state_dict/model_state_dict/model) into the network before pruning; training starts from it too")
    p.add_argument("--init", metavar="FILE", default=None, help=help_text)


# ------------------------------------------------------------------------------ namespace -> recipe

def setup_from(args, **overrides) -> recipe.Setup:
    """The recipe's Setup from the parsed flags (`overrides` win); an --init file is read and its
    checksum recorded now, before any work."""
    return recipe.with_init_checksum(recipe.from_values(recipe.Setup, {**vars(args), **overrides}))


def prune_from(args) -> recipe.PruneConfig:
    values = {k: v for k, v in vars(args).items() if k not in ("engine", "options")}
    engine = {k: getattr(args, k) for k in recipe.ENGINE_OVERRIDES if getattr(args, k, None) is not None}
    texts = getattr(args, "option", None) or []
    options = recipe.method_options(args.method, texts) if texts else {}
    return recipe.from_values(recipe.PruneConfig, values, engine=engine, options=options)


def train_from(args) -> recipe.TrainConfig:
    return recipe.from_values(recipe.TrainConfig, vars(args))


def write_json(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=lambda o: repr(o))
        f.write("\n")
    out(f"wrote {path}")


def check_file_writable(path, flag: str) -> None:
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


def check_dir_writable(path, flag: str) -> None:
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise CLIError(f"cannot write {flag} {path!r}: {probe!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write {flag} {path!r}: directory {probe!r} is not writable")


def check_outputs(args, outputs: List[tuple]) -> None:
    """Fail before any work when an output cannot be written: outputs = [(attribute, flag, "file" | "dir")]."""
    for attr, flag, kind in outputs:
        path = getattr(args, attr, None)
        if path:
            (check_file_writable if kind == "file" else check_dir_writable)(path, flag)
