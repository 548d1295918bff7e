"""sharded_global_threshold: 2 and 3 gloo processes over loopback, scores split across ranks as
whole tensors and as uneven flat slices (FSDP), must give the masks and the cut of one process
running widetopo_ext.global_threshold over the full list - also with heavy ties at the cut, for
both modes, float32 and float64 (and the 16-bit dtypes). Every case runs in the spawned workers;
the reference is computed here, in the test process, from the same deterministic tensors. One
spawn of three processes serves both world sizes (world 2 runs in a two-rank subgroup)."""
import datetime
import math
import os

import pytest
import torch

import widetopo_ext
from widetopo_ext import reference
from widetopo.distributed.sharded import DIGIT_BITS, ShardStats, sharded_global_threshold

from gloo import spawn

pytestmark = [pytest.mark.needs_kernel("global_threshold"), pytest.mark.usefixtures("one_thread")]

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

SHAPES = [(4, 3, 3), (5,), (6, 4), (1,), (3, 7), (2, 2, 2, 2)]
LAYOUTS = ("whole", "whole_index", "slices", "fsdp")
KINDS = ("distinct", "ties", "zeros")
MODES = ("exact", "official")


# --------------------------------------------------------------------------- cases
def full_scores(kind, dtype, seed, scale=1):
    """The global tensors of a case (deterministic). "ties": values in {0, 1, 2}, so the cut
    falls inside a run of about N/3 equal scores; "zeros": +0.0 / -0.0 / small values, which
    must tie and order like the floats; one tensor is a non-contiguous (transposed) view."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for j, shape in enumerate(SHAPES):
        shape = (shape[0] * scale,) + shape[1:]
        if kind == "distinct":
            x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        elif kind == "ties":
            x = torch.randint(0, 3, shape, generator=g).to(dtype)
        else:
            x = torch.randint(-1, 2, shape, generator=g).to(dtype) * torch.tensor(0.0, dtype=dtype)
            x.view(-1)[::3] = torch.tensor(torch.finfo(dtype).tiny, dtype=dtype) * (j - 2)
        if j == 2:
            x = x.t().contiguous().t()  # same values, transposed strides
        out.append(x)
    return out


def split_points(n, world, g):
    """Uneven cut points 0 = c_0 <= ... <= c_world = n (empty parts allowed)."""
    cuts = sorted(torch.randint(0, n + 1, (world - 1,), generator=g).tolist())
    return [0] + cuts + [n]


def pieces_of(layout, full, world, seed):
    """Per rank: list of (global tensor, offset, length, as_whole) describing its local pieces."""
    g = torch.Generator().manual_seed(seed + 1)
    sizes = [t.numel() for t in full]
    per_rank = [[] for _ in range(world)]
    if layout == "whole":  # contiguous blocks of tensors per rank, rank order = global order
        c = split_points(len(full), world, g)
        for r in range(world):
            per_rank[r] = [(t, 0, sizes[t], True) for t in range(c[r], c[r + 1])]
    elif layout == "whole_index":  # tensor t on rank (2t + 1) % world, listed in reverse
        for t in reversed(range(len(full))):
            per_rank[(2 * t + 1) % world].append((t, 0, sizes[t], True))
    elif layout == "slices":  # every tensor cut into one uneven flat slice per rank
        for t, n in enumerate(sizes):
            c = split_points(n, world, g)
            for r in range(world):
                per_rank[r].append((t, c[r], c[r + 1] - c[r], False))
        for r in range(world):  # local order is arbitrary when index is given
            perm = torch.randperm(len(per_rank[r]), generator=g).tolist()
            per_rank[r] = [per_rank[r][i] for i in perm]
    else:  # "fsdp": one flat buffer of all tensors split into world uneven chunks
        starts = [sum(sizes[:t]) for t in range(len(sizes))]
        c = split_points(sum(sizes), world, g)
        for r in range(world):
            for t, (s0, n) in enumerate(zip(starts, sizes)):
                lo, hi = max(c[r], s0), min(c[r + 1], s0 + n)
                if lo < hi:
                    per_rank[r].append((t, lo - s0, hi - lo, False))
    return per_rank


def local_tensors(full, pieces):
    return [full[t] if whole else full[t].reshape(-1)[off:off + n] for t, off, n, whole in pieces]


def keeps_for(n):
    return sorted({0, 1, n // 3, n // 2, n - 1, n})


def cases_for(world):
    """World 2 runs every case, world 3 (three processes on a small machine) the whole-tensor
    (no index, a rank may hold nothing) and the FSDP layouts."""
    return [c for c in all_cases() if world == 2 or c[0] in ("whole", "fsdp")]


def all_cases():
    """The distributed cases: every layout x kind x mode for float32, the distinct and tie-heavy
    kinds for float64, a few 16-bit ones; keeps 1, N/3, N/2 and N (keep 0 once per layout).
    (The one-process tests below run every keep of keeps_for through the same code path.)"""
    cases = []
    for layout in LAYOUTS:
        for dtype, kinds in ((torch.float32, KINDS), (torch.float64, ("distinct", "ties"))):
            for kind in kinds:
                for mode in MODES:
                    seed = len(cases)
                    n = sum(t.numel() for t in full_scores(kind, dtype, seed))
                    for keep in sorted({1, n // 3, n // 2, n}):
                        cases.append((layout, kind, dtype, mode, keep, seed))
        cases.append((layout, "ties", torch.float32, "exact", 0, 999))
    for dtype in (torch.float16, torch.bfloat16):
        for layout in ("slices", "whole_index"):
            cases.append((layout, "distinct", dtype, "exact", 40, 1000 + len(cases)))
            cases.append((layout, "ties", dtype, "exact", 40, 1000 + len(cases)))
            cases.append((layout, "ties", dtype, "official", 40, 1000 + len(cases)))
    return cases


def run_case(case, world, rank, scale=1, group=None):
    layout, kind, dtype, mode, keep, seed = case
    full = full_scores(kind, dtype, seed, scale)
    pieces = pieces_of(layout, full, world, seed)[rank]
    scores = local_tensors(full, pieces)
    masks = [torch.ones(s.shape, dtype=torch.bool) for s in scores]
    index = None if layout == "whole" else [(t, off, full[t].numel()) for t, off, _, _ in pieces]
    cut, stats = sharded_global_threshold(scores, masks, keep, mode, index=index, group=group, return_stats=True)
    return {"masks": masks, "cut": cut, "payload": stats.payload_bytes, "passes": stats.passes,
            "collectives": stats.collectives, "ring": stats.ring_bytes_sent}


# --------------------------------------------------------------------------- error cases (every rank runs them)
def _failure(call):
    try:
        call()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def error_cases(rank, world, group=None):
    f32 = [torch.arange(6, dtype=torch.float32).reshape(2, 3) + rank]
    masks = lambda s: [torch.zeros(t.shape, dtype=torch.bool) for t in s]  # noqa: E731
    whole = [(rank, 0, 6)]
    n = 6 * world

    def call(scores, keep, mode="exact", index=whole):
        ms = masks(scores)
        before = [m.clone() for m in ms]
        try:
            return sharded_global_threshold(scores, ms, keep, mode, index=index, group=group)
        except Exception:
            assert all(torch.equal(a, b) for a, b in zip(ms, before)), "a failed call wrote a mask"
            raise

    nan = [f32[0].clone()]
    if rank == world - 1:
        nan[0][1, 1] = math.nan
    return {
        "keep_above_n": _failure(lambda: call(f32, n + 1)),
        "keep_negative": _failure(lambda: call(f32, -1)),
        "keep_differs": _failure(lambda: call(f32, 3 + rank)),
        "mode_differs": _failure(lambda: call(f32, 3, "exact" if rank else "official")),
        "dtype_across_ranks": _failure(lambda: call([f32[0].double()] if rank == 1 else f32, 3)),
        "dtype_within_rank": _failure(lambda: call(f32 + [torch.zeros(2).double()] if rank == 1 else f32, 3,
                                                   index=whole + [(world, 0, 2)] if rank == 1 else whole)),
        "overlap": _failure(lambda: call(f32, 3, index=[(0, 0 if rank == 0 else 5, 6 * world)])),
        "gap": _failure(lambda: call(f32, 3, index=[(0, 7 * rank, 7 * world)])),
        "missing_tensor": _failure(lambda: call(f32, 3, index=[(2 * rank, 0, 6)])),
        "numel_differs": _failure(lambda: call(f32, 3, index=[(0, 6 * rank, 6 * world + rank)])),
        "bad_index_entry": _failure(lambda: call(f32, 3, index=[(rank, 0)] if rank == 0 else whole)),
        "nan": _failure(lambda: call(nan, 3)),
        # the group is still in step after all of the above
        "after": _failure(lambda: call(f32, 3)),
    }


# --------------------------------------------------------------------------- workers
def _worker(rank, world, port, outdir):
    """Three processes: first ranks 0 and 1 run the world-2 cases in a subgroup (the `group=`
    argument; rank 2 waits), then all three the world-3 cases in the default group."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        pair = torch.distributed.new_group([0, 1])
        for w, group in ((2, pair), (3, None)):
            if rank >= w:
                continue
            out = {"results": {case: run_case(case, w, rank, group=group) for case in cases_for(w)},
                   "big": {case: run_case(case, w, rank, scale=50, group=group) for case in BIG_CASES},
                   "errors": error_cases(rank, w, group=group)}
            torch.save(out, os.path.join(outdir, f"world{w}_rank{rank}.pt"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


BIG_CASES = [("slices", "distinct", torch.float32, "exact", 1000, 7), ("fsdp", "ties", torch.float64, "exact", 1000, 8)]


def run_spawned(world, outdir, timeout=180):
    spawn(_worker, world, outdir, timeout=timeout)


@pytest.fixture(scope="module")
def spawned_dir(tmp_path_factory):
    """One spawn of three gloo processes for the whole module."""
    outdir = tmp_path_factory.mktemp("sharded")
    run_spawned(3, str(outdir))
    return outdir


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def spawned(request, spawned_dir):
    world = request.param
    return world, [torch.load(spawned_dir / f"world{world}_rank{r}.pt", weights_only=False) for r in range(world)]


# --------------------------------------------------------------------------- the reference
def expected(case, world, scale=1):
    """Masks of one process over the full list, cut into every rank's pieces, and the cut.
    global_threshold (the compiled op) and the sort-based reference must agree first."""
    layout, kind, dtype, mode, keep, seed = case
    full = full_scores(kind, dtype, seed, scale)
    ref_masks = [torch.zeros(t.shape, dtype=torch.bool) for t in full]
    cut = widetopo_ext.global_threshold(full, ref_masks, keep, mode)
    sort_masks = [torch.zeros(t.shape, dtype=torch.bool) for t in full]
    sort_cut = reference.global_threshold(full, sort_masks, keep, mode)
    assert all(torch.equal(a, b) for a, b in zip(ref_masks, sort_masks)) and float(cut) == float(sort_cut)
    per_rank = []
    for pieces in pieces_of(layout, full, world, seed):
        per_rank.append(local_tensors(ref_masks, pieces))
    return per_rank, cut


def test_masks_and_cut_equal_one_process(spawned):
    world, ranks = spawned
    cases = cases_for(world)
    assert len(ranks[0]["results"]) == len(cases)
    for case in cases:
        want, cut = expected(case, world)
        for r in range(world):
            got = ranks[r]["results"][case]
            assert len(got["masks"]) == len(want[r]), case
            for a, b in zip(got["masks"], want[r]):
                assert torch.equal(a, b), (case, r)
            assert got["cut"].dtype == torch.float64 and got["cut"].dim() == 0
            assert (float(got["cut"]) == float(cut)) or (math.isinf(cut) and math.isinf(got["cut"])), (case, r)


def plan_widths(dtype):
    bits = torch.finfo(dtype).bits
    return [min(DIGIT_BITS, bits - p * DIGIT_BITS) for p in range((bits + DIGIT_BITS - 1) // DIGIT_BITS)]


def check_bytes(case, world, ranks_results, scale=1):
    """Payload of every rank = the documented formula, where the tie gather is expected exactly
    when the cut falls inside a run of equal scores (decided here from a sort of the full list)."""
    layout, kind, dtype, mode, keep, seed = case
    full = full_scores(kind, dtype, seed, scale)
    n = sum(t.numel() for t in full)
    most = max(len(p) for p in pieces_of(layout, full, world, seed))
    widths = plan_widths(dtype)
    got = ranks_results[0]
    passes = got["passes"]
    kinds = [k for k, _, _ in got["collectives"]]
    early = "all_reduce_min" in kinds
    tie_split = kinds.count("all_gather") == (3 if layout != "whole" else 2)
    flat = torch.cat([t.reshape(-1).double() for t in full])
    if mode == "exact" and 0 < keep:
        c = torch.sort(flat, descending=True).values[keep - 1]
        assert tie_split == bool((flat == c).sum() > keep - (flat > c).sum()), case
    else:
        assert not tie_split, case
    if keep == 0 or n == 0:
        assert passes == 0
    else:
        assert 1 <= passes <= len(widths) and (early or passes == len(widths)), case
    formula = (8 * 8 + (32 * most if layout != "whole" else 0) + 4 * sum(2 ** w for w in widths[:passes])
               + 8 * early + 8 * most * tie_split)
    for r, res in enumerate(ranks_results):
        assert res["payload"] == formula, (case, r)
        assert res["ring"] == pytest.approx(
            sum(((2 * (world - 1) / world) if k.startswith("all_reduce") else world - 1) * n_ * b
                for k, n_, b in res["collectives"]))
    # no term grows with the number of scores
    assert formula <= 64 + 32 * most + 4 * sum(2 ** w for w in widths) + 8 + 8 * most


def test_bytes_follow_the_formula(spawned):
    world, ranks = spawned
    for case in cases_for(world):
        check_bytes(case, world, [ranks[r]["results"][case] for r in range(world)])


def test_fifty_times_more_scores(spawned):
    world, ranks = spawned
    for case in BIG_CASES:
        want, cut = expected(case, world, scale=50)
        for r in range(world):
            got = ranks[r]["big"][case]
            assert all(torch.equal(a, b) for a, b in zip(got["masks"], want[r])), (case, r)
            assert float(got["cut"]) == float(cut)
        check_bytes(case, world, [ranks[r]["big"][case] for r in range(world)], scale=50)


ERRORS = {  # name -> (type on the rank(s) that see it, words in the message)
    "keep_above_n": ("ValueError", "keep must be in [0, N]"),
    "keep_negative": ("ValueError", "keep must be in [0, N]"),
    "keep_differs": ("ValueError", "disagree on keep"),
    "mode_differs": ("ValueError", "disagree on mode"),
    "dtype_across_ranks": ("TypeError", "different dtypes"),
    "overlap": ("ValueError", "overlap"),
    "gap": ("ValueError", "no rank holds elements"),
    "missing_tensor": ("ValueError", "no rank holds global tensor"),
    "numel_differs": ("ValueError", "disagree on the numel"),
    "nan": ("RuntimeError", "non-finite"),
}


def test_bad_input_raises_on_every_rank(spawned):
    world, ranks = spawned
    for name, (kind, words) in ERRORS.items():
        for r in range(world):
            err = ranks[r]["errors"][name]
            assert err is not None and err[0] == kind and words in err[1], (name, r, err)
    nan = ranks[0]["errors"]["nan"][1]
    assert f"global tensor {world - 1}" in nan and f"rank {world - 1}" in nan
    # a local argument error: that rank raises its own TypeError, the others a RuntimeError
    for name, bad_rank, own in (("dtype_within_rank", 1, "TypeError"), ("bad_index_entry", 0, "TypeError")):
        for r in range(world):
            err = ranks[r]["errors"][name]
            if r == bad_rank:
                assert err[0] == own, (name, err)
            else:
                assert err[0] == "RuntimeError" and f"rank(s) [{bad_rank}]" in err[1], (name, err)
    for r in range(world):
        assert ranks[r]["errors"]["after"] is None


# --------------------------------------------------------------------------- one process
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_without_group_is_global_threshold(mode, dtype):
    full = full_scores("ties", dtype, 5)
    n = sum(t.numel() for t in full)
    for keep in keeps_for(n):
        want = [torch.zeros(t.shape, dtype=torch.bool) for t in full]
        cut = reference.global_threshold(full, want, keep, mode)
        got = [torch.ones(t.shape, dtype=torch.bool) for t in full]
        out, stats = sharded_global_threshold(full, got, keep, mode, return_stats=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want)) and float(out) == float(cut)
        assert stats.payload_bytes == 0


@pytest.mark.parametrize("layout", ["whole_index", "slices", "fsdp"])
@pytest.mark.parametrize("kind", KINDS)
def test_one_process_with_index_reassembles_the_pieces(layout, kind):
    """world 1 with an index: the generic path (no communication) over pieces in any order."""
    for dtype in (torch.float32, torch.float64):
        for mode in MODES:
            full = full_scores(kind, dtype, 11)
            for keep in keeps_for(sum(t.numel() for t in full)):
                want = [torch.zeros(t.shape, dtype=torch.bool) for t in full]
                cut = reference.global_threshold(full, want, keep, mode)
                # all ranks' pieces of a 3-way split, held by this one process
                pieces = [p for rank in pieces_of(layout, full, 3, 11) for p in rank]
                scores = local_tensors(full, pieces)
                masks = [torch.ones(s.shape, dtype=torch.bool) for s in scores]
                index = [(t, off, full[t].numel()) for t, off, _, _ in pieces]
                out = sharded_global_threshold(scores, masks, keep, mode, index=index)
                assert float(out) == float(cut), (layout, kind, dtype, mode, keep)
                for m, want_m in zip(masks, local_tensors(want, pieces)):
                    assert torch.equal(m, want_m), (layout, kind, dtype, mode, keep)


def test_one_process_bad_input():
    s = [torch.arange(6.0).reshape(2, 3), torch.arange(4.0)]
    m = [torch.zeros(2, 3, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)]
    idx = [(0, 0, 6), (1, 0, 4)]
    with pytest.raises(ValueError, match=r"keep must be in \[0, N\] where N = 10"):
        sharded_global_threshold(s, m, 11, index=idx)
    with pytest.raises(TypeError, match="keep must be an int"):
        sharded_global_threshold(s, m, 2.0, index=idx)
    with pytest.raises(ValueError, match="mode must be one of"):
        sharded_global_threshold(s, m, 2, "approx", index=idx)
    with pytest.raises(TypeError, match=r"scores\[1\] has dtype torch.float64"):
        sharded_global_threshold([s[0], s[1].double()], m, 2, index=idx)
    with pytest.raises(ValueError, match="overlap"):
        sharded_global_threshold([s[0], s[0][0]], [m[0], m[0][0].clone()], 2, index=[(0, 0, 6), (0, 1, 6)])
    with pytest.raises(ValueError, match=r"no rank holds elements \[4, 6\)"):
        sharded_global_threshold([s[1]], [m[1]], 2, index=[(0, 0, 6)])
    with pytest.raises(ValueError, match="no rank holds global tensor 1"):
        sharded_global_threshold(s, m, 2, index=[(0, 0, 6), (2, 0, 4)])
    with pytest.raises(ValueError, match="does not fit"):
        sharded_global_threshold(s, m, 2, index=[(0, 0, 6), (1, 2, 4)])
    with pytest.raises(ValueError, match="one .* triple per entry"):
        sharded_global_threshold(s, m, 2, index=idx[:1])
    bad = [s[0], s[1].clone()]
    bad[1][2] = math.inf
    with pytest.raises(RuntimeError, match="global tensor 1 contains a non-finite"):
        sharded_global_threshold(bad, m, 2, index=idx)
    assert not any(bool(x.any()) for x in m)  # no failed call wrote a mask


def test_stats_ring_formula():
    st = ShardStats(world=4, collectives=[("all_gather", 8, 8), ("all_reduce_sum", 2048, 4)])
    assert st.payload_bytes == 64 + 8192
    assert st.ring_bytes_sent == 3 * 64 + 2 * 3 / 4 * 8192


def test_chunked_histograms(monkeypatch):
    """Large tensors are histogrammed in chunks; a chunk of 7 elements gives the same result."""
    import widetopo.distributed.sharded as sharded

    monkeypatch.setattr(sharded, "_CHUNK", 7)
    for kind in KINDS:
        full = full_scores(kind, torch.float64, 3)
        pieces = [p for rank in pieces_of("slices", full, 2, 3) for p in rank]
        scores = local_tensors(full, pieces)
        index = [(t, off, full[t].numel()) for t, off, _, _ in pieces]
        for keep in keeps_for(sum(t.numel() for t in full)):
            want = [torch.zeros(t.shape, dtype=torch.bool) for t in full]
            cut = reference.global_threshold(full, want, keep, "exact")
            masks = [torch.zeros(s.shape, dtype=torch.bool) for s in scores]
            assert float(sharded_global_threshold(scores, masks, keep, index=index)) == float(cut)
            assert all(torch.equal(m, w) for m, w in zip(masks, local_tensors(want, pieces)))
