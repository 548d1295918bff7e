"""Cost of the rounding-noise guard (widetopo.engine.rounds.NoiseScoresError): seconds of one
scoring round with and without the scorer's noise-floor probe, in the same run, interleaved.

PX: the probe reruns the h-net forward and backward (two samples) in float32 every round.
SNIP / iterative SNIP / GraSP: the probe recomputes the gradient (GraSP: Hg) of two samples in the
model's dtype and in float64, in round 1 only, so its cost is per run, not per round. The baseline
is the same scorer with the probe off (PX) or in a later round (the others).

    python benchmarks/bench_noise_guard.py            # CIFAR ResNet-20, one batch of 100 images

Environment: WIDETOPO_BENCH_REPS (3), WIDETOPO_BENCH_BATCH_SIZE (100), WIDETOPO_BENCH_MODEL (resnet20).
"""
from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn

from widetopo.models import build_model
from widetopo.scores.base import Batch, ScoreContext
from widetopo.scores.baselines import SNIPScorer
from widetopo.scores.grasp import GraSPScorer
from widetopo.scores.px import PXScorer


def context(model, round_index):
    names = [n + ".weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    masks = [torch.ones_like(params[n], dtype=torch.bool) for n in names]
    return ScoreContext(model=model, names=names, params=params, buffers=buffers, masks=masks, round=round_index)


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main():
    reps = int(os.environ.get("WIDETOPO_BENCH_REPS", "3"))
    n = int(os.environ.get("WIDETOPO_BENCH_BATCH_SIZE", "100"))
    torch.manual_seed(0)
    model = build_model(os.environ.get("WIDETOPO_BENCH_MODEL", "resnet20"), 3, 10, 32)
    g = torch.Generator().manual_seed(1)
    batch = Batch(0, torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))

    px, px_off = PXScorer(), PXScorer()
    px_off._noise_floor = lambda *a, **k: None  # the same scorer without its probe

    def run_px(scorer):
        ctx = context(model, 2)
        scorer.finalize(ctx, scorer.score(ctx, [batch]))

    def run_snip(round_index):  # round 1 probes, later rounds do not
        ctx = context(model, round_index)
        s = SNIPScorer()
        s.finalize(ctx, s.score(ctx, [batch]))

    def run_grasp(round_index):
        ctx = context(model, round_index)
        s = GraSPScorer()
        ctx.prepass = s.prepass(ctx, [batch])
        s.score(ctx, [batch])

    rows = []
    for label, on, off in (("px round (probe every round)", lambda: run_px(px), lambda: run_px(px_off)),
                           ("snip round 1 (probe) vs later round", lambda: run_snip(1), lambda: run_snip(2)),
                           ("grasp round 1 (probe) vs later round", lambda: run_grasp(1), lambda: run_grasp(2))):
        off()  # warm-up
        t_on, t_off = [], []
        for _ in range(reps):
            t_on.append(timed(on, 1))
            t_off.append(timed(off, 1))
        a, b = statistics.median(t_on), statistics.median(t_off)
        rows.append(f"| {label} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    print(f"batch of {n} 3x32x32 images, {torch.get_num_threads()} thread(s), median of {reps}")
    print("| round | with probe (s) | without (s) | ratio |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
