"""Seconds per scoring round of every registered method (widetopo.methods.all_methods()) on a
CIFAR ResNet-20 and one batch of 32 random 3x32x32 images with labels, next to one plain
forward + backward (cross entropy, train mode) of the same network in the same run.

A round is what the engine does per round: the scorer's prepass / score / finalize
(widetopo.engine.rounds.compute_scores) and the mask selection (widetopo.engine.rounds.select_masks, to half
the current weights), on the engine's working state (widetopo.engine.state.PruneState). The state is
reset to theta_init and dense masks after every timed round (outside the timer), so every
round scores the same dense network. Methods and the baseline run interleaved, WARMUP
untimed rounds first, and the table gives medians over REPS.

    python benchmarks/bench_methods.py                  # markdown table on stdout
    WIDETOPO_BENCH_REPS=5 WIDETOPO_BENCH_METHODS=px,synflow-l2 python benchmarks/bench_methods.py
    WIDETOPO_BENCH_METHODS=pags:population=20 python benchmarks/bench_methods.py   # a variant

Environment: WIDETOPO_BENCH_REPS (3), WIDETOPO_BENCH_WARMUP (1), WIDETOPO_BENCH_BATCH_SIZE (32),
WIDETOPO_BENCH_MODEL (resnet20), WIDETOPO_BENCH_METHODS (comma list of names or variants
NAME:KEY=VALUE[:KEY=VALUE], as in `widetopo compare`; default every method at its defaults),
WIDETOPO_BENCH_DEVICE (cpu), WIDETOPO_BENCH_THREADS (torch default), WIDETOPO_BENCH_OUT (json path).
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from widetopo.engine import rounds
from widetopo.methods import all_methods, get_method
from widetopo.models import build_model
from widetopo.sparsity.selection import select_prunable
from widetopo.scores.base import Batch
from widetopo.engine.state import PruneState


def _env(name, default, cast=int):
    value = os.environ.get(name)
    return default if value in (None, "") else cast(value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_round(method, model, batches, device, options=None) -> Callable[[int], None]:
    """One engine round of `method` with `options` ({name: value}) set (closure over its scorer
    and working state)."""
    scorer = method.make_scorer(**(options or {}))
    state = PruneState(model, select_prunable(model), device)
    keep = state.n_prunable // 2

    def one_round(index: int) -> None:
        ctx = state.context(index, seed=0)
        scores = rounds.compute_scores(scorer, ctx, batches, device, "bench")
        rounds.select_masks(scorer, ctx, scores, keep, "exact", 5.0, state.kept, state.n_prunable)
        _sync(device)

    def reset() -> None:
        state.set_masks([torch.ones_like(m) for m in state.masks])
        state.reset_to_init()

    return one_round, reset


def make_baseline(model, batches, device) -> Callable[[int], None]:
    net = copy.deepcopy(model).train()

    def forward_backward(index: int) -> None:
        net.zero_grad(set_to_none=True)
        for b in batches:
            F.cross_entropy(net(b.x), b.y).backward()
        _sync(device)

    return forward_backward, lambda: None


def measure(reps: int, warmup: int, cases: Dict[str, tuple]) -> Dict[str, List[float]]:
    times = {name: [] for name in cases}
    for rep in range(warmup + reps):
        for name, (run, reset) in cases.items():  # interleaved: drift hits every case alike
            tic = time.perf_counter()
            run(rep + 1)
            elapsed = time.perf_counter() - tic
            reset()
            if rep >= warmup:
                times[name].append(elapsed)
    return times


def main() -> int:
    reps, warmup = _env("WIDETOPO_BENCH_REPS", 3), _env("WIDETOPO_BENCH_WARMUP", 1)
    batch_size = _env("WIDETOPO_BENCH_BATCH_SIZE", 32)
    device = torch.device(_env("WIDETOPO_BENCH_DEVICE", "cpu", str))
    threads = _env("WIDETOPO_BENCH_THREADS", 0)
    if threads:
        torch.set_num_threads(threads)
    wanted = _env("WIDETOPO_BENCH_METHODS", "", str)
    if wanted:  # names or variants NAME:KEY=VALUE..., parsed and validated as `widetopo compare` does
        from widetopo.experiments.compare import parse_variant, variant_name

        specs = [parse_variant(n) for n in wanted.split(",") if n.strip()]
        methods = [(variant_name(name, opts), get_method(name), opts) for name, opts in specs]
    else:
        methods = [(m.name, m, {}) for m in all_methods()]

    torch.manual_seed(0)
    model = build_model(_env("WIDETOPO_BENCH_MODEL", "resnet20", str), in_channels=3, num_classes=10,
                        image_size=32).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=g).to(device)
    batches = [Batch(0, x, y)]

    cases = {"forward+backward (baseline)": make_baseline(model, batches, device)}
    for label, m, opts in methods:
        cases[label] = make_round(m, model, batches, device, opts)
    times = measure(reps, warmup, cases)

    base = statistics.median(times["forward+backward (baseline)"])
    rows = ["| method | s / round (median) | min | max | × forward+backward |", "|---|---|---|---|---|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(f"| `{name}` | {med:.3f} | {min(ts):.3f} | {max(ts):.3f} | {med / base:.1f} |")
    header = (f"ResNet-20, one batch of {batch_size} images 3x32x32, {device}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}; "
              f"medians of {reps} interleaved rounds after {warmup} warm-up")
    print(header)
    print("\n".join(rows))
    out = _env("WIDETOPO_BENCH_OUT", "", str)
    if out:
        with open(out, "w") as f:
            json.dump({"header": header, "times": times, "table": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
