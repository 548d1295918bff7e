"""Density schedules (docs/design.md §2.2) and the keep counts of one threshold step (docs/design.md §2.1).

poly (geometric):  d_t = start * (target / start)^(t/T)   -> d*^(t/T) from start = 1
linear:            d_t = start + (target - start) * t/T
cosine:            d_t = target + (start - target) * (1 + cos(pi t/T)) / 2
"""
from __future__ import annotations

import math
from typing import List, Tuple

KINDS = ("poly", "linear", "cosine")
_ALIASES = {"poly": "poly", "geometric": "poly", "exponential": "poly", "linear": "linear", "cosine": "cosine"}
COUNTS = ("exact", "official")


def _check_density(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return value


def schedule_kind(kind: str) -> str:
    """Canonical schedule name ('geometric' and 'exponential' are aliases of 'poly')."""
    if not isinstance(kind, str) or kind.lower() not in _ALIASES:
        raise ValueError(f"schedule must be one of {KINDS} (or 'geometric'/'exponential'), got {kind!r}")
    return _ALIASES[kind.lower()]


def density_schedule(target: float, rounds: int, kind: str = "poly", start: float = 1.0) -> List[float]:
    """Densities d_1..d_T of T pruning rounds, falling from `start` (exclusive) to `target`."""
    target = _check_density("target", target)
    start = _check_density("start", start)
    if target > start:
        raise ValueError(f"target ({target}) must not exceed start ({start})")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    kind = schedule_kind(kind)
    out = []
    for t in range(1, rounds + 1):
        f = t / rounds
        if kind == "poly":
            d = start * (target / start) ** f
        elif kind == "linear":
            d = start + (target - start) * f
        else:
            d = target + (start - target) * (1.0 + math.cos(math.pi * f)) / 2.0
        out.append(d)
    out[-1] = target
    return out


def keep_count(density: float, n_prunable: int, n_all: int, count: str = "exact") -> Tuple[int, str]:
    """(keep, mode) for widetopo_ext.global_threshold at `density`.

    exact:    keep = round(d * N_P) highest scores.
    official: k = floor((1 - d) * N_all) counted over all parameters; the op prunes every score
              <= the (k+1)-th smallest prunable score, so keep = clip(N_P - k, 0, N_P).
    """
    if count == "exact":
        keep = int(math.floor(density * n_prunable + 0.5))
        return min(max(keep, 0), n_prunable), "exact"
    if count == "official":
        k = int(math.floor((1.0 - density) * n_all))
        return min(max(n_prunable - k, 0), n_prunable), "official"
    raise ValueError(f"count must be one of {COUNTS}, got {count!r}")
