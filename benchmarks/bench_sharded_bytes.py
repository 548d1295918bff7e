"""Bytes and time of the sharded global top-k against gathering every score, on gloo ranks (CPU).

ResNet-50-shaped scores (161 tensors, 25,557,032 values, benchmarks/conftest.py) are split over
`--ranks` gloo processes on loopback, keep = 10 %, mode "exact", in four cases:

  float32 whole   whole tensors, contiguous blocks of tensors per rank (index=None, rank order)
  float32 FSDP    every tensor cut along dim 0 into one piece per rank (FSDP2 / fully_shard
                  layout: each rank holds a row-major flat slice of all 161 tensors), with
                  index = (global tensor, offset, numel)
  float32 ties    the FSDP layout with 95 % of the scores exactly 0: the cut falls inside the
                  run of zeros, so the tie counts are gathered too
  float64 whole   float64 scores, whole tensors

Each case runs `sharded_global_threshold(..., return_stats=True)` (bytes from its ShardStats:
`payload` = bytes each rank contributes, summed over the collectives; `received` = bytes each rank
receives with ring algorithms, all_gather (w-1) n, all_reduce 2 (w-1)/w n) against the plain
baseline that does the same job by gathering every score once: each rank concatenates its scores,
pads them to the largest rank's count, torch.distributed.all_gather's them, and runs the
single-process widetopo_ext.global_threshold over every rank's pieces in global order (the layout
of every rank is known to all, as FSDP's metadata is, so no size exchange is counted). Its bytes
are counted with the same ShardStats bookkeeping over the all_gather it actually issued.
Times: wall clock of one call, the slowest rank, median over --repeats (after one warm-up),
the two calls alternating (in brackets: the baseline's all_gather alone). Every rank also checks
that both calls' masks and cut equal one process's widetopo_ext.global_threshold over the full
list; the run fails otherwise.

    OMP_NUM_THREADS=1 PYTHONPATH=python:. python benchmarks/bench_sharded_bytes.py --ranks 2

Prints one markdown table. Each rank runs one thread; ranks > cores oversubscribe the machine
(times then include waiting for a core; the byte counts do not depend on it).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import widetopo_ext
from widetopo.distributed.sharded import ShardStats, sharded_global_threshold

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import resnet50_score_list, with_zeros  # noqa: E402

sys.path.append(str(HERE.parent / "tests"))
from gloo import spawn  # noqa: E402

DENSITY = 0.1
CASES = [  # (name, dtype, layout, zeros)
    ("float32, whole tensors", torch.float32, "whole", False),
    ("float32, FSDP pieces", torch.float32, "fsdp", False),
    ("float32, FSDP pieces, 95% zeros (ties at the cut)", torch.float32, "fsdp", True),
    ("float64, whole tensors", torch.float64, "whole", False),
]


# --------------------------------------------------------------------------- layouts
def whole_layout(full, world):
    """Per rank: (tensor, offset, numel) of whole tensors, contiguous blocks in rank order,
    a tensor going to the rank whose 1/world share of the elements holds its middle."""
    total = sum(t.numel() for t in full)
    per_rank = [[] for _ in range(world)]
    start = 0
    for t, x in enumerate(full):
        owner = min(world - 1, int((start + x.numel() / 2) * world / total))
        per_rank[owner].append((t, 0, x.numel()))
        start += x.numel()
    return per_rank


def fsdp_layout(full, world):
    """Per rank: its dim-0 chunk of every tensor (ceil(rows / world) rows each, as
    torch.chunk / fully_shard), as (tensor, flat offset, numel); empty chunks left out."""
    per_rank = [[] for _ in range(world)]
    for t, x in enumerate(full):
        rows = x.shape[0]
        row = x.numel() // rows
        step = -(-rows // world)
        for r in range(world):
            lo, hi = min(r * step, rows), min((r + 1) * step, rows)
            if hi > lo:
                per_rank[r].append((t, lo * row, (hi - lo) * row))
    return per_rank


def piece(x, off, n):
    """The view of x's flat elements [off, off + n) as whole rows (or x itself)."""
    if off == 0 and n == x.numel():
        return x
    return x.reshape(-1)[off:off + n].view(-1, *x.shape[1:])


# --------------------------------------------------------------------------- the two calls
def sharded(local, masks, keep, index):
    return sharded_global_threshold(local, masks, keep, "exact", index=index, return_stats=True)


def gather_then_select(local, masks, keep, layout, full_shapes, dtype, world, rank):
    """The baseline: all_gather every rank's scores, then one global_threshold over all pieces."""
    counts = [sum(n for _, _, n in pieces) for pieces in layout]
    most = max(counts)
    buf = torch.zeros(most, dtype=dtype)
    if local:
        torch.cat([s.reshape(-1) for s in local], out=buf[:counts[rank]])
    bufs = [torch.empty_like(buf) for _ in range(world)]
    tic = time.perf_counter()
    dist.all_gather(bufs, buf)
    gather_s = time.perf_counter() - tic
    stats = ShardStats(world=world, collectives=[("all_gather", most, buf.element_size())])
    order = []  # every rank's pieces, as views into the gathered buffers, in global order
    for r, pieces in enumerate(layout):
        pos = 0
        for t, off, n in pieces:
            order.append((t, off, r, bufs[r][pos:pos + n].view(-1, *full_shapes[t][1:])))
            pos += n
    order.sort(key=lambda e: (e[0], e[1]))
    views = [v for _, _, _, v in order]
    all_masks = [torch.empty(v.shape, dtype=torch.bool) for v in views]
    cut = widetopo_ext.global_threshold(views, all_masks, keep, "exact")
    mine = [m for (_, _, r, _), m in zip(order, all_masks) if r == rank]
    for m, dst in zip(mine, masks):
        dst.copy_(m.view(dst.shape))
    return cut, stats, gather_s


# --------------------------------------------------------------------------- one rank
def _case_scores(dtype, zeros, cache):
    if dtype not in cache:
        cache.clear()  # one dtype's list at a time (memory)
        cache[dtype] = resnet50_score_list(dtype)
    base = cache[dtype]
    return with_zeros(base) if zeros else base


def run_case(case, world, rank, repeats, cache):
    name, dtype, layout_name, zeros = case
    full = _case_scores(dtype, zeros, cache)
    n_total = sum(x.numel() for x in full)
    keep = round(DENSITY * n_total)
    layout = (whole_layout if layout_name == "whole" else fsdp_layout)(full, world)
    mine = layout[rank]
    local = [piece(full[t], off, n) for t, off, n in mine]
    index = None if layout_name == "whole" else [(t, off, full[t].numel()) for t, off, _ in mine]
    shapes = [x.shape for x in full]
    masks_s = [torch.empty(s.shape, dtype=torch.bool) for s in local]
    masks_b = [torch.empty(s.shape, dtype=torch.bool) for s in local]

    times = {"sharded": [], "gather": [], "all_gather": []}
    for rep in range(repeats + 1):  # rep 0: warm-up
        dist.barrier()
        tic = time.perf_counter()
        cut_s, st_s = sharded(local, masks_s, keep, index)
        t_s = time.perf_counter() - tic
        dist.barrier()
        tic = time.perf_counter()
        cut_b, st_b, t_g = gather_then_select(local, masks_b, keep, layout, shapes, dtype, world, rank)
        t_b = time.perf_counter() - tic
        if rep:
            times["sharded"].append(t_s)
            times["gather"].append(t_b)
            times["all_gather"].append(t_g)

    # the reference: one process over the full list (no group involved)
    ref = [torch.empty(x.shape, dtype=torch.bool) for x in full]
    cut_ref = widetopo_ext.global_threshold(full, ref, keep, "exact")
    want = [piece(ref[t], off, n) for t, off, n in mine]
    ok_s = all(torch.equal(a, b) for a, b in zip(masks_s, want)) and float(cut_s) == float(cut_ref)
    ok_b = all(torch.equal(a, b) for a, b in zip(masks_b, want)) and float(cut_b) == float(cut_ref)
    return {"name": name, "n": n_total, "keep": keep, "pieces": len(mine), "most": max(len(p) for p in layout),
            "scores_bytes": n_total * full[0].element_size(),
            "kept": sum(int(m.sum()) for m in masks_s), "ok_sharded": ok_s, "ok_gather": ok_b,
            "sharded": {"payload": st_s.payload_bytes, "received": st_s.ring_bytes_sent,
                        "collectives": [k for k, _, _ in st_s.collectives], "passes": st_s.passes},
            "gather": {"payload": st_b.payload_bytes, "received": st_b.ring_bytes_sent,
                       "collectives": [k for k, _, _ in st_b.collectives]},
            "times": times}


def _worker(rank, world, port, outdir, repeats):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        cache = {}
        results = [run_case(case, world, rank, repeats, cache) for case in CASES]
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- report
def _size(b):
    for unit, f in (("MB", 1e6), ("KB", 1e3)):
        if b >= f:
            return f"{b / f:.1f} {unit}"
    return f"{b:.0f} B"


def report(ranks, world):
    print(f"torch {torch.__version__}, {world} gloo ranks on loopback, 1 thread each, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; ResNet-50 shapes, {ranks[0][0]['n']:,} scores, keep 10 %, exact")
    print("| case | pieces / rank (most) | passes | collectives | sharded: payload / rank | sharded: received / rank "
          "| gather: payload / rank | gather: received / rank | received, gather / sharded | sharded time "
          "| gather + select time (all_gather alone) | time, gather / sharded | masks = one process |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    bad = []
    for i in range(len(CASES)):
        rows = [r[i] for r in ranks]
        r0 = rows[0]
        for r, row in enumerate(rows):  # every rank counts the same bytes
            assert row["sharded"]["payload"] == r0["sharded"]["payload"], (r0["name"], r)
        ok = all(row["ok_sharded"] and row["ok_gather"] for row in rows) and sum(row["kept"] for row in rows) == r0["keep"]
        if not ok:
            bad.append(r0["name"])
        med = {k: statistics.median(max(row["times"][k][j] for row in rows) for j in range(len(r0["times"][k])))
               for k in ("sharded", "gather", "all_gather")}
        s, g = r0["sharded"], r0["gather"]
        kinds = ", ".join(f"{s['collectives'].count(k)} {k}" for k in dict.fromkeys(s["collectives"]))
        print(f"| {r0['name']} | {r0['most']} | {s['passes']} | {len(s['collectives'])} ({kinds}) "
              f"| {s['payload']:,} B ({_size(s['payload'])}) | {_size(s['received'])} "
              f"| {_size(g['payload'])} | {_size(g['received'])} | {g['received'] / s['received']:,.0f}x "
              f"| {med['sharded'] * 1e3:.0f} ms | {med['gather'] * 1e3:.0f} ms ({med['all_gather'] * 1e3:.0f} ms) "
              f"| {med['gather'] / med['sharded']:.2f}x "
              f"| {'yes' if ok else 'NO'} |")
    print(f"(all scores once: {_size(ranks[0][0]['scores_bytes'])} float32, {_size(ranks[0][3]['scores_bytes'])} "
          f"float64; load {os.getloadavg()[0]:.1f} at the end)")
    if bad:
        raise SystemExit(f"masks or cut differ from one process in: {bad}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="gloo processes (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each kind per case, after a warm-up")
    p.add_argument("--timeout", type=float, default=600, help="seconds before the ranks are ended")
    args = p.parse_args(argv)
    if args.ranks < 2 or args.repeats < 1:
        p.error("--ranks must be >= 2 and --repeats >= 1")
    with tempfile.TemporaryDirectory() as outdir:
        spawn(_worker, args.ranks, outdir, args.repeats, timeout=args.timeout)
        ranks = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(args.ranks)]
    report(ranks, args.ranks)


if __name__ == "__main__":
    main()
