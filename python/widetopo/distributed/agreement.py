"""Checking, before round 1, that every rank runs the same pruning (docs/distributed.md).

Ranks that disagree on the method, an option, the density, the schedule or the model would
otherwise compute different masks silently, or stop in a collective whose tensors do not match
(a gloo "connection closed", an NCCL hang). Each rank describes its run as a dict of JSON
values; one all_gather of those descriptions lets every rank compare them all and raise the
same RankMismatchError, naming each setting that differs and the ranks holding each value.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Sequence, Tuple

import torch

from widetopo.distributed import collectives
from widetopo.errors import RankMismatchError

__all__ = ["check_agreement", "describe_differences", "RankMismatchError"]

_CLIP = 120


def _clip(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= _CLIP else text[:_CLIP - 3] + "..."


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _groups(values: Sequence[Any]) -> List[Tuple[Any, List[int]]]:
    """[(value, ranks holding it)] in order of first appearance."""
    out: List[Tuple[Any, List[int]]] = []
    for rank, value in enumerate(values):
        for seen, ranks in out:
            if seen == value:
                ranks.append(rank)
                break
        else:
            out.append((value, [rank]))
    return out


def _difference(key: str, values: Sequence[Any]) -> str:
    """One line for `key`: each distinct value with its ranks; for lists (parameter names and
    shapes), the first entry where they differ and each list's length."""
    groups = _groups(values)
    if all(isinstance(v, list) for v, _ in groups):
        lists = [v for v, _ in groups]
        i = next(j for j in range(max(map(len, lists)) + 1)
                 if len({json.dumps(v[j]) if j < len(v) else None for v in lists}) > 1)
        parts = [f"{_clip(v[i]) if i < len(v) else '(none)'} on {_ranks(r)} ({len(v)} entries)" for v, r in groups]
        return f"{key} (entry {i}): " + "; ".join(parts)
    return f"{key}: " + "; ".join(f"{_clip(v)} on {_ranks(r)}" for v, r in groups)


def describe_differences(described: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per key whose value is not the same on every rank (rank order of `described`)."""
    keys: List[str] = []
    for d in described:
        keys += [k for k in d if k not in keys]
    out = []
    for key in keys:
        values = [d.get(key) for d in described]
        if any(v != values[0] for v in values[1:]):
            out.append(_difference(key, values))
    return out


def check_agreement(settings: Dict[str, Any], device: torch.device, what: str = "the pruning run") -> None:
    """Raise RankMismatchError on every rank if any rank's `settings` (JSON values) differ from
    another's. One all_gather of the serialised settings; nothing without a process group."""
    if not collectives.is_distributed():
        return
    payload = json.dumps(settings, sort_keys=False).encode()
    described = [json.loads(b) for b in collectives.all_gather_bytes(payload, device)]
    differences = describe_differences(described)
    if differences:
        raise RankMismatchError(
            f"the {len(described)} ranks disagree on {what}, so they cannot prune together (every rank "
            f"must call with the same method, options, density and model); differences: "
            + " | ".join(differences),
            differences,
        )
