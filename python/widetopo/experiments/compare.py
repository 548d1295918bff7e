"""Test accuracy against density, one curve per method, mean ± std over seeds (`widetopo compare`,
or `run_grid(methods, densities, seeds, out_dir, epochs=..., ...)` from Python).

The experiment of every foresight-pruning paper in one resumable command. For every cell
(method, density, seed) it prunes the network initialised with `seed`, keeps the mask file,
measures effective sparsity (widetopo.sparsity.effective), trains the pruned network from that same
initialisation with one recipe shared by all methods, and evaluates it; the dense network is
trained once per seed with the same recipe.

DIR/results.json is the journal: it holds the result-affecting options and one row per
finished cell, and is rewritten atomically (temporary file + os.replace) after every cell,
together with DIR/results.csv. A rerun skips the finished cells, so a killed run loses at most
the cell in flight; a rerun with other result-affecting options is refused (the rows would not
be comparable), while other methods, densities or seeds simply add cells.

Cells may run in parallel (workers=N: that many processes on this machine; executor="ray": Ray
tasks on a cluster; experiments.executors): only this coordinating process writes the journal,
workers return their row and write their own mask file. DIR/.lock (experiments.lock) keeps a
second run off the directory while one uses it, so no journal row is lost to a concurrent writer.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from widetopo import __version__
from widetopo.engine.rounds import NonFiniteScoresError, ZeroScoresError
from widetopo.files import atomic_write
from widetopo.experiments.recipe import (ENGINE_OVERRIDES, quiet_loggers, Datasets, PruneConfig, Recipe, Setup, TrainConfig, build,
                                         configs, load_datasets, method_options, with_init_checksum)
from widetopo.experiments.executors import check_executor, default_threads, fork_workers, local_pool, ray_tasks
from widetopo.experiments.lock import OutputLock
from widetopo.experiments.recipe import prune as prune_network
from widetopo.experiments.recipe import train as train_network
from widetopo.errors import CompareError, OutputLockedError  # noqa: F401  (raised here; importable from here too)
from widetopo.experiments.results import (  # noqa: F401  (the summary and plots; importable from here too)
    accuracy_figure, aggregate, node_ratio_figure, save_plots, summary_table)
from widetopo.methods import get_method
from widetopo.options import format_value
from widetopo.scores.differentiable import DoubleBackwardError
from widetopo.sparsity.blocks import collapsed_parts
from widetopo.sparsity.effective import effective_sparsity, input_shape_from_meta
from widetopo.sparsity.report import mask_report
from widetopo.sparsity.selection import select_prunable

logger = logging.getLogger(__name__)

JOURNAL_VERSION = 1

#: The built-in experiment of `widetopo compare` without arguments (52 cells; about 2 minutes on
#: 2 idle CPU cores, 7 when they are shared, measured; see docs/cli.md, `widetopo compare`).
DEFAULT_METHODS = ("random", "magnitude", "snip", "synflow", "widetopo-s")
DEFAULT_DENSITIES = (0.2, 0.1, 0.05, 0.02, 0.01)
DEFAULT_SEEDS = (0, 1)

#: Settings that change results (fields of the recipe's dataclasses, each engine override, the
#: init file's checksum): a journal made with other values is refused.
RESULT_OPTIONS = (
    "model", "dataset", "data_dir", "max_train_samples", "max_test_samples",
    "samples", "samples_per_class", "prune_batch_size", "preset", "rounds", "restorations", "restore_rounds", "restore_steps", "count",
    "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "mask_mode", "augment",
)

CSV_COLUMNS = (
    "method", "density_target", "kept_fraction", "effective_density", "node_ratio", "test_accuracy",
    "prune_seconds", "train_seconds", "seed", "kept", "effective", "numel", "effective_nodes", "nodes",
    "collapsed_layers", "collapsed", "epochs", "model", "dataset", "mask_file", "widetopo_version", "torch_version",
    "options_sha", "options",
)


#: The errors with which a method refuses a cell (recorded, the experiment goes on); any other
#: exception (a bug, out of memory, a RecipeError) stops the run.
REFUSALS = (ZeroScoresError, NonFiniteScoresError, DoubleBackwardError, FloatingPointError, ValueError)


@dataclass(frozen=True)
class Cell:
    """One unit of work: prune `method` to `density` at `seed` and train (method "dense": train only)."""
    method: str
    density: float
    seed: int

    @property
    def key(self) -> tuple:
        return (self.method, float(self.density), int(self.seed))

    @property
    def label(self) -> str:
        return f"dense s{self.seed}" if self.method == "dense" else f"{self.method} d={self.density:g} s{self.seed}"

    @property
    def mask_name(self) -> str:
        return f"{self.method.replace(':', '_')}-d{self.density:g}-s{self.seed}.wtm"


def plan(methods: Sequence[str], densities: Sequence[float], seeds: Sequence[int]) -> List[Cell]:
    """Seed by seed (so a partial run already covers every method): dense, then method x density."""
    cells = []
    for seed in seeds:
        cells.append(Cell("dense", 1.0, int(seed)))
        for method in methods:
            for density in densities:
                cells.append(Cell(method, float(density), int(seed)))
    return cells


# ------------------------------------------------------------------------------ options / journal

def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def result_options(recipe: Recipe) -> dict:
    """The result-affecting settings of an experiment (the journal's fingerprint)."""
    values = {**dataclasses.asdict(recipe.setup), **dataclasses.asdict(recipe.train),
              **{k: v for k, v in dataclasses.asdict(recipe.prune).items() if k not in ("engine", "options")},
              **{k: recipe.prune.engine.get(k) for k in ENGINE_OVERRIDES}}
    opts = {k: _jsonable(values[k]) for k in RESULT_OPTIONS}
    opts["init_sha256"] = recipe.setup.init_sha256
    return opts


def options_sha(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]


def versions() -> dict:
    return {"widetopo_version": __version__, "torch_version": torch.__version__}


def _differences(old: dict, new: dict) -> List[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def load_journal(out_dir, options: dict) -> List[dict]:
    """Rows of DIR/results.json; [] when there is none. Other options are a CompareError."""
    path = os.path.join(os.fspath(out_dir), "results.json")
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path} is not a readable results journal ({exc}); move it away to start over") from None
    if not isinstance(data, dict) or data.get("journal") != JOURNAL_VERSION or not isinstance(data.get("rows"), list):
        raise CompareError(f"{path} is not a widetopo compare journal (version {JOURNAL_VERSION}); move it away to start over")
    diff = _differences(data.get("options", {}), options)
    if diff:
        raise CompareError(
            f"{path} holds results made with other options ({'; '.join(diff)}); their rows would not be comparable. "
            f"Rerun with the same options, use another -o DIR, or delete the file to start over")
    old = data.get("versions", {})
    now = versions()
    if old and old != now:
        logger.warning("the journal was started with %s, this run uses %s", old, now)
    _check_rows(path, data["rows"], ROW_FIELDS, "row")
    _check_rows(path, data.get("failed", []), FAILED_FIELDS, "failed cell")
    return data["rows"]


_NUMBER = (int, float)
#: field -> (allowed types, may be None) of a journal row; checked when a journal is read back
ROW_FIELDS = {
    "method": (str, False), "density_target": (_NUMBER, False), "seed": (int, False),
    "test_accuracy": (_NUMBER, False), "kept_fraction": (_NUMBER, False), "effective_density": (_NUMBER, False),
    "node_ratio": (_NUMBER, True), "prune_seconds": (_NUMBER, False), "train_seconds": (_NUMBER, False),
    "mask_file": (str, True),
}
FAILED_FIELDS = {"method": (str, False), "density_target": (_NUMBER, False), "seed": (int, False),
                 "error": (str, False)}


def _check_rows(path: str, rows, fields: dict, what: str) -> None:
    """Every row a dict with each field of the right type, and no cell twice: a hand-edited or
    damaged journal is named row by row instead of failing later with a raw KeyError."""
    if not isinstance(rows, list):
        raise CompareError(f"{path}: the {what}s must be a list, got {type(rows).__name__}")
    seen = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise CompareError(f"{path}: {what} {i} must be an object with fields {', '.join(fields)}, "
                               f"got {type(row).__name__}")
        for field, (types, nullable) in fields.items():
            if field not in row:
                raise CompareError(f"{path}: {what} {i} has no field {field!r}; fix or delete that {what}")
            value = row[field]
            if value is None and nullable:
                continue
            if isinstance(value, bool) or not isinstance(value, types) or (
                    isinstance(value, float) and not math.isfinite(value)):
                kind = "an integer" if types is int else "a number" if types is _NUMBER else "a string"
                raise CompareError(f"{path}: {what} {i}, field {field!r} must be {kind}"
                                   f"{' or null' if nullable else ''}, got {value!r}; fix or delete that {what}")
        key = _key(row)
        if key in seen:
            raise CompareError(f"{path}: {what}s {seen[key]} and {i} are the same cell (method {key[0]}, density "
                               f"{key[1]:g}, seed {key[2]}); delete one of them")
        seen[key] = i


def load_failed(out_dir) -> List[dict]:
    """The failed cells recorded in DIR/results.json (after load_journal accepted it)."""
    path = os.path.join(os.fspath(out_dir), "results.json")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return list(json.load(f).get("failed", []))


def write_journal(out_dir, options: dict, rows: List[dict], failed: Optional[List[dict]] = None) -> None:
    """results.json (the journal) and results.csv, each replaced atomically. `failed` lists the
    cells whose method raised (method, density_target, seed, error); a rerun tries them again."""
    out_dir = os.fspath(out_dir)
    data = {"journal": JOURNAL_VERSION, "options": options, "versions": versions(), "rows": rows,
            "failed": list(failed or [])}
    atomic_write(os.path.join(out_dir, "results.json"), json.dumps(data, indent=2) + "\n", "the journal", durable=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (json.dumps(row[k], sort_keys=True) if k == "options" else row.get(k)) for k in CSV_COLUMNS})
    atomic_write(os.path.join(out_dir, "results.csv"), buf.getvalue(), "the results table", durable=True)


# ------------------------------------------------------------------------------ one cell

def parse_variant(spec: str) -> Tuple[str, dict]:
    """NAME[:KEY=VALUE...] (a method, or a method with some options set) -> (registered name,
    {option: value}), validated; ValueError naming the method or option otherwise."""
    name, *assignments = [t.strip() for t in str(spec).split(":")]
    name = get_method(name).name
    return name, method_options(name, assignments)


def variant_name(name: str, options: dict) -> str:
    """The canonical cell name of a method variant: NAME[:KEY=VALUE...]."""
    return ":".join([name] + [f"{k}={format_value(v)}" for k, v in options.items()])


def run_cell(recipe: Recipe, cell: Cell, data: Datasets, out_dir: str, options: dict,
             phase: Callable[[str], None]) -> dict:
    """Prune (unless dense), measure effective sparsity, train and evaluate one cell; the row."""
    setup = dataclasses.replace(recipe.setup, seed=cell.seed)
    train_ds, test_ds = data.train, data.test
    shape = input_shape_from_meta({"in_channels": train_ds.in_channels, "image_size": train_ds.image_size})
    model = build(setup, train_ds)
    row = {"method": cell.method, "density_target": cell.density, "seed": cell.seed}
    if cell.method == "dense":
        masks, prune_seconds, mask_file = None, 0.0, None
        params = dict(model.named_parameters())
        dense = {n: torch.ones_like(params[n], dtype=torch.bool) for n in select_prunable(model)}
        eff = effective_sparsity(model, dense, shape)["total"]
    else:  # a method, or a variant NAME:KEY=VALUE... with some of its options set
        method, method_opts = parse_variant(cell.method)
        cfg = dataclasses.replace(recipe.prune, method=method, options=method_opts, density=cell.density)
        phase("prune")
        masks, prune_seconds = prune_network(setup, cfg, model, train_ds, quiet=True)
        mask_file = os.path.join("masks", cell.mask_name)
        masks.save(os.path.join(out_dir, mask_file))
        phase("effective sparsity")
        eff = effective_sparsity(model, masks, shape)["total"]
    phase("train")
    net = build(setup, train_ds)  # the same initialisation the masks were computed for
    out = train_network(setup, recipe.train, net, masks, data.train_aug, test_ds, quiet=True, label=cell.label)
    if masks is not None:
        collapsed, parts = len(mask_report(masks)["collapsed"]), "; ".join(collapsed_parts(masks, model))
    else:
        collapsed, parts = 0, ""
    row.update({
        "kept_fraction": eff["density"], "effective_density": eff["effective_density"], "node_ratio": eff["node_ratio"],
        "test_accuracy": out["final"]["accuracy"], "prune_seconds": round(prune_seconds, 3),
        "train_seconds": round(out["seconds"], 3), "kept": eff["kept"], "effective": eff["effective"],
        "numel": eff["numel"], "effective_nodes": eff["effective_nodes"], "nodes": eff["nodes"],
        "collapsed_layers": collapsed, "collapsed": parts, "epochs": recipe.train.epochs, "model": setup.model,
        "dataset": setup.dataset,
        "mask_file": mask_file, **versions(), "options_sha": options_sha(options), "options": options,
    })
    return row


# ------------------------------------------------------------------------------ the experiment

def _key(row: dict) -> tuple:
    return (row["method"], float(row["density_target"]), int(row["seed"]))


class _Progress:
    """The progress bar (cells done; running and failed ones in its postfix) or, off a terminal,
    one log line per finished cell; the coordinator's view of every running cell and phase."""

    def __init__(self, total: int, done: int, quiet: bool):
        self.total, self.done, self.failed = total, done, 0
        self.running: Dict[tuple, str] = {}
        self.bar = tqdm(total=total, initial=done, desc="compare", unit="cell", dynamic_ncols=True,
                        disable=quiet or not sys.stderr.isatty(), file=sys.stderr)

    def _postfix(self, refresh: bool = True) -> None:
        self.bar.set_postfix_str(f"{len(self.running)} running, {self.failed} failed: " + "; ".join(self.running.values())
                                 if self.running else f"{self.failed} failed", refresh=refresh)

    def phase(self, cell: Cell, name: Optional[str]) -> None:
        self.running[cell.key] = cell.label if name is None else f"{cell.label}: {name}"
        self._postfix()

    def finish(self, cell: Cell, message: str, failed: bool) -> None:
        self.running.pop(cell.key, None)
        self.done += 1
        self.failed += failed
        self._postfix(refresh=False)
        self.bar.update(1)
        counts = f"[{self.done}/{self.total}, {len(self.running)} running, {self.failed} failed]"
        if failed:
            logger.warning("%s %s failed: %s", counts, cell.label, message)
        elif self.bar.disable:
            logger.info("%s %s", counts, message)
        else:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def run(recipe: Recipe, cells: List[Cell], out_dir, *, quiet: bool = False, data: Optional[Datasets] = None,
        workers: int = 1, executor: str = "local", address: Optional[str] = None,
        threads_per_worker: Optional[int] = None) -> dict:
    """Run every unfinished cell, journaling after each; returns {"rows" (the whole journal),
    "grid_rows" (those of `cells`), "ran", "skipped", "seconds", "options", "failed"}.

    `data`: the loaded datasets (loaded here from recipe.setup when None; with workers, each
    worker loads its own, and a given `data` is sent to every worker). `workers`: cells run at
    once; 1 with executor "local" runs them in this process, more in that many worker processes
    (experiments.executors.local_pool), each with `threads_per_worker` CPU threads (default
    cores // workers) and, when recipe.setup.device is "cuda", its own GPU round-robin.
    executor "ray": Ray tasks, at most `workers` at once, on the cluster at `address` (None:
    the Ray of this process, RAY_ADDRESS or a new local one); the output directory (and the
    data) must then be on storage every node sees. Rows are identical whichever runs them.
    The directory is locked (DIR/.lock) for the run: a second run on it raises OutputLockedError.
    """
    check_executor(workers, executor, address, threads_per_worker)
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "masks"), exist_ok=True)
    recipe = dataclasses.replace(recipe, setup=with_init_checksum(recipe.setup))
    options = result_options(recipe)
    with OutputLock(out_dir):
        return _run_locked(recipe, cells, out_dir, options, quiet=quiet, data=data, workers=workers,
                           executor=executor, address=address, threads_per_worker=threads_per_worker)


def _run_locked(recipe: Recipe, cells: List[Cell], out_dir: str, options: dict, *, quiet, data, workers, executor,
                address, threads_per_worker) -> dict:
    rows = load_journal(out_dir, options)
    done = {_key(r) for r in rows}
    todo = [c for c in cells if c.key not in done]
    skipped = len(cells) - len(todo)
    if skipped:
        logger.info("resuming %s: %d of %d cells already finished", out_dir, skipped, len(cells))
    parallel = executor != "local" or workers > 1
    if todo and data is None and (not parallel or (executor == "local" and fork_workers())):
        data = load_datasets(recipe.setup, augment=recipe.train.augment)  # forked workers inherit it
    progress = _Progress(len(cells), skipped, quiet)
    started = time.perf_counter()
    retried = {c.key for c in todo}
    # failures of earlier runs stay recorded unless this run tries that cell again
    failed: List[dict] = [f for f in load_failed(out_dir) if _key(f) not in retried]
    # this run's rows and failures are kept in plan order whatever order the workers finish in,
    # so a journal written with workers reads like one written a cell at a time
    order = {c.key: i for i, c in enumerate(todo)}
    old_rows, old_failed = len(rows), len(failed)

    def record(items: List[dict], start: int, item: dict) -> None:
        items.append(item)
        items[start:] = sorted(items[start:], key=lambda r: order[_key(r)])

    def handle(event: tuple) -> None:
        kind, cell, payload = event
        if kind == "start":
            progress.phase(cell, None)
            logger.debug("%s: started on %s", cell.label, payload)
        elif kind == "phase":
            progress.phase(cell, payload)
        elif kind == "retry":
            logger.warning("%s: %s; running it once more", cell.label, payload)
        elif kind in ("refused", "failed"):  # recorded, the experiment goes on
            record(failed, old_failed,
                   {"method": cell.method, "density_target": cell.density, "seed": cell.seed, "error": payload})
            write_journal(out_dir, options, rows, failed)
            progress.finish(cell, payload, failed=True)
        elif kind == "done":
            row = payload
            record(rows, old_rows, row)
            write_journal(out_dir, options, rows, failed)
            ratio = "-" if row["node_ratio"] is None else f"{row['node_ratio']:.3f}"
            progress.finish(cell, f"{cell.label}: test accuracy {row['test_accuracy']:.4f}, effective density "
                                  f"{row['effective_density']:.4f}, node ratio {ratio}", failed=False)

    try:
        with quiet_loggers():
            if not parallel:
                for cell in todo:
                    handle(("start", cell, "this process"))
                    try:
                        row = run_cell(recipe, cell, data, out_dir, options, lambda name, c=cell: handle(("phase", c, name)))
                    except REFUSALS as exc:  # the method refused this cell (e.g. all-zero scores)
                        handle(("refused", cell, f"{type(exc).__name__}: {exc}"))
                        continue
                    handle(("done", cell, row))
            elif todo:
                threads = threads_per_worker or (default_threads(workers) if executor == "local" else 1)
                if executor == "local":
                    events = local_pool(recipe, todo, out_dir, options, workers=workers, threads=threads, data=data)
                else:
                    events = ray_tasks(recipe, todo, out_dir, options, workers=workers, threads=threads,
                                       address=address, data=data)
                with contextlib.closing(events):
                    for event in events:
                        handle(event)
    finally:
        progress.close()
    if not todo:
        write_journal(out_dir, options, rows, failed)  # (re)writes the CSV even when nothing ran
    keys = {c.key for c in cells}
    return {"rows": rows, "grid_rows": [r for r in rows if _key(r) in keys], "ran": len(todo), "skipped": skipped,
            "seconds": time.perf_counter() - started, "options": options,
            "failed": [f for f in failed if _key(f) in retried]}


def run_grid(methods: Sequence[str] = DEFAULT_METHODS, densities: Sequence[float] = DEFAULT_DENSITIES,
             seeds: Sequence[int] = DEFAULT_SEEDS, out_dir="widetopo-compare", *, setup: Optional[Setup] = None,
             prune: Optional[PruneConfig] = None, train: Optional[TrainConfig] = None, quiet: bool = True,
             data: Optional[Datasets] = None, workers: int = 1, executor: str = "local",
             address: Optional[str] = None, threads_per_worker: Optional[int] = None, **settings) -> dict:
    """The experiment from Python: every (method, density, seed) cell plus dense once per seed,
    journaled in out_dir (resumable, see the module docstring); returns run()'s dict.

    workers, executor ("local" or "ray"), address, threads_per_worker: where the cells run (see
    run()); the rows are the same whichever runs them.

    methods: registered names or aliases, each optionally NAME:KEY=VALUE[:KEY=VALUE] (a variant
    with some options set); settings: fields of Setup, PruneConfig or TrainConfig by name
    (model="mlp", epochs=1, max_train_samples=96, rounds=2, ...), over `setup`/`prune`/`train`.
    """
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods must be a non-empty list of method names, got {methods!r}")
    names = [variant_name(*parse_variant(m)) for m in methods]
    if "dense" in names or len(set(names)) != len(names):
        raise ValueError(f"methods must be distinct pruning methods ('dense' is always included), got {list(methods)}")
    for d in densities:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ValueError(f"densities must be numbers in (0, 1], got {d!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct integers, got {list(seeds)!r}")
    if not densities or len(set(densities)) != len(densities):
        raise ValueError(f"densities must be distinct, got {list(densities)!r}")
    check_executor(workers, executor, address, threads_per_worker)
    setup, prune, train = configs(setup, prune, train, **settings)
    return run(Recipe(setup, prune, train), plan(names, densities, seeds), out_dir, quiet=quiet, data=data,
               workers=workers, executor=executor, address=address, threads_per_worker=threads_per_worker)

