"""The `widetopo` command line: prune at initialization, train under a mask, report, benchmark.

    widetopo run                          # WideTopo-S at density 0.05, small CNN, digits; dense vs pruned
    widetopo prune --model resnet20 --dataset cifar10 --data-dir DIR --density 0.01 -o r20.wtm
    widetopo train r20.wtm --epochs 160 --data-dir DIR
    widetopo report r20.wtm --json r20.json --plots plots/
    widetopo compare                      # accuracy vs density of several methods (built-in demo, about 7 min)
    widetopo compare --methods snip,widetopo-s --densities 0.1,0.01 --seeds 0,1 -o results/
    widetopo spectrum r20.wtm --dense -o spectrum.png
    widetopo bench

One module per command (cli/prune.py, train.py, run.py, report.py, methods.py, bench.py,
compare.py, spectrum.py: add_parser, OUTPUTS, run), the shared flags in cli/args.py, and the work itself in
the library (widetopo.experiments.recipe, widetopo.experiments.compare). Global flags (-q, -v,
--threads) go before or after the command.

Exit status: 0 success, 1 runtime error (message on stderr), 2 usage error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

import torch

from widetopo import __version__
from widetopo.cli import args as cli_args
from widetopo.cli import bench, compare, methods, prune, report, run, spectrum, train
from widetopo.experiments.recipe import method_options

__all__ = ["main", "build_parser", "COMMANDS"]

logger = logging.getLogger(__name__)

#: command name -> its module (add_parser(sub), OUTPUTS, run(args, quiet) -> exit status)
COMMANDS = {"prune": prune, "train": train, "run": run, "report": report, "methods": methods, "bench": bench,
            "compare": compare, "spectrum": spectrum}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="widetopo",
        description="Foresight pruning with WideTopo: prune a network at initialization, train it sparse, report.",
        epilog="Run `widetopo run` with no arguments for the built-in demo (about 11 s on 2 CPU cores).",
    )
    parser.add_argument("--version", action="version", version=f"widetopo {__version__}")
    cli_args.add_global_flags(parser, before_command=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    for command_parser in sub.choices.values():
        cli_args.add_global_flags(command_parser)
    return parser


def _setup_logging(quiet: bool, verbose: bool):
    """Messages of the `widetopo` loggers to stderr for one command; returns the function that
    puts the loggers back as they were (main() called in-process must leave no handler behind
    on a stream that may be closed later)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("widetopo")
    saved = (root.level, root.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False

    def restore() -> None:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]

    return restore


def _set_threads(choice) -> int:
    """Apply --threads; auto -> 1 when the 1-minute load average says the cores are taken."""
    if choice == "auto":
        cores = os.cpu_count() or 1
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # not available on this platform
            load = 0.0
        if load > cores - 0.5:
            torch.set_num_threads(1)
            logger.info("machine busy (load %.1f on %d cores): using 1 CPU thread (--threads to override)", load, cores)
    else:
        torch.set_num_threads(int(choice))
    return torch.get_num_threads()


def _usage_error(parser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(message, file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `widetopo` console script and `python -m widetopo`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help/--version (0)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        return _usage_error(parser, f"widetopo: error: a command is required ({', '.join(COMMANDS)}); "
                                    "try `widetopo run` for the built-in demo")
    if args.quiet and args.verbose:
        return _usage_error(parser, "widetopo: error: -q/--quiet and -v/--verbose exclude each other")
    if getattr(args, "option", None):
        try:
            method_options(args.method, args.option)  # checked here so a bad --option is a usage error
        except (ValueError, TypeError) as exc:
            return _usage_error(parser, f"widetopo {args.command}: error: --option: {exc}")
    restore_logging = _setup_logging(args.quiet, args.verbose)
    try:
        return _run(parser, args)
    finally:
        restore_logging()


def _run(parser, args) -> int:
    command = COMMANDS[args.command]
    try:
        cli_args.check_outputs(args, command.OUTPUTS)
        if getattr(command, "COMPUTES", True) or args.threads != "auto":
            _set_threads(args.threads)
        return command.run(args, args.quiet)
    except cli_args.UsageError as exc:
        return _usage_error(parser, f"widetopo {args.command}: error: {exc}")
    except KeyboardInterrupt:
        print("widetopo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `widetopo methods | head`: the reader left; no message, like other tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush cannot fail again
        return 128 + 13  # SIGPIPE, as a shell reports a command killed by it
    except Exception as exc:  # runtime error: one line, traceback only with --verbose
        if args.verbose:
            logger.exception("%s failed", args.command)
        message = str(exc).strip() or type(exc).__name__
        sys.stderr.write(f"widetopo {args.command}: error: {message}\n")
        sys.stderr.flush()
        return 1
