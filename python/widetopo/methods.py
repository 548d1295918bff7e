"""The method registry: every pruning method declared once.

A `Method` names the scorer class (whose `Options` dataclass holds the method's options with
their defaults, types and validation, and whose `selection` says how masks are chosen) and the
schedule defaults of the published configuration. `widetopo.prune`, `widetopo.saliency`, the
CLI (`widetopo methods`, `--method`, `--option key=value`), the mask metadata, the checkpoint
fingerprint and the README's method table all read this table.

Adding a method to widetopo: a scorer module (a Scorer subclass with an Options dataclass), one
entry in `_registry()` below, and one test file.

Adding a method from outside (a plug-in, an experiment, a test):

    widetopo.register_method("half", HalfScorer, widetopo.Schedule(rounds=1), "keeps |theta| per layer")
    masks = widetopo.prune(model, loader, 0.1, method="half", scale=2.0)
    widetopo.unregister_method("half")

`register_method` validates the entry (a Scorer subclass with an Options dataclass, a new name
and new aliases, a valid schedule) before anything is added; `unregister_method` removes a
method added that way (the built-in ones cannot be removed).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Type

from widetopo.engine.options import EngineOptions
from widetopo.options import Options, as_dict, describe
from widetopo.scores.base import Scorer

__all__ = ["Method", "Schedule", "get_method", "method_names", "all_methods", "methods_markdown",
           "register_method", "unregister_method"]


@dataclass(frozen=True)
class Schedule:
    """Schedule defaults of a method (each overridable by the engine option of the same name):
    T rounds from density 1 to d*, then R restorations of J steps, each followed by T' rounds.
    A field left out takes the engine's default (EngineOptions, where they are declared)."""

    rounds: int = EngineOptions.rounds
    restorations: int = EngineOptions.restorations
    restore_steps: int = EngineOptions.restore_steps
    restore_rounds: Optional[int] = EngineOptions.restore_rounds  # None: T' = T

    def options(self) -> Dict[str, object]:
        """The schedule as engine option keywords."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Method:
    name: str
    scorer: Type[Scorer]
    schedule: Schedule
    summary: str
    aliases: Tuple[str, ...] = ()

    @property
    def options(self) -> Type[Options]:
        return self.scorer.Options

    @property
    def option_names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options))

    def make_options(self, **values) -> Options:
        """The method's options with `values` overriding the defaults (validated)."""
        allowed = self.option_names
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for method {self.name!r}; "
                f"its options are: {', '.join(allowed) if allowed else 'none'}"
            )
        return self.options(**values)

    def make_scorer(self, options: Optional[Options] = None, **values) -> Scorer:
        if options is not None and values:
            raise TypeError("make_scorer: pass either an options object or keywords, not both")
        scorer = self.scorer(options if options is not None else self.make_options(**values))
        scorer.name = self.name
        return scorer

    def defaults(self) -> Dict[str, object]:
        return as_dict(self.options())


def _registry() -> List[Method]:
    from widetopo.scores.baselines import MagnitudeScorer, RandomScorer, SNIPScorer, SynFlowScorer
    from widetopo.scores.erk import ERKMagnitudeScorer, ERKRandomScorer
    from widetopo.scores.grasp import GraSPScorer
    from widetopo.scores.iter_snip import IterSNIPScorer
    from widetopo.scores.npb import NPBScorer
    from widetopo.scores.ntksap import NTKSAPScorer
    from widetopo.scores.pags import PAGSScorer
    from widetopo.scores.phew import PHEWScorer
    from widetopo.scores.prospr import ProsPrScorer
    from widetopo.scores.px import PXScorer
    from widetopo.scores.rreg import RRegScorer
    from widetopo.scores.synflow_l2 import SynFlowL2Scorer
    from widetopo.scores.widetopo import WideTopoScorer

    return [
        Method("widetopo", WideTopoScorer, Schedule(rounds=50, restorations=2, restore_steps=50, restore_rounds=50),
               "mu1*NTK-trace + mu2*ITA, density-aware decay, repeated mask restoration"),
        Method("widetopo-s", WideTopoScorer, Schedule(rounds=10, restorations=2, restore_steps=50, restore_rounds=10),
               "WideTopo with the short schedule", aliases=("widetopo_s",)),
        Method("px", PXScorer, Schedule(rounds=100),
               "abs(dR/d(theta^2)) * theta^2, R = <g-net(x^2; m, ReLU gates), h-net(1; theta^2)>; data-driven, "
               "path based"),
        Method("ntk-sap", NTKSAPScorer, Schedule(rounds=100),
               "abs(sum_b dF/dm), F = squared distance of f(xi; theta~*m) and f(xi; (theta~ + eps*delta)*m); "
               "xi noise, theta~ fresh Kaiming weights per batch", aliases=("ntksap",)),
        Method("grasp", GraSPScorer, Schedule(rounds=1),
               "theta * Hg signed (lowest pruned), g = sum_b grad L_b at temperature T (needs targets)"),
        Method("iter-snip", IterSNIPScorer, Schedule(rounds=100),
               "abs(theta * dL/dtheta) at theta*m, BatchNorm in train mode, iterated (needs targets)",
               aliases=("iter_snip",)),
        Method("snip", SNIPScorer, Schedule(rounds=1), "abs(dL/dtheta * theta), one shot (needs targets)"),
        Method("synflow", SynFlowScorer, Schedule(rounds=100),
               "abs(theta * dR/dtheta), R = sum f(1; abs(theta)); data-free, overflow-safe"),
        Method("synflow-l2", SynFlowL2Scorer, Schedule(rounds=100),
               "abs(theta) * dh/d(theta^2), h = sum f(1; theta^2); data-free, overflow-safe", aliases=("synflow_l2",)),
        Method("magnitude", MagnitudeScorer, Schedule(rounds=1), "abs(theta)"),
        Method("erk-magnitude", ERKMagnitudeScorer, Schedule(rounds=1),
               "ERK per-layer counts, the largest abs(theta) inside each layer", aliases=("magnitude_erk",)),
        Method("random", RandomScorer, Schedule(rounds=1), "uniform random ranking"),
        Method("erk-random", ERKRandomScorer, Schedule(rounds=1),
               "ERK per-layer counts, a uniform random subset inside each layer", aliases=("rand_erk",)),
        # --- issue #16: ProsPr, RReg, PHEW
        Method("prospr", ProsPrScorer, Schedule(rounds=1),
               "abs(dL(theta_M)/dc), theta_0 = theta*c, M SGD steps differentiated through (needs targets)"),
        Method("rreg", RRegScorer, Schedule(rounds=1),
               "ERK densities, random r-regular bipartite channel graphs per layer, whole kernels; data-free"),
        Method("phew", PHEWScorer, Schedule(rounds=1),
               "abs(theta)-biased random walks on the traced unit graph until K weights; data-free"),
        # --- issue #16: PAGS, NPB
        Method("pags", PAGSScorer, Schedule(rounds=1),
               "the SNIP mask of a population of P with the largest sum of sqrt(dr^2 + lam^2) (Ramanujan and "
               "weighted spectral gaps of each layer's graph; needs targets)"),
        Method("npb", NPBScorer, Schedule(rounds=1),
               "ERK layer counts, then per-layer integer programs balancing active units and paths "
               "(scipy.optimize.milp); data-free"),
    ]


_METHODS: Optional[Dict[str, Method]] = None  # name -> Method, registry order (built lazily)
_ALIASES: Dict[str, str] = {}  # alias -> name
_BUILTIN: Tuple[str, ...] = ()  # the names of _registry(), which cannot be unregistered


def _table() -> Dict[str, Method]:
    global _METHODS, _BUILTIN
    if _METHODS is None:
        table: Dict[str, Method] = {}
        for m in _registry():
            _add(table, _ALIASES, m)
        _METHODS, _BUILTIN = table, tuple(table)
    return _METHODS


def _add(table: Dict[str, Method], aliases: Dict[str, str], method: Method) -> None:
    """Put `method` into `table`/`aliases`, refusing a name or alias already taken (nothing is
    changed then)."""
    keys = (method.name,) + tuple(method.aliases)
    for key in keys:
        owner = table.get(key) or table.get(aliases.get(key, ""))
        if owner is not None:
            raise ValueError(f"method name {key!r} is already taken by method {owner.name!r}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"method {method.name!r}: its name and aliases must all differ, got {list(keys)}")
    table[method.name] = method
    aliases.update(dict.fromkeys(method.aliases, method.name))


_NAME = re.compile(r"[a-z0-9][a-z0-9_.+-]*")


def _check_name(what: str, value) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{what} must be a non-empty lower-case name of letters, digits and _ . + - "
                         f"(lookups are case-insensitive), got {value!r}")
    return value


def register_method(name: str, scorer: Type[Scorer], schedule: Optional[Schedule] = None, summary: str = "",
                    aliases: Sequence[str] = ()) -> Method:
    """Add a method to the registry, so `prune(..., method=name)`, `saliency`, the CLI's
    `--method` and the mask metadata know it, exactly like a built-in one.

    name, aliases: new lower-case names (a clash with any registered name or alias is an error).
    scorer:   a Scorer subclass (the class; its Options dataclass declares the method's options).
    schedule: its schedule defaults (Schedule; None: the engine's defaults, one round).
    summary:  one line for `widetopo methods`.
    Everything is checked before the registry changes. Returns the new Method; remove it with
    unregister_method(name).
    """
    _check_name("name", name)
    if isinstance(aliases, str) or not isinstance(aliases, (list, tuple)):
        raise TypeError(f"aliases must be a list or tuple of names, got {type(aliases).__name__}")
    aliases = tuple(_check_name(f"aliases[{i}]", a) for i, a in enumerate(aliases))
    if not (isinstance(scorer, type) and issubclass(scorer, Scorer)):
        got = f"an instance of {type(scorer).__name__}" if isinstance(scorer, Scorer) else repr(scorer)
        raise TypeError(f"scorer must be a Scorer subclass (the class, not an instance), got {got}")
    if not (isinstance(scorer.Options, type) and issubclass(scorer.Options, Options)
            and dataclasses.is_dataclass(scorer.Options)):
        raise TypeError(f"scorer {scorer.__name__}.Options must be a dataclass deriving from "
                        f"widetopo.options.Options, got {scorer.Options!r}")
    scorer.Options()  # its defaults must validate
    from widetopo.api import ENGINE_OPTIONS, SELECTION_OPTIONS  # (api imports this module)

    shadowed = sorted({f.name for f in dataclasses.fields(scorer.Options)} & set(ENGINE_OPTIONS + SELECTION_OPTIONS))
    if shadowed:
        raise ValueError(f"scorer {scorer.__name__}: option(s) {shadowed} have the name of an engine or selection "
                         f"option of widetopo.prune; rename them")
    schedule = Schedule() if schedule is None else schedule
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a widetopo.Schedule or None, got {type(schedule).__name__}")
    EngineOptions(**schedule.options())  # the same checks as at run time, before registering
    if not isinstance(summary, str):
        raise TypeError(f"summary must be a string, got {type(summary).__name__}")
    method = Method(name, scorer, schedule, summary, aliases)
    _add(_table(), _ALIASES, method)
    return method


def unregister_method(name: str) -> Method:
    """Remove a method added by register_method (by its name, not an alias); returns it."""
    table = _table()
    if isinstance(name, str) and name in _BUILTIN:
        raise ValueError(f"method {name!r} is built in and cannot be unregistered")
    if not isinstance(name, str) or name not in table:
        added = [n for n in table if n not in _BUILTIN]
        raise ValueError(f"no registered method named {name!r}; added by register_method: "
                         f"{', '.join(added) if added else 'none'}")
    method = table.pop(name)
    for alias in method.aliases:
        _ALIASES.pop(alias, None)
    return method


def all_methods() -> List[Method]:
    """Every registered method, in registry order."""
    return list(_table().values())


def method_names(aliases: bool = False) -> List[str]:
    names = list(_table())
    return names + sorted(_ALIASES) if aliases else names


def get_method(name) -> Method:
    """The method registered as `name` or one of its aliases (case-insensitive)."""
    table = _table()
    if not isinstance(name, str):
        raise TypeError(f"method must be a method name or a Scorer instance, got {type(name).__name__}")
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in table:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(table)}")
    return table[key]


def _fmt(value) -> str:
    return "—" if value is None else repr(value) if isinstance(value, str) else str(value)


def methods_markdown() -> str:
    """The README's method table: name, aliases, schedule, options with defaults, summary."""
    rows = ["| method | aliases | rounds | restoration | options (default) | scores |", "|---|---|---|---|---|---|"]
    for m in all_methods():
        s = m.schedule
        restore = "—" if s.restorations == 0 else (
            f"R = {s.restorations} × (J = {s.restore_steps}, T' = {s.restore_rounds or s.rounds})")
        opts = ", ".join(f"`{n}` ({_fmt(d)})" for n, _, d, _ in describe(m.options)) or "—"
        rows.append(f"| `{m.name}` | {', '.join(f'`{a}`' for a in m.aliases) or '—'} | {s.rounds} | {restore} "
                    f"| {opts} | {m.summary.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)
