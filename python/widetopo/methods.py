"""The method registry: every pruning method declared once.

A `Method` names the scorer class (whose `Options` dataclass holds the method's options with
their defaults, types and validation, and whose `selection` says how masks are chosen) and the
schedule defaults of the published configuration. `widetopo.prune`, `widetopo.saliency`, the
CLI (`widetopo methods`, `--method`, `--option key=value`), the mask metadata, the checkpoint
fingerprint and the README's method table all read this table.

Adding a method: a scorer module (a Scorer subclass with an Options dataclass), one entry in
`_REGISTRY` below, and one test file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Type

from widetopo.options import Options, as_dict, describe
from widetopo.scores.base import Scorer

__all__ = ["Method", "Schedule", "get_method", "method_names", "all_methods", "methods_markdown"]


@dataclass(frozen=True)
class Schedule:
    """Schedule defaults of a method (each overridable by the option of the same name):
    T rounds from density 1 to d*, then R restorations of J steps, each followed by T' rounds."""

    rounds: int = 1
    restorations: int = 0
    restore_steps: int = 50
    restore_rounds: Optional[int] = None  # None: T' = T


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
    from widetopo.scores.ntksap import NTKSAPScorer
    from widetopo.scores.px import PXScorer
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
    ]


_METHODS: Optional[Dict[str, Method]] = None
_ALIASES: Dict[str, str] = {}


def _table() -> Dict[str, Method]:
    global _METHODS
    if _METHODS is None:
        table: Dict[str, Method] = {}
        for m in _registry():
            for key in (m.name,) + m.aliases:
                if key in table or key in _ALIASES:
                    raise RuntimeError(f"method name {key!r} is registered twice")
                if key != m.name:
                    _ALIASES[key] = m.name
            table[m.name] = m
        _METHODS = table
    return _METHODS


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
