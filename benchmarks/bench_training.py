"""Masked training overhead: one SGD step (forward, backward, momentum + weight-decay update) of a
CIFAR ResNet-20 on one batch, unmasked vs masked two ways:

  dense     the unmasked step of the dense network
  plain     the unmasked step of the same network with its pruned weights zeroed once (no
            enforcement): the like-for-like baseline - same numbers flow, only the masking
            machinery is missing. (A 5%-dense network can be slower than the dense one for
            numerical reasons - tiny activations/gradients becoming denormal floats - which is
            not masking overhead; the table shows both.)
  enforcer  plain parameters + MaskEnforcer(mask_grads=True): pruned grads zeroed before the
            step, weights and momentum buffers zeroed after it (two fused op calls per step)
  prune     apply_masks (torch.nn.utils.prune form): weight = weight_orig * weight_mask in a
            forward pre-hook, and its backward

Target: overhead <= 5% per step. The three variants are timed interleaved (A B C A B C ...)
and compared by their medians, so load drifts on a shared machine hit all of them alike.

    pytest benchmarks/bench_training.py        # pytest-benchmark rows + the comparison test
    python benchmarks/bench_training.py        # the interleaved comparison only

Environment: WIDETOPO_BENCH_TRAIN_BATCH (64), WIDETOPO_BENCH_TRAIN_STEPS (9 timed steps per
variant), WIDETOPO_BENCH_TRAIN_DENSITY (0.05), WIDETOPO_BENCH_MAX_OVERHEAD (0.05; the
comparison test's limit).
"""
from __future__ import annotations

import copy
import os
import statistics
import time

import pytest
import torch
from torch import nn

from widetopo.models import build_model
from widetopo.sparsity.selection import select_prunable
from widetopo.sparsity.apply import MaskEnforcer, apply_masks

BATCH = int(os.environ.get("WIDETOPO_BENCH_TRAIN_BATCH", 64))
STEPS = int(os.environ.get("WIDETOPO_BENCH_TRAIN_STEPS", 9))
DENSITY = float(os.environ.get("WIDETOPO_BENCH_TRAIN_DENSITY", 0.05))
MAX_OVERHEAD = float(os.environ.get("WIDETOPO_BENCH_MAX_OVERHEAD", 0.05))


def make_variants():
    """Three (model, optimizer, step) setups from the same initialization and one batch."""
    torch.manual_seed(0)
    base = build_model("resnet20", 3, 10, 32)
    gen = torch.Generator().manual_seed(1)
    params = dict(base.named_parameters())
    masks = {n: torch.rand(params[n].shape, generator=gen) < DENSITY for n in select_prunable(base)}
    x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)

    def setup(kind):
        model = copy.deepcopy(base).train()
        if kind == "plain":
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in masks:
                        p.mul_(masks[n])
        if kind == "prune":
            apply_masks(model, masks)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if kind == "enforcer":
            MaskEnforcer(model, masks, opt, mask_grads=True)

        def step():
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        return step

    return {kind: setup(kind) for kind in ("dense", "plain", "enforcer", "prune")}


def interleaved(steps: int = STEPS, warmup: int = 2) -> dict:
    """Median seconds per step of each variant, timed in interleaved order."""
    variants = make_variants()
    for _ in range(warmup):
        for step in variants.values():
            step()
    times = {k: [] for k in variants}
    for _ in range(steps):
        for kind, step in variants.items():
            start = time.perf_counter()
            step()
            times[kind].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def format_table(medians: dict) -> str:
    base, dense = medians["plain"], medians["dense"]
    lines = [f"ResNet-20, batch {BATCH}x3x32x32, mask density {DENSITY}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, median of {STEPS} interleaved steps",
             "| variant | s / step | vs plain (same sparse weights, unmasked) | vs dense |", "|---|---|---|---|"]
    for kind, t in medians.items():
        lines.append(f"| {kind} | {t:.3f} | {100 * (t / base - 1):+.1f}% | {100 * (t / dense - 1):+.1f}% |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def variants():
    return make_variants()


@pytest.mark.parametrize("kind", ["dense", "plain", "enforcer", "prune"])
def test_training_step(benchmark, variants, kind):
    step = variants[kind]
    step()  # warm-up
    benchmark.pedantic(step, rounds=max(3, STEPS // 3), iterations=1)
    try:
        from conftest import record

        record("training step (ResNet-20)", kind, benchmark, ours=kind == "plain")
    except ImportError:  # run outside benchmarks/
        pass


def test_masked_step_overhead():
    medians = interleaved()
    print("\n" + format_table(medians))
    for kind in ("enforcer", "prune"):
        overhead = medians[kind] / medians["plain"] - 1
        assert overhead <= MAX_OVERHEAD, f"{kind}: {100 * overhead:.1f}% overhead per step (limit {100 * MAX_OVERHEAD:.0f}%)"


if __name__ == "__main__":
    print(format_table(interleaved()))
