"""The phase plan of a pruning run (docs/design.md §2.3).

    prune 0 (T rounds, 1 -> d*), restore 0 (J steps), prune 1 (T' rounds), restore 1, prune 2, ...

Scoring rounds are numbered 1, 2, ... across every prune phase (the round number seeds the
round's randomness); a step is a scoring round or a restoration step (progress, checkpoints).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List


@dataclass(frozen=True)
class Phase:
    kind: str          # "prune" or "restore"
    index: int         # prune phases 0..R, restorations 0..R-1
    length: int        # rounds or restoration steps
    first_round: int   # number of scoring rounds before this phase

    @property
    def label(self) -> str:
        return f"{self.kind}{self.index}"


def make_plan(rounds: int, restorations: int, restore_steps: int, post_rounds: int) -> List[Phase]:
    """[prune 0, restore 0, prune 1, ..., restore R-1, prune R]."""
    plan, done = [Phase("prune", 0, rounds, 0)], rounds
    for r in range(restorations):
        plan.append(Phase("restore", r, restore_steps, done))
        plan.append(Phase("prune", r + 1, post_rounds, done))
        done += post_rounds
    return plan


def total_steps(plan: List[Phase]) -> int:
    return sum(p.length for p in plan)


def steps_before(plan: List[Phase], phase_index: int, step: int = 0) -> int:
    """Steps done when phase `phase_index` has finished `step` of its steps."""
    return sum(p.length for p in plan[:phase_index]) + step
