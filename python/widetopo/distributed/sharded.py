"""Global top-k over scores spread across the processes of a torch.distributed group.

`sharded_global_threshold(scores, masks, keep, mode, group=, index=)` keeps exactly the `keep`
highest scores of the union of every rank's local tensors: the same cut, the same tie rule and the
same return value as one process running `widetopo_ext.global_threshold` over the full list of
global tensors. Only counts cross the wire - radix-digit histograms, per-piece tie counts and a
few header integers - never a score (the one exception: when the last candidates are all kept, one
8-byte all_reduce MIN of the smallest of them, which is the returned cut itself).

Layout. Each local tensor is a *piece* of a global tensor: `index[j] = (t, offset, numel_t)`
says that the row-major flattening of `scores[j]` holds the elements [offset, offset +
scores[j].numel()) of global tensor `t`, which has numel_t elements (FSDP-style flat shards; a
whole tensor is (t, 0, scores[j].numel())). The pieces of all ranks must tile every global
tensor 0..T-1 exactly (overlaps, gaps and disagreeing sizes are errors). `index=None` means whole
tensors numbered in rank order: rank 0's tensors are global tensors 0..n0-1, rank 1's the next
ones, and so on.

Algorithm (same results as the single-process radix select, docs/design.md §2.4):
  key(x)   order-preserving unsigned integer of the float bits (-0 folded onto +0), W bits;
  pass p   every rank histograms digit p (11 bits, most significant first) of its keys that match
           the digits fixed so far; all_reduce(SUM) of the histograms; every rank walks the same
           global histogram from the top and fixes the bin holding the keep-th largest key;
  cut      after the last digit the prefix is the cut key c, r = keep - #(key > c) ties are kept;
  ties     ("exact", 0 < r < #(key == c)) all_gather of the per-piece tie counts; piece q keeps
           its first clamp(r - ties_before(q), 0, ties(q)) ties in flat order, ties_before summing
           the pieces earlier in (global tensor index, offset) order;
  official kept = key > c, c being the keep-th largest key (k = N - keep; prune <= sorted[k]).
If after a pass every candidate is kept (matching == remaining) the passes stop early and the cut
is the smallest candidate (one all_reduce MIN).

Bytes communicated per call, w ranks, P = most pieces on one rank, H = 8 header int64s,
b = 4 if the global N < 2**31 else 8 (histogram counts), digit plan d_1..d_n (float32: 11, 11, 10;
float64: 11 x 5, 9; 16-bit: 11, 5):
    payload (bytes each rank contributes) = 8 H                  header all_gather
                                          + 32 P   (index given) layout all_gather
                                          + b * sum_{passes run} 2**d_p    histogram all_reduces
                                          + 8      (early stop)  all_reduce MIN of the cut
                                          + 8 P    (tie split)   tie-count all_gather
`return_stats=True` also returns a ShardStats with every collective issued, that payload and the
bytes each rank sends for ring algorithms (all_reduce 2 (w-1)/w x n, all_gather (w-1) x n).

Local work is vectorised torch (a loop over the local tensors and over 4 M-element chunks of
them); extra memory is a few chunk-sized temporaries, one histogram per piece, and in the final
mask pass one comparison of the size of the largest local tensor (plus, for the one piece where
the ties are split, the flat positions of its ties). Every check -
local arguments, agreement between ranks on dtype / keep / mode, keep in [0, N], the layout, NaN or
inf anywhere - is decided together after the header all_gather, so all ranks raise (no rank is
left waiting in a collective) and no mask is written by a failed call.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import List, Optional, Sequence, Tuple

import torch

import widetopo_ext
from widetopo_ext import _ops

__all__ = ["sharded_global_threshold", "ShardStats", "DIGIT_BITS"]

logger = logging.getLogger(__name__)

#: Bits per radix digit (the histograms have 2**DIGIT_BITS bins; 16 KB of int32 counts).
DIGIT_BITS = 11

_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32,
           torch.float16: torch.int16, torch.bfloat16: torch.int16}
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPE_OF_CODE = {v: k for k, v in _DTYPE_CODES.items()}
_MODE_CODES = {"exact": 0, "official": 1}
_NO_BAD = 2 ** 62          # "no non-finite tensor" in the header (the MIN over ranks is taken)
_CHUNK = 1 << 22           # elements per step of the histogram passes (temporaries ~ 16 MB)
_HEADER = 8                # status, dtype, keep, mode, pieces, local N, first bad tensor, has index


@dataclasses.dataclass
class ShardStats:
    """The collectives one call issued: (kind, number of elements, bytes per element)."""

    world: int
    collectives: List[Tuple[str, int, int]] = dataclasses.field(default_factory=list)
    passes: int = 0

    @property
    def payload_bytes(self) -> int:
        """Bytes each rank contributes, summed over the collectives."""
        return sum(n * b for _, n, b in self.collectives)

    @property
    def ring_bytes_sent(self) -> float:
        """Bytes each rank sends with ring algorithms: all_reduce 2(w-1)/w n, all_gather (w-1) n."""
        w = self.world
        total = 0.0
        for kind, n, b in self.collectives:
            total += (2 * (w - 1) / w if kind.startswith("all_reduce") else (w - 1)) * n * b
        return total


class _Comm:
    """The collectives of one call, on `device`, logged into `stats`; identity for world == 1."""

    def __init__(self, group, device: torch.device):
        dist = torch.distributed
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.active else 0
        self.world = dist.get_world_size(group) if self.active else 1
        self.device = device
        self.stats = ShardStats(world=self.world)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """(world, *t.shape) stack of every rank's t."""
        self.stats.collectives.append(("all_gather", t.numel(), t.element_size()))
        if self.world == 1:
            return t.unsqueeze(0).clone()
        t = t.to(self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(out, t, group=self.group)
        return torch.stack(out).cpu()

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        self.stats.collectives.append((f"all_reduce_{op}", t.numel(), t.element_size()))
        if self.world == 1:
            return t
        red = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN}[op]
        t = t.to(self.device)
        torch.distributed.all_reduce(t, op=red, group=self.group)
        return t


def _comm_device(group, scores: Sequence[torch.Tensor]) -> torch.device:
    """CPU for gloo (and without a group); the scores' CUDA device (or the current one) for NCCL."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    for s in scores:
        if s.is_cuda:
            return s.device
    return torch.device("cuda", torch.cuda.current_device())


# --------------------------------------------------------------------------- keys
class _Keys:
    """Order-preserving keys of one float dtype. Signed key k: the raw bits i for i >= 0, else
    i ^ (2**(W-1) - 1), with -0 (bits -2**(W-1)) folded onto +0; the unsigned key is
    u = k + 2**(W-1), whose digits the histograms count (u ^ sign bit = k reinterpreted)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.int = _INT_OF[dtype]
        self.bits = torch.finfo(dtype).bits
        self.sign = -(1 << (self.bits - 1))     # the sign bit as a signed integer
        self.low = (1 << (self.bits - 1)) - 1   # every bit but the sign
        fmax = torch.tensor([torch.finfo(dtype).max], dtype=dtype)
        self.kmax = int(self.signed(fmax)[0])   # key of the largest finite value
        self.kmin = int(self.signed(-fmax)[0])  # key of -max

    def signed(self, x: torch.Tensor) -> torch.Tensor:
        i = x.reshape(-1).view(self.int)
        i = torch.where(i == self.sign, 0, i)
        return torch.where(i < 0, i ^ self.low, i)

    def digits(self, x: torch.Tensor, shift: int, width: int) -> torch.Tensor:
        """The unsigned key's digit [shift, shift + width) of every element (in the key's int
        dtype, which torch.bincount takes as it is)."""
        return ((self.signed(x) ^ self.sign) >> shift) & ((1 << width) - 1)

    def value(self, key: int, device) -> torch.Tensor:
        """0-d tensor of the dtype holding the float whose signed key is `key`."""
        bits = key if key >= 0 else key ^ self.low
        return torch.tensor([bits], dtype=self.int).view(self.dtype)[0].to(device)

    def range_values(self, prefix: int, fixed_shift: int, device):
        """(lo, hi) floats such that lo <= x <= hi <=> x's unsigned key agrees with `prefix` on
        every bit at or above fixed_shift (for finite x; None when no finite float does)."""
        half = 1 << (self.bits - 1)
        lo = prefix - half
        hi = prefix + (1 << fixed_shift) - 1 - half
        lo, hi = max(lo, self.kmin), min(hi, self.kmax)
        # Signed key -1 is -0's raw image, which no value has after folding; its float (-0.0)
        # would compare equal to +0 (key 0), so the bounds step over it.
        lo = 0 if lo == -1 else lo
        hi = -2 if hi == -1 else hi
        if lo > hi:
            return None
        return self.value(lo, device), self.value(hi, device)


def _digit_plan(bits: int) -> List[Tuple[int, int]]:
    """(shift, width) of each most-significant-first pass (as core::radix_pass_shift)."""
    plan = []
    for p in range((bits + DIGIT_BITS - 1) // DIGIT_BITS):
        hi = bits - p * DIGIT_BITS
        width = min(hi, DIGIT_BITS)
        plan.append((hi - width, width))
    return plan


# --------------------------------------------------------------------------- arguments
def _local_index(index, scores: Sequence[torch.Tensor]) -> Optional[List[Tuple[int, int, int]]]:
    """The checked (tensor, offset, tensor numel) of every local piece, or None."""
    if index is None:
        return None
    if isinstance(index, (torch.Tensor, str, bytes)) or not hasattr(index, "__iter__"):
        raise TypeError(f"index must be a list of (tensor index, flat offset, tensor numel) triples, "
                        f"got {type(index).__name__}")
    index = list(index)
    if len(index) != len(scores):
        raise ValueError(f"index must have one (tensor index, flat offset, tensor numel) triple per entry "
                         f"of scores: got {len(index)} vs {len(scores)}")
    out = []
    for j, (entry, s) in enumerate(zip(index, scores)):
        try:
            t, off, total = (operator.index(v) for v in entry)
        except (TypeError, ValueError):
            raise TypeError(f"index[{j}] must be a triple of ints (tensor index, flat offset, tensor numel), "
                            f"got {entry!r}") from None
        if t < 0 or off < 0 or off + s.numel() > total:
            raise ValueError(f"index[{j}] = {(t, off, total)} does not fit scores[{j}] ({s.numel()} elements): "
                             f"need tensor index >= 0 and 0 <= offset <= offset + {s.numel()} <= tensor numel")
        out.append((t, off, total))
    return out


def _check_local(scores, masks, keep, mode, index):
    scores, masks, keep = _ops._threshold_arguments(scores, masks, keep)
    if not isinstance(mode, str) or mode not in _MODE_CODES:
        raise ValueError(f"mode must be one of {tuple(_MODE_CODES)}, got {mode!r}")
    return scores, masks, keep, _local_index(index, scores)


def _check_layout(rows: torch.Tensor, counts: Sequence[int]) -> None:
    """rows: (world, P, 4) of (tensor, offset, piece numel, tensor numel); the first counts[r]
    rows of rank r are real. Raises unless the pieces tile the global tensors 0..T-1 exactly."""
    by_tensor = {}
    for r, c in enumerate(counts):
        for j, (t, off, n, total) in enumerate(rows[r, :c].tolist()):
            by_tensor.setdefault(t, []).append((off, n, total, r, j))
    n_tensors = max(by_tensor) + 1 if by_tensor else 0
    missing = [t for t in range(n_tensors) if t not in by_tensor]
    if missing:
        raise ValueError(f"index: no rank holds global tensor {missing[0]} (global tensors must be numbered "
                         f"0..T-1 without gaps; the largest index given is {n_tensors - 1})")
    for t in range(n_tensors):
        pieces = sorted(by_tensor[t])
        totals = sorted({p[2] for p in pieces})
        if len(totals) > 1:
            raise ValueError(f"index: ranks disagree on the numel of global tensor {t}: {totals}")
        end = 0
        for off, n, _, r, j in pieces:
            if n == 0:
                continue
            if off < end:
                raise ValueError(f"index: pieces of global tensor {t} overlap at elements [{off}, {min(end, off + n)}) "
                                 f"(rank {r}, piece {j})")
            if off > end:
                raise ValueError(f"index: no rank holds elements [{end}, {off}) of global tensor {t}")
            end = off + n
        if end != totals[0]:
            raise ValueError(f"index: no rank holds elements [{end}, {totals[0]}) of global tensor {t}")


# --------------------------------------------------------------------------- the select
def _histograms(scores, keys: _Keys, live, bounds, shift, width) -> List[Optional[torch.Tensor]]:
    """Per-piece int64 histograms of the digit [shift, shift+width) of the keys in `bounds`
    (None: every key); pieces with live[j] False get None (no candidates there)."""
    bins = 1 << width
    out = []
    for s, alive in zip(scores, live):
        if not alive:
            out.append(None)
            continue
        hist = torch.zeros(bins, dtype=torch.int64, device=s.device)
        for x in s.reshape(-1).split(_CHUNK):  # bounds the temporaries of a large tensor
            if bounds is not None:
                x = x[(x >= bounds[0]) & (x <= bounds[1])]
            hist += torch.bincount(keys.digits(x, shift, width), minlength=bins)
        out.append(hist)
    return out


def _pick_bin(hist: torch.Tensor, remaining: int) -> Tuple[int, int, int]:
    """(bin b holding the remaining-th largest key, keys above it, keys in it)."""
    from_top = hist.to(torch.int64).flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor([remaining]))[0])
    b = hist.numel() - 1 - i
    in_bin = int(hist[b])
    return b, int(from_top[i]) - in_bin, in_bin


def sharded_global_threshold(scores, masks, keep: int, mode: str = "exact", *, group=None, index=None,
                             return_stats: bool = False):
    """Keep the `keep` highest scores of the union of every rank's pieces; write the local masks.

    Same semantics as widetopo_ext.global_threshold over the global tensors 0..T-1 (see the
    module docstring for `index` and the algorithm): "exact" keeps exactly `keep` scores, ties at
    the cut going to the entry first in (global tensor index, global flat index) order, and
    returns the smallest kept score (+inf for keep = 0); "official" prunes every score <= the
    (N - keep + 1)-th smallest and returns that value (+inf for keep = 0). 0-d float64 result,
    identical on every rank. `keep` and `mode` must be the same on every rank.
    Without an initialised process group and with index=None this is global_threshold itself.
    return_stats=True returns (threshold, ShardStats).
    """
    dist = torch.distributed
    active = dist.is_available() and dist.is_initialized()
    if not active and index is None:
        result = widetopo_ext.global_threshold(scores, masks, keep, mode)
        return (result, ShardStats(world=1)) if return_stats else result

    # 1. local checks and the first histogram; failures are reported in the header.
    error: Optional[BaseException] = None
    try:
        scores, masks, keep, local_index = _check_local(scores, masks, keep, mode, index)
    except (TypeError, ValueError) as exc:
        error = exc
        scores, masks, keep, local_index = [], [], 0, None
    comm = _Comm(group, _comm_device(group, scores))
    dtype = scores[0].dtype if scores else None
    first_bad = _NO_BAD
    if error is None:
        for j, s in enumerate(scores):
            if s.numel() and not bool(torch.isfinite(s).all()):
                first_bad = local_index[j][0] if local_index is not None else j
                break
    header = torch.tensor([int(error is not None), _DTYPE_CODES.get(dtype, -1), keep, _MODE_CODES.get(mode, -1),
                           len(scores), sum(s.numel() for s in scores), first_bad, int(index is not None)],
                          dtype=torch.int64)
    assert header.numel() == _HEADER
    headers = comm.all_gather(header)

    # 2. decide together whether the call is valid.
    failed = headers[:, 0].nonzero().flatten().tolist()
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"sharded_global_threshold: rank(s) {failed} rejected their arguments (see the error "
                           f"there); rank {comm.rank} stops too, no mask written")
    codes = sorted({c for c in headers[:, 1].tolist() if c >= 0})
    if len(codes) > 1:
        raise TypeError(f"sharded_global_threshold: the ranks' scores have different dtypes "
                        f"({', '.join(str(_DTYPE_OF_CODE[c]) for c in codes)}); one dtype per call")
    for col, what in ((2, "keep"), (3, "mode"), (7, "index given (None vs a list)")):
        if len(set(headers[:, col].tolist())) > 1:
            raise ValueError(f"sharded_global_threshold: ranks disagree on {what}: "
                             f"{headers[:, col].tolist()} (rank r at position r)")
    counts = headers[:, 4].tolist()
    n_total = int(headers[:, 5].sum())
    if not 0 <= keep <= n_total:
        raise ValueError(f"keep must be in [0, N] where N = {n_total} is the total number of scores "
                         f"over all ranks, got {keep}")
    most = max(counts)
    if index is not None:
        rows = torch.full((most, 4), -1, dtype=torch.int64)
        for j, ((t, off, total), s) in enumerate(zip(local_index, scores)):
            rows[j] = torch.tensor([t, off, s.numel(), total])
        layout = comm.all_gather(rows)
        _check_layout(layout, counts)
        # global order of every (rank, piece): by (tensor index, offset)
        slots = sorted((int(layout[r, j, 0]), int(layout[r, j, 1]), r, j) for r in range(comm.world)
                       for j in range(counts[r]))
    else:
        slots = [(0, 0, r, j) for r in range(comm.world) for j in range(counts[r])]
    reported = [(int(b) + (0 if index is not None else sum(counts[:r])), r)
                for r, b in enumerate(headers[:, 6].tolist()) if b != _NO_BAD]
    if reported:
        bad, rank_bad = min(reported)
        raise RuntimeError(f"sharded_global_threshold: global tensor {bad} contains a non-finite value "
                           f"(NaN or +-inf; seen on rank {rank_bad}); scores must be finite")

    inf = torch.tensor(math.inf, dtype=torch.float64)
    if keep == 0 or n_total == 0:
        with torch.no_grad():
            for m in masks:
                m.fill_(False)
        return (inf, comm.stats) if return_stats else inf

    # 3. radix select of the keep-th largest key over the global histograms.
    dtype = _DTYPE_OF_CODE[codes[0]]
    keys = _Keys(dtype)
    device = scores[0].device if scores else torch.device("cpu")
    count_dtype = torch.int32 if n_total < 2 ** 31 else torch.int64
    plan = _digit_plan(keys.bits)
    prefix, fixed_shift, remaining, matching = 0, keys.bits, keep, n_total
    live = [s.numel() > 0 for s in scores]
    piece_counts = [s.numel() for s in scores]
    bounds = None
    cut_value = None
    for shift, width in plan:
        local = _histograms(scores, keys, live, bounds, shift, width)
        hist = torch.zeros(1 << width, dtype=torch.int64, device=device)
        for h in local:
            if h is not None:
                hist += h
        hist = comm.all_reduce(hist.to(count_dtype), "sum").cpu()
        comm.stats.passes += 1
        b, _above, matching = _pick_bin(hist, remaining)
        remaining -= _above
        prefix |= b << shift
        fixed_shift = shift
        piece_counts = [int(h[b]) if h is not None else 0 for h in local]
        live = [c > 0 for c in piece_counts]
        bounds = keys.range_values(prefix, fixed_shift, device)
        if matching == remaining and fixed_shift > 0:
            # every candidate is kept: the cut is the smallest of them
            lows = [s.reshape(-1)[(s.reshape(-1) >= bounds[0]) & (s.reshape(-1) <= bounds[1])].min()
                    for s, alive in zip(scores, live) if alive]
            low = torch.stack(lows).min().to(torch.float64) if lows else torch.tensor(math.inf, dtype=torch.float64)
            cut_value = comm.all_reduce(low.reshape(1).to(torch.float64), "min").cpu()[0] + 0.0
            break
    cut = bounds[0] if cut_value is None else cut_value.to(dtype=dtype, device=device)
    if cut_value is None:
        cut_value = bounds[0].to(torch.float64).cpu() + 0.0  # lo == hi: the cut key's value

    # 4. ties and masks.
    exact = mode == "exact"
    tie_split = exact and fixed_shift == 0 and remaining < matching
    keep_ties = [None] * len(scores)   # None: every local tie by the plain rule
    if tie_split:
        mine = torch.zeros(most, dtype=torch.int64)
        mine[:len(scores)] = torch.tensor(piece_counts, dtype=torch.int64)
        ties = comm.all_gather(mine)
        before = 0
        for _, _, r, j in slots:
            t = int(ties[r, j])
            if r == comm.rank:
                keep_ties[j] = max(0, min(t, remaining - before))
            before += t
    with torch.no_grad():
        for j, (s, m) in enumerate(zip(scores, masks)):
            x = s.reshape(-1)
            kept = x >= cut if exact and keep_ties[j] is None else x > cut
            if keep_ties[j]:
                where = (x == cut).nonzero().flatten()[:keep_ties[j]]
                kept[where] = True
            m.copy_(kept.view(m.shape))
    st = comm.stats
    logger.debug("sharded_global_threshold: rank %d/%d, %d passes, %d collectives, %d payload bytes",
                 comm.rank, comm.world, st.passes, len(st.collectives), st.payload_bytes)
    return (cut_value, st) if return_stats else cut_value
