"""Shared pieces of the op benchmarks: the ResNet-50-shaped score list, an allocation probe
(torch.profiler with profile_memory) and a summary table printed at the end of the run
(times, ratios against our op in the same group, bytes allocated during one call)."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench files import this conftest
# torch 2.13's profiler (allocated_bytes) logs "USDT ... profiler_start/stop" to stderr on every
# use, between the table rows; a level above any of kineto's keeps the output to the tables
os.environ.setdefault("KINETO_LOG_LEVEL", "99")


def resnet50_param_shapes(num_classes=1000):
    """Parameter shapes of ResNet-50 (torchvision layout), written out by hand: 161 tensors,
    25,557,032 elements - every conv / fc weight, BatchNorm weight and bias, and the fc bias."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    in_ch = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out_ch = planes * 4
            shapes += [(planes, in_ch, 1, 1), (planes,), (planes,)]   # conv1 1x1, bn1
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]  # conv2 3x3, bn2
            shapes += [(out_ch, planes, 1, 1), (out_ch,), (out_ch,)]  # conv3 1x1, bn3
            if b == 0:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]  # downsample conv, bn
            in_ch = out_ch
    shapes += [(num_classes, 2048), (num_classes,)]  # fc
    return shapes


def resnet50_score_list(dtype=torch.float32, seed=0):
    """|randn x randn| scores of `dtype` shaped like every ResNet-50 parameter (161 tensors,
    25,557,032 values), heavy-tailed like |gradient x weight| saliencies; deterministic."""
    g = torch.Generator().manual_seed(seed)
    shapes = resnet50_param_shapes()
    scores = [(torch.randn(s, generator=g, dtype=dtype) * torch.randn(s, generator=g, dtype=dtype)).abs_()
              for s in shapes]
    assert sum(math.prod(s) for s in shapes) == 25_557_032
    return scores


def with_zeros(scores, fraction=0.95, seed=5):
    """Copies of `scores` with about `fraction` of every tensor set to exactly 0 (like the
    scores of pruned weights): keep 10 % then puts the cut inside one run of equal scores."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in scores:
        t = s.clone()
        t.view(-1)[torch.rand(t.numel(), generator=g) < fraction] = 0.0
        out.append(t)
    return out


# group -> list of (name, median seconds, bytes allocated or None, is_ours)
_RESULTS: dict[str, list[tuple[str, float, int | None, bool]]] = {}


def allocated_bytes(fn) -> int:
    """Total bytes allocated through the torch CPU allocator while `fn()` runs (sum of every
    allocation, frees not subtracted: an upper bound of the extra peak memory)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return int(sum(max(e.self_cpu_memory_usage, 0) for e in prof.events()))


def record(group: str, name: str, benchmark, alloc: int | None = None, ours: bool = False) -> None:
    """Remember one measured row for the summary table (none under --benchmark-disable, a smoke run)."""
    if benchmark.stats is None:
        return
    _RESULTS.setdefault(group, []).append((name, float(benchmark.stats.stats.median), alloc, ours))
    if alloc is not None:
        benchmark.extra_info["allocated_bytes"] = alloc


def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("widetopo op benchmark summary")
    tr.write_line(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tr.write_line("| group | implementation | median time | time / ours | allocated during call |")
    tr.write_line("|---|---|---|---|---|")
    for group, rows in _RESULTS.items():
        ours = [t for _, t, _, o in rows if o]
        ref = ours[0] if ours else None  # the first row of ours in the group (the default mode)
        for name, t, alloc, _ in rows:
            ratio = f"{t / ref:.1f}x" if ref else "-"
            tr.write_line(f"| {group} | {name} | {t * 1e3:.1f} ms | {ratio} | {_fmt_bytes(alloc)} |")


@pytest.fixture(scope="session")
def resnet50_scores():
    """float32 scores shaped like every ResNet-50 parameter (161 tensors, 25,557,032 values),
    heavy-tailed like |gradient x weight| saliencies."""
    return resnet50_score_list()


@pytest.fixture(scope="session")
def resnet50_masks(resnet50_scores):
    """Random bool masks at density 0.3 for the decay / restoration benchmarks."""
    g = torch.Generator().manual_seed(1)
    return [torch.rand(s.shape, generator=g) < 0.3 for s in resnet50_scores]
