"""`widetopo compare`: accuracy vs density of several methods over seeds, a thin layer over
widetopo.experiments.compare.run_grid (results table, journal and plots)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List

from widetopo.cli import args as cli_args
from widetopo.cli.args import CLIError, out
from widetopo.experiments import compare

logger = logging.getLogger(__name__)

OUTPUTS = [("output", "-o/--output", "dir")]


def density_list(text: str) -> List[float]:
    values = [cli_args.density(t.strip()) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of densities in (0, 1], got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"densities repeat in {text!r}")
    return values


def seed_list(text: str) -> List[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integer seeds, got {text!r}")
    return values


def method_variant(text: str) -> str:
    """NAME or NAME:KEY=VALUE[:KEY=VALUE...] (a method with some options set) -> canonical form."""
    name = text.split(":")[0].strip()
    try:
        cli_args.method(name)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"invalid method {name!r} in {text!r} (choose from "
                                         f"{', '.join(cli_args.method_names())})") from None
    try:
        return compare.variant_name(*compare.parse_variant(text))
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def method_list(text: str) -> List[str]:
    """Comma-separated registered methods (names or aliases -> names, variants allowed), or all."""
    if text.strip().lower() == "all":
        return list(cli_args.method_names())
    values = [t.strip() for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated methods, got {text!r}")
    if any(v.lower() == "dense" for v in values):
        raise argparse.ArgumentTypeError("'dense' is always included; list pruning methods only")
    names, bad = [], []
    for v in values:
        try:
            names.append(method_variant(v))
        except argparse.ArgumentTypeError:
            if ":" in v:
                raise  # a known method with a bad option: its own message
            bad.append(v)
    if bad:
        raise argparse.ArgumentTypeError(f"invalid method(s) {', '.join(bad)} (choose from "
                                         f"{', '.join(cli_args.method_names())}, or all, each optionally as "
                                         "NAME:KEY=VALUE; `widetopo methods` lists them)")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"methods repeat in {text!r}")
    return names


def add_parser(sub) -> None:
    methods, densities, seeds = compare.DEFAULT_METHODS, compare.DEFAULT_DENSITIES, compare.DEFAULT_SEEDS
    p = sub.add_parser(
        "compare", help="accuracy vs density of several methods over seeds: results table and plots",
        description="Run every (method, density, seed) cell: prune the network initialized with the seed, train it "
                    "with one recipe shared by all methods, evaluate; train the dense network once per seed. Writes "
                    "DIR/results.csv and .json (one row per cell; the journal a rerun resumes from), DIR/accuracy.png, "
                    "DIR/node_ratio.png and DIR/masks/, and prints mean ± std per method and density. Without "
                    f"arguments: {', '.join(methods)} at densities {', '.join(map(str, densities))}, "
                    f"seeds {', '.join(map(str, seeds))}, small CNN on scikit-learn digits, 10 epochs "
                    "(about 2 minutes on 2 idle CPU cores).")
    cli_args.add_model_data(p, seed=False)
    p.add_argument("--methods", type=method_list, default=list(methods),
                   help=f"comma-separated methods, or all ({', '.join(cli_args.method_names())}); a method with options "
                        f"set is NAME:KEY=VALUE[:KEY=VALUE], e.g. px:batchnorm=eval; default: {','.join(methods)}")
    p.add_argument("--densities", type=density_list, default=list(densities),
                   help=f"comma-separated densities in (0, 1]; default: {','.join(map(str, densities))}")
    p.add_argument("--seeds", type=seed_list, default=list(seeds),
                   help=f"comma-separated seeds (initialization, pruning randomness, data order); default: "
                        f"{','.join(map(str, seeds))}")
    cli_args.add_prune(p, single=False)
    cli_args.add_train(p, epochs_default=10, results=False)
    p.add_argument("-o", "--output", default="widetopo-compare", metavar="DIR",
                   help="results folder (rerunning with the same DIR resumes); default: %(default)s")
    p.add_argument("--no-plots", action="store_true", help="skip the plots accuracy.<fmt> and node_ratio.<fmt>")
    g = p.add_argument_group("parallel cells (results are identical to one cell at a time)")
    g.add_argument("--workers", type=cli_args.int_at_least(1), default=1, metavar="N",
                   help="cells run at once: N worker processes on this machine (each with its own GPU, round-robin, "
                        "with --device cuda), or N Ray tasks with --executor ray; default: %(default)s (in this process)")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: worker processes on this machine; ray: Ray tasks, one GPU each when the cluster has "
                        "GPUs (pip install \"widetopo[ray]\"; -o DIR and --data-dir on storage every node sees); "
                        "default: %(default)s")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="the Ray cluster to use with --executor ray (e.g. ray://head:10001 or auto); default: RAY_ADDRESS, "
                        "else a new local Ray")
    g.add_argument("--worker-threads", type=cli_args.int_at_least(1), default=None, metavar="T",
                   help="CPU threads of each worker; default: cores // N for local workers, 1 per Ray task")
    cli_args.add_plot_flags(p)
    cli_args.add_init(p)


def run(args, quiet: bool) -> int:
    out_dir = args.output
    if args.address is not None and args.executor != "ray":
        raise cli_args.UsageError("--address is the address of a Ray cluster: it needs --executor ray")
    journal = os.path.join(out_dir, "results.json")
    if os.path.exists(journal):
        cli_args.check_file_writable(journal, "the journal")
    n_cells = len(compare.plan(args.methods, args.densities, args.seeds))
    out(f"widetopo compare: {', '.join(args.methods)} at densities {', '.join(f'{d:g}' for d in args.densities)}, "
        f"seeds {', '.join(map(str, args.seeds))}, on {args.model} / {args.dataset}, {args.epochs} epochs; "
        f"{n_cells} cells (dense once per seed) -> {out_dir}")
    if args.init:
        out(f"every network starts from --init {args.init}")
    if args.executor == "ray" or args.workers > 1:
        threads = args.worker_threads or (compare.default_threads(args.workers) if args.executor == "local" else 1)
        where = "worker processes" if args.executor == "local" else "Ray tasks"
        out(f"{args.workers} {where} at once, {threads} CPU thread(s) each")
    setup = cli_args.setup_from(args)  # reads the --init file and records its checksum before any cell runs
    try:
        result = compare.run_grid(args.methods, args.densities, args.seeds, out_dir, setup=setup,
                                  prune=cli_args.prune_from(args), train=cli_args.train_from(args), quiet=quiet,
                                  workers=args.workers, executor=args.executor, address=args.address,
                                  threads_per_worker=args.worker_threads)
    except compare.CompareError as exc:
        raise CLIError(str(exc)) from None
    rows = result["grid_rows"]
    out(f"ran {result['ran']} cell(s) in {result['seconds']:.0f} s"
        + (f", {result['skipped']} already in the journal" if result["skipped"] else ""))
    out("")
    out(compare.summary_table(rows))
    out("")
    for f in result["failed"]:
        out(f"failed: {f['method']} d={f['density_target']:g} s{f['seed']}: {f['error']}")
    masks = len([r for r in rows if r["method"] != "dense"])
    out(f"wrote {os.path.join(out_dir, 'results.csv')}, {os.path.join(out_dir, 'results.json')} and "
        f"{masks} mask files in {os.path.join(out_dir, 'masks')}")
    if not args.no_plots:
        try:
            paths = compare.save_plots(rows, out_dir, fmt=args.plot_format, dpi=args.dpi)
        except ImportError as exc:
            logger.warning("%s", exc)
        else:
            out(f"wrote {', '.join(paths)}")
    if result["failed"]:
        print(f"widetopo compare: {len(result['failed'])} cell(s) failed (listed above and in results.json); "
              "a rerun tries them again", file=sys.stderr)
        return 1
    return 0
