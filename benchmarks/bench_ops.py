"""Op benchmarks on a ResNet-50-shaped list (161 tensors, 25.6 M float32 scores), each op
against the plain-PyTorch way of doing the same thing, in the same run:

  global_threshold (keep 10 %)  vs  torch.cat + torch.sort / torch.kthvalue / torch.topk, and
                                "one read": torch._foreach_norm over the same list, the least a
                                threshold can cost (every score read once); also on a tie-heavy
                                input (95 % of the scores exactly 0, the cut inside the zeros)
  density_decay_                vs  per-tensor degree sums + pow + mul in PyTorch
  restoration_scores            vs  per-tensor degree sums + where in PyTorch

The baselines compute the same cut value and write the same bool masks (`torch.ge(s, cut,
out=m)`), so every row does the whole job. Besides time, the rows of the threshold group
report the bytes allocated through the torch allocator during one call (torch.profiler,
profile_memory=True): ours allocates only its histograms and a few candidates; the baselines
allocate the concatenated copy and the sort / select outputs.

    pytest benchmarks/bench_ops.py --benchmark-only

A summary table (markdown) is printed at the end. Set WIDETOPO_BENCH_ASSERT=1 to also fail the
run when the targets (>= 10x faster than cat+sort, >= 3x faster than cat+kthvalue) are missed;
off by default because other load on the machine skews single runs.

`python benchmarks/bench_ops.py [rounds]` prints the interleaved threshold-vs-one-read table
(ResNet-50, its 95 %-zeros variant, 102 M scores; medians).

WIDETOPO_BENCH_LARGE=1 adds a 102 M-score list (four ResNet-50 lists, ResNet-152 / ViT-B
sized) to show that time and memory grow linearly.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import widetopo_ext  # noqa: F401  (loads the compiled ops into torch.ops.widetopo)
from conftest import allocated_bytes, record, resnet50_score_list, with_zeros

ops = torch.ops.widetopo
DENSITY = 0.1
ROUNDS = int(os.environ.get("WIDETOPO_BENCH_OP_ROUNDS", "3"))
THRESHOLD_GROUP = "global_threshold (ResNet-50, 25.6M float32, keep 10%)"
TIES_GROUP = "global_threshold (ResNet-50, 95% zeros: ties at the cut, keep 10%)"
LARGE_GROUP = "global_threshold (102M float32 = 4 x ResNet-50, keep 10%)"
ONE_READ = "one read: torch._foreach_norm"
_TIMES: dict[str, dict[str, float]] = {}


def _keep(scores):
    return round(DENSITY * sum(s.numel() for s in scores))


def _masks_like(scores):
    return [torch.empty(s.shape, dtype=torch.bool) for s in scores]


def _write_masks(scores, masks, cut):
    for s, m in zip(scores, masks):
        torch.ge(s, cut, out=m)


def _cat(scores):
    return torch.cat([s.reshape(-1) for s in scores])


def threshold_cat_sort(scores, masks, keep):
    flat = _cat(scores)
    cut = torch.sort(flat).values[flat.numel() - keep]
    _write_masks(scores, masks, cut)
    return cut


def threshold_cat_kthvalue(scores, masks, keep):
    flat = _cat(scores)
    cut = torch.kthvalue(flat, flat.numel() - keep + 1).values
    _write_masks(scores, masks, cut)
    return cut


def threshold_cat_topk(scores, masks, keep):
    flat = _cat(scores)
    cut = torch.topk(flat, keep, sorted=False).values.min()
    _write_masks(scores, masks, cut)
    return cut


def one_read(scores, masks, keep):
    """Not a threshold: one streaming read of every score (the floor of any threshold)."""
    return torch._foreach_norm(scores)


THRESHOLD_IMPLS = {
    "widetopo global_threshold exact": lambda s, m, k: ops.global_threshold(s, m, k, "exact"),
    "widetopo global_threshold official": lambda s, m, k: ops.global_threshold(s, m, k, "official"),
    ONE_READ: one_read,
    "torch.cat + torch.sort": threshold_cat_sort,
    "torch.cat + torch.kthvalue": threshold_cat_kthvalue,
    "torch.cat + torch.topk": threshold_cat_topk,
}


@pytest.fixture(scope="session")
def resnet50_tie_scores(resnet50_scores):
    """The ResNet-50 scores with 95 % set to exactly 0 (like the scores of pruned weights):
    keep 10 % puts the cut inside a run of ~24 M equal scores."""
    return with_zeros(resnet50_scores)


def _check_threshold(name, cut, scores, masks, keep):
    if name == ONE_READ:
        return
    # Every implementation must find the same cut (the keep-th largest score).
    expected = torch.kthvalue(_cat(scores), sum(s.numel() for s in scores) - keep + 1).values
    assert float(cut) == float(expected)
    kept = sum(int(m.sum()) for m in masks)
    if name.endswith("exact"):
        assert kept == keep
    elif name.endswith("official"):  # prunes every score <= the cut: keep - 1 minus ties
        assert kept <= keep - 1
    else:  # baselines keep every score >= the cut
        assert kept >= keep


def _threshold_row(benchmark, group, scores, name):
    benchmark.group = group
    keep = _keep(scores)
    masks = _masks_like(scores)
    fn = THRESHOLD_IMPLS[name]
    cut = benchmark.pedantic(fn, args=(scores, masks, keep), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    _check_threshold(name, cut, scores, masks, keep)
    alloc = allocated_bytes(lambda: fn(scores, masks, keep))
    record(group, name, benchmark, alloc, ours=name.startswith("widetopo"))
    if benchmark.stats is not None:  # (None under --benchmark-disable: the results are still checked)
        _TIMES.setdefault(group, {})[name] = float(benchmark.stats.stats.median)


@pytest.mark.parametrize("name", list(THRESHOLD_IMPLS))
def test_global_threshold(benchmark, resnet50_scores, name):
    _threshold_row(benchmark, THRESHOLD_GROUP, resnet50_scores, name)


@pytest.mark.parametrize("name", ["widetopo global_threshold exact", "widetopo global_threshold official",
                                  ONE_READ, "torch.cat + torch.sort", "torch.cat + torch.kthvalue"])
def test_global_threshold_ties(benchmark, resnet50_tie_scores, name):
    _threshold_row(benchmark, TIES_GROUP, resnet50_tie_scores, name)


@pytest.mark.skipif(os.environ.get("WIDETOPO_BENCH_LARGE") != "1", reason="set WIDETOPO_BENCH_LARGE=1 (102 M scores, ~0.6 GB)")
@pytest.mark.parametrize("name", ["widetopo global_threshold exact", ONE_READ, "torch.cat + torch.kthvalue"])
def test_global_threshold_large(benchmark, resnet50_scores, name):
    scores = _large_scores(resnet50_scores)
    _threshold_row(benchmark, LARGE_GROUP, scores, name)


_LARGE: list = []


def _large_scores(base):
    """Four copies of the ResNet-50 list, each scaled by a different factor (distinct values)."""
    if not _LARGE:
        _LARGE.extend(s * f for f in (1.0, 0.5, 2.0, 0.75) for s in base)
    return _LARGE


def test_threshold_targets(benchmark):
    """Ratios of the threshold groups (needs the rows above in the same run)."""
    benchmark.group = "targets"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    times = _TIMES.get(THRESHOLD_GROUP, {})
    ours = times.get("widetopo global_threshold exact")
    if ours is None or len(times) < len(THRESHOLD_IMPLS):
        pytest.skip("run together with test_global_threshold to compare")
    vs_sort = times["torch.cat + torch.sort"] / ours
    vs_kth = times["torch.cat + torch.kthvalue"] / ours
    vs_read = ours / times[ONE_READ]
    info = dict(speedup_vs_cat_sort=vs_sort, speedup_vs_cat_kthvalue=vs_kth, times_one_read=vs_read)
    ties = _TIMES.get(TIES_GROUP, {})
    if "widetopo global_threshold exact" in ties and ONE_READ in ties:
        info["ties_times_one_read"] = ties["widetopo global_threshold exact"] / ties[ONE_READ]
    benchmark.extra_info.update(info)
    print("\nthreshold ratios:", ", ".join(f"{k} = {v:.1f}" for k, v in info.items()))
    if os.environ.get("WIDETOPO_BENCH_ASSERT") == "1":
        assert vs_sort >= 10.0, f"only {vs_sort:.1f}x faster than cat+sort (target 10x)"
        assert vs_kth >= 3.0, f"only {vs_kth:.1f}x faster than cat+kthvalue (target 3x)"
        assert vs_read <= 4.0, f"{vs_read:.1f}x one read of the scores (target 4x)"


# ---- density decay -------------------------------------------------------------------------

def density_decay_torch(scores, masks, exponent):
    """S[o,i,k] *= (m / max(out_deg[o] in_deg[i], 1))^exponent, straightforward PyTorch."""
    for s, m in zip(scores, masks):
        if s.dim() < 2:
            continue
        mf = m.reshape(m.shape[0], m.shape[1], -1).to(s.dtype)
        out_deg = mf.sum(dim=(1, 2))
        in_deg = mf.sum(dim=(0, 2))
        denom = (out_deg[:, None] * in_deg[None, :]).clamp_min(1.0)[:, :, None]
        s.mul_(((mf / denom) ** exponent).reshape(s.shape))


DECAY_IMPLS = {
    "widetopo density_decay_": lambda s, m, e: ops.density_decay_(s, m, e),
    "plain PyTorch": density_decay_torch,
}


@pytest.mark.parametrize("name", list(DECAY_IMPLS))
def test_density_decay(benchmark, resnet50_scores, resnet50_masks, name):
    group = "density_decay_ (ResNet-50, 25.6M float32, density 0.3)"
    benchmark.group = group
    work = [s.clone() for s in resnet50_scores]
    exponent = -math.log10(0.3) / 5.0

    def setup():  # fresh scores every round (repeated decay would drift into subnormals)
        for w, s in zip(work, resnet50_scores):
            w.copy_(s)
        return (work, resnet50_masks, exponent), {}

    benchmark.pedantic(DECAY_IMPLS[name], setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    check = [s.clone() for s in resnet50_scores[:4]]
    density_decay_torch(check, resnet50_masks[:4], exponent)
    for a, b in zip(work[:4], check):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    record(group, name, benchmark, ours=name.startswith("widetopo"))


# ---- restoration scores ----------------------------------------------------------------------

def restoration_scores_torch(masks, noise, noise_scale):
    out = []
    for m, n in zip(masks, noise):
        if m.dim() < 2:
            out.append(torch.where(m, 2.0, 1.0))
            continue
        mf = m.reshape(m.shape[0], m.shape[1], -1).float()
        o, i, k = mf.shape
        out_density = mf.sum(dim=(1, 2)) / (i * k)
        in_density = mf.sum(dim=(0, 2)) / (o * k)
        pruned = (1 - out_density)[:, None] * (1 - in_density)[None, :] + noise_scale * n
        out.append(torch.where(mf.bool(), 2.0, pruned[:, :, None]).reshape(m.shape))
    return out


RESTORE_IMPLS = {
    "widetopo restoration_scores": lambda m, n, s: ops.restoration_scores(m, n, s),
    "plain PyTorch": restoration_scores_torch,
}


@pytest.mark.parametrize("name", list(RESTORE_IMPLS))
def test_restoration_scores(benchmark, resnet50_masks, name):
    group = "restoration_scores (ResNet-50 masks, density 0.3)"
    benchmark.group = group
    g = torch.Generator().manual_seed(2)
    noise = [torch.randn(m.shape[0], m.shape[1], generator=g) if m.dim() >= 2 else torch.empty(0)
             for m in resnet50_masks]
    out = benchmark.pedantic(RESTORE_IMPLS[name], args=(resnet50_masks, noise, 1e-5), rounds=ROUNDS,
                             warmup_rounds=1, iterations=1)
    ref = restoration_scores_torch(resnet50_masks[:6], noise[:6], 1e-5)
    for a, b in zip(out[:6], ref):
        torch.testing.assert_close(a, b)
    record(group, name, benchmark, ours=name.startswith("widetopo"))


# ---- interleaved one-read comparison (python benchmarks/bench_ops.py [rounds]) ---------------
def interleaved_threshold_vs_one_read(rounds: int = 11) -> None:
    """global_threshold exact / official against one read (torch._foreach_norm) of the same
    list, the three alternating inside every round (medians): the ResNet-50 list, its 95 %-zeros
    variant and the 102 M list. Prints one markdown table."""
    import statistics
    import time

    base = resnet50_score_list()
    ties = with_zeros(base)
    sets = {"ResNet-50, 25.6M float32": base, "ResNet-50, 95% zeros": ties,
            "4 x ResNet-50, 102M float32": _large_scores(base)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    print("| input | one read (_foreach_norm) | exact | official | exact / one read | allocated by exact |")
    print("|---|---|---|---|---|---|")
    for name, scores in sets.items():
        masks = _masks_like(scores)
        keep = _keep(scores)
        fns = {"read": lambda: torch._foreach_norm(scores),
               "exact": lambda: ops.global_threshold(scores, masks, keep, "exact"),
               "official": lambda: ops.global_threshold(scores, masks, keep, "official")}
        times = {k: [] for k in fns}
        for r in range(rounds + 1):
            for k, f in fns.items():
                tic = time.perf_counter()
                f()
                if r:  # round 0 is the warm-up
                    times[k].append(time.perf_counter() - tic)
        med = {k: statistics.median(v) for k, v in times.items()}
        alloc = allocated_bytes(fns["exact"])
        print(f"| {name} | {med['read'] * 1e3:.1f} ms | {med['exact'] * 1e3:.1f} ms | {med['official'] * 1e3:.1f} ms "
              f"| {med['exact'] / med['read']:.1f}x | {alloc / 2 ** 20:.2f} MB |")
    print(f"load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    import sys

    interleaved_threshold_vs_one_read(int(sys.argv[1]) if len(sys.argv) > 1 else 11)
