"""Which pruning set the ranks' data arguments form under torch.distributed (docs/distributed.md).

per_rank (the DistributedSampler convention): each rank passes its own part; the pruning set
is their union in rank order, so rank r's local batch j gets the global index
    i = n_0 + ... + n_{r-1} + j            (n_q: the number of batches rank q passed),
the index that batch has in one process over the concatenated list (rank 0's batches first).
Every random draw is seeded by (seed, round, i) and BatchNorm is calibrated per batch, so each
batch is scored exactly as that one process scores it; the sums (the prepass too: GraSP's g)
are all-reduced. Each rank scores all of its batches. A data-free method (no sum over batches)
gets what one process gives it, on every rank: the whole union, gathered (PAGS draws its
population from batch pairs), or, when it reads at most the first batch (Scorer.first_batch_only:
SynFlow's sample shape, PHEW's probe input), global batch 0 alone, broadcast from its rank.
A dict batch's non-tensor entries (e.g. output_hidden_states=False) travel with it: each rank
describes them (pickled) with its batches, and a batch broadcast to the other ranks carries its
own values, as in one process.

replicated: every rank passes the whole set; rank r scores the batches with i % world == r.

auto (the default): replicated when every rank's data has the same digest
(widetopo.engine.batches.data_digest), otherwise per_rank. Equal parts on every rank are read
as replicated data: pass data_split="per_rank" when equal parts are meant to be counted once each.
"""
from __future__ import annotations

import base64
import json
import pickle
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from widetopo.distributed import collectives
from widetopo.engine.batches import data_digest
from widetopo.errors import RankMismatchError
from widetopo.scores.base import Batch
from widetopo.scores.inputs import Inputs, shape_of

__all__ = ["DataSplit", "resolve_split"]


@dataclass
class DataSplit:
    """The resolved split: mode ("per_rank" or "replicated"), each rank's batch count and data
    digest, and each rank's batch shapes (global batch list, for the checkpoint fingerprint)."""

    mode: str
    counts: List[int]
    digests: List[Optional[str]]  # [None] in one process: computed only if a checkpoint asks
    shapes: List[List[List[int]]]
    first: Optional[dict] = None  # shapes/dtypes of global batch 0 (for the broadcast)
    targets: Optional[List[list]] = None  # each rank's [target shape, dtype name] (None: no target) per batch
    batches: Optional[List[Batch]] = None  # one process: its batches (for the lazy digest)
    extras: Optional[List[list]] = None  # each rank's non-tensor entries per batch (_extras), for the broadcasts

    @property
    def offsets(self) -> List[int]:
        out, total = [], 0
        for n in self.counts:
            out.append(total)
            total += n
        return out

    def global_batches(self) -> List[list]:
        """[[global index, shape]] of the whole pruning set (identical on every rank)."""
        if self.mode == "replicated":
            return [[i, s] for i, s in enumerate(self.shapes[0])]
        return [[off + j, s] for off, shapes in zip(self.offsets, self.shapes) for j, s in enumerate(shapes)]

    def global_digest(self) -> str:
        if self.digests == [None]:
            self.digests = [data_digest(self.batches)]
        return self.digests[0] if self.mode == "replicated" else "+".join(self.digests)

    def mine(self, batches: List[Batch], data_dependent: bool, first_batch_only: bool, store: torch.device,
             device: torch.device) -> List[Batch]:
        """The batches this rank hands to the scorer (a collective for data-free per_rank runs)."""
        rank, world = collectives.rank_world()
        if self.mode == "replicated" or world == 1:
            return collectives.shard(batches, rank, world) if data_dependent else batches
        if data_dependent:
            return batches
        if first_batch_only:
            src = next(r for r, n in enumerate(self.counts) if n)
            return [_broadcast_batch(batches[0] if rank == src else None, 0, src, self.first["x"],
                                     self.first["y"], store, device, self.first.get("label_key"),
                                     self.extras[src][0])]
        return self._gather_union(batches, store, device)

    def _gather_union(self, batches: List[Batch], store: torch.device, device: torch.device) -> List[Batch]:
        """The whole union on every rank, in global order (one broadcast per batch)."""
        rank, _ = collectives.rank_world()
        first_x = self.first["x"]  # (one input dtype per key: materialize_batches and _check_samples)
        label_key = self.first.get("label_key")
        out = []
        for src, (offset, shapes, targets, extras) in enumerate(zip(self.offsets, self.shapes, self.targets,
                                                                     self.extras)):
            for j, (shape, y_spec, extra) in enumerate(zip(shapes, targets, extras)):
                own = batches[j] if src == rank else None
                x_spec = ({k: [shape[k], first_x[k][1]] for k in first_x} if isinstance(first_x, dict)
                          else [shape, first_x[1]])
                out.append(_broadcast_batch(own, offset + j, src, x_spec, y_spec, store, device, label_key, extra))
        return out


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.rsplit(".", 1)[-1])


def _sample(t: Optional[torch.Tensor]):
    return None if t is None else [list(t.shape[1:]) if t.dim() > 0 else None, str(t.dtype)]


def _tensors(x) -> dict:
    """The tensors of keyword inputs (dict batches, docs/design.md §2.5), by key."""
    return {k: v for k, v in x.items() if isinstance(v, torch.Tensor)}


def _extras(x) -> Optional[dict]:
    """The non-tensor entries of keyword inputs, {key: [pickled value in base64 or None if it
    does not pickle, type name]}, so a batch sent to another rank carries them; None: none."""
    if not isinstance(x, Inputs):
        return None
    out = {}
    for k, v in x.items():
        if not isinstance(v, torch.Tensor):
            try:
                out[k] = [base64.b64encode(pickle.dumps(v)).decode("ascii"), type(v).__name__]
            except Exception:
                out[k] = [None, type(v).__name__]
    return out or None


def _describe(batches: Sequence[Batch], digest: bool) -> dict:
    first = batches[0] if batches else None
    keyword = first is not None and isinstance(first.x, Inputs)
    return {
        "count": len(batches),
        "digest": data_digest(batches) if digest else None,
        "shapes": [shape_of(b.x) for b in batches],
        "targets": [None if b.y is None else [list(b.y.shape), str(b.y.dtype)] for b in batches],
        "extras": [_extras(b.x) for b in batches] if digest else None,  # (read only by the broadcasts)
        "x": (None if first is None else {k: _sample(v) if isinstance(v, torch.Tensor) else "(not a tensor)"
                                          for k, v in first.x.items()} if keyword else _sample(first.x)),
        "y": [_sample(first.y)] if first else None,
        "first": None if first is None else {
            "x": ({k: [list(v.shape), str(v.dtype)] for k, v in _tensors(first.x).items()} if keyword
                  else [list(first.x.shape), str(first.x.dtype)]),
            "y": None if first.y is None else [list(first.y.shape), str(first.y.dtype)],
            "label_key": first.label_key,
        },
    }


def _check_samples(described: List[dict]) -> None:
    """Per-rank parts must hold samples of one shape and dtype, with targets alike (what
    materialize_batches requires of one process's batches)."""
    lines = []
    for key, what in (("x", "input samples (shape, dtype)"), ("y", "targets (per-sample shape, dtype)")):
        seen = {}
        for rank, d in enumerate(described):
            if d["count"]:
                seen.setdefault(json.dumps(d[key]), []).append(rank)
        if len(seen) > 1:
            lines.append(f"{what}: " + "; ".join(f"{v} on rank(s) {', '.join(map(str, r))}" for v, r in seen.items()))
    if lines:
        raise RankMismatchError(
            "with per-rank data (data_split='per_rank' or 'auto' with different data), every rank's batches "
            "must hold samples of one shape and dtype, with targets alike; " + " | ".join(lines), lines)


def resolve_split(option: str, batches: List[Batch], device: torch.device) -> DataSplit:
    """Resolve `option` ("auto", "per_rank", "replicated") from every rank's data (one
    all_gather of a small description: batch count, digest, shapes) and, for per_rank, shift
    this rank's batch indices to their place in the union. Raises the same error on every rank
    for an empty set, replicated data that differs, or per-rank parts that do not fit together."""
    rank, world = collectives.rank_world()
    local = _describe(batches, digest=world > 1)  # (hashing the whole set costs; one process needs no digest)
    if world == 1:
        described = [local]
    else:
        payload = json.dumps(local).encode()
        described = [json.loads(b) for b in collectives.all_gather_bytes(payload, device)]
    counts = [d["count"] for d in described]
    digests = [d["digest"] for d in described]
    same = all(d == digests[0] for d in digests)
    if option == "auto":
        mode = "replicated" if same else "per_rank"
    else:
        mode = option
    if mode == "replicated" and not same:
        lines = [f"{len(set(digests))} different data digests: " + "; ".join(
            f"{digests[r][:12]} ({counts[r]} batches) on rank {r}" for r in range(world))]
        raise RankMismatchError(
            "data_split='replicated' needs the same pruning data on every rank, but " + lines[0]
            + "; pass each rank's own part with data_split='per_rank' (or 'auto')", lines)
    if sum(counts) == 0:
        raise ValueError("data is empty: the pruning set must contain at least one batch"
                         + (f" (no rank of {world} passed one)" if world > 1 else ""))
    if mode == "per_rank":
        _check_samples(described)
        offset = sum(counts[:rank])
        for b in batches:
            b.index += offset
    first = next(d["first"] for d in described if d["count"])
    return DataSplit(mode, counts, digests, [d["shapes"] for d in described], first,
                     [d["targets"] for d in described], batches if world == 1 else None,
                     [d["extras"] for d in described])


def _decoded(extras: Optional[dict], index: int) -> dict:
    """The non-tensor entries described by _extras (raises alike on every rank: all hold `extras`)."""
    out = {}
    for k, (code, kind) in (extras or {}).items():
        if code is None:
            raise TypeError(
                f"data: entry {k!r} of dict batch {index} is a {kind} that does not pickle, so it cannot be sent to "
                "the other ranks (with per-rank data a data-free method gets every rank the batches it reads); "
                "pass a picklable value, or the whole data on every rank (data_split='replicated')")
        out[k] = pickle.loads(base64.b64decode(code))
    return out


def _broadcast_batch(own: Optional[Batch], index: int, src: int, x_spec, y_spec, store: torch.device,
                     device: torch.device, label_key: Optional[str] = None, extras: Optional[dict] = None) -> Batch:
    """Rank `src`'s batch `own` on every rank, as global batch `index` (x_spec, y_spec: [shape,
    dtype name] of its input and target, known to every rank; y_spec None: no target; x_spec
    {key: [shape, dtype name]} for keyword inputs, whose tensors are broadcast, label_key kept;
    extras: its non-tensor entries as described by _extras, added to the keyword inputs)."""
    rest = _decoded(extras, index)
    keys = list(x_spec) if isinstance(x_spec, dict) else None
    specs = [x_spec[k] for k in keys] if keys is not None else [x_spec]
    if own is not None:
        xs = [own.x[k] for k in keys] if keys is not None else [own.x]
        y = own.y
    else:
        xs = [torch.empty(sp[0], dtype=_dtype(sp[1])) for sp in specs]
        y = None if y_spec is None else torch.empty(y_spec[0], dtype=_dtype(y_spec[1]))
    tensors = [t.to(device) for t in xs + ([y] if y is not None else [])]
    collectives.broadcast_(tensors, src=src)
    moved = [t.to(store) for t in tensors]
    x = Inputs([*zip(keys, moved[:len(keys)]), *rest.items()]) if keys is not None else moved[0]
    return Batch(index, x, moved[len(specs)] if len(moved) > len(specs) else None, label_key)
