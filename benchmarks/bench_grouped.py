"""Two costs quoted in docs/architectures.md, each a ratio against a plain baseline in the same run.

(a) Grouped unit graphs (widetopo.sparsity.topology). density_decay_, restoration_scores and
    mask_stats take one UnitLayout per tensor; a tensor with groups > 1 is computed blockwise
    with batched torch reductions over its (g, O/g, I/g, K) view, a tensor with groups = 1 goes
    to the compiled op (widetopo_ext) as a dense (O, I, K) graph. The tensor is a 1024-channel
    depthwise conv weight (1024, 1, 3, 3), 50 % kept at random. The same tensor is read with
    groups g = 1, 4, 32, 256, 1024 (each a valid conv: in_channels = g, out_channels = 1024, so
    the size stays fixed and only the number of blocks changes); "plain op" = g = 1, the
    compiled op on the same tensor. The column "op per block" is the alternative the blockwise
    path replaced: one list entry of the compiled op per group block (g views of O/g rows).
    The same sweep on a 64x larger tensor (1024, 64, 3, 3) (fewer rounds) shows how much of the
    ratio is per-call overhead rather than per-entry work.
    Then a whole MobileNetV3-small list (tests/arch_models.py, 54 prunable tensors, 11 of them
    depthwise) in one call with its true layouts vs the same list read as dense graphs
    (layouts=None): the engine's per-round cost on a real grouped network.
    density_decay_ writes in place, so each timed call starts from a copy made outside the timer.

(b) The twice_differentiable() mode (widetopo.scores.differentiable): a TorchFunctionMode active
    during the scoring forward of methods with needs_double_backward (WideTopo with mu1 != 0,
    GraSP). On a plain CNN nothing is substituted, so its cost is the mode's dispatch overhead on
    every torch call of the forward. Timed: one NTK-trace Hessian-vector product, i.e.
    widetopo.scores.ntk.ntk_score (forward, grad of <v, f>, ||g||^2, grad again; 1 probe) on the
    zoo's resnet20 (CIFAR, random init), a random batch of 16 (then 2) 3x32x32 images, with
    ScoreContext.twice_differentiable = True (what the engine sets for WideTopo) vs False (what it
    sets for first-order methods). Same context, same batch, same probe; only the flag differs.

Variants are interleaved (A B A B ...) and the median of the rounds is reported, with the 1-minute
load average, because the machine is shared.

    OMP_NUM_THREADS=1 PYTHONPATH=python:. python benchmarks/bench_grouped.py [rounds]

About 40 s with the defaults on one CPU thread.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import widetopo_ext  # noqa: E402
from widetopo.models import build_model  # noqa: E402
from widetopo.scores.base import Batch, ScoreContext  # noqa: E402
from widetopo.scores.ntk import ntk_score  # noqa: E402
from widetopo.sparsity import topology  # noqa: E402
from widetopo.sparsity.selection import select_prunable  # noqa: E402
from widetopo.sparsity.topology import UnitLayout  # noqa: E402

GROUPS = (1, 4, 32, 256, 1024)
EXPONENT = 0.5  # -log10(density) / compression factor of a typical round
CALLS = 20  # op calls per timed sample (summed)


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min), {os.cpu_count()} CPUs, " \
           f"torch threads {torch.get_num_threads()}"


def _interleaved(variants: dict, rounds: int) -> dict:
    """{name: median seconds of fn()} with the variants run A B C A B C ... (one warm-up each)."""
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- (a) grouped ops
def _decay_timer(scores, masks, layouts, per_block: int = 0):
    """Seconds of CALLS calls of density_decay_, each on a fresh copy (copy untimed).
    per_block = g: the compiled op with one list entry per group block instead."""
    src = [s.clone() for s in scores]

    def run():
        total = 0.0
        for _ in range(CALLS):
            for s, c in zip(scores, src):
                s.copy_(c)
            if per_block:
                s_list = list(scores[0].chunk(per_block, dim=0))
                m_list = list(masks[0].chunk(per_block, dim=0))
                t0 = time.perf_counter()
                widetopo_ext.density_decay_(s_list, m_list, EXPONENT)
            else:
                t0 = time.perf_counter()
                topology.density_decay_(scores, masks, layouts, EXPONENT)
            total += time.perf_counter() - t0
        return total / CALLS
    return run


def _restore_timer(masks, noise, layouts, per_block: int = 0):
    def run():
        if per_block:
            m_list = list(masks[0].chunk(per_block, dim=0))
            n_list = list(noise[0].chunk(per_block, dim=0))
            t0 = time.perf_counter()
            for _ in range(CALLS):
                widetopo_ext.restoration_scores(m_list, n_list, widetopo_ext.DEFAULT_NOISE_SCALE)
        else:
            t0 = time.perf_counter()
            for _ in range(CALLS):
                topology.restoration_scores(masks, noise, layouts=layouts)
        return (time.perf_counter() - t0) / CALLS
    return run


def _stats_timer(masks, layouts, per_block: int = 0):
    def run():
        if per_block:
            m_list = list(masks[0].chunk(per_block, dim=0))
            t0 = time.perf_counter()
            for _ in range(CALLS):
                widetopo_ext.mask_stats(m_list)
        else:
            t0 = time.perf_counter()
            for _ in range(CALLS):
                topology.mask_stats(masks, layouts)
        return (time.perf_counter() - t0) / CALLS
    return run


def _one_tensor(gen, shape):
    scores = [torch.rand(shape, generator=gen)]
    masks = [torch.rand(shape, generator=gen) < 0.5]
    noise = [torch.randn(shape[:2], generator=gen)]
    return scores, masks, noise


def bench_depthwise(rounds: int, shape=(1024, 1, 3, 3)) -> None:
    gen = torch.Generator().manual_seed(0)
    scores, masks, noise = _one_tensor(gen, shape)
    print(f"\n(a) one tensor {shape}, 50 % kept, read with groups g; "
          f"median of {rounds} interleaved rounds of {CALLS} calls; {_load()}")
    ops = {
        "density_decay_": lambda lay, pb: _decay_timer(scores, masks, lay, pb),
        "restoration_scores": lambda lay, pb: _restore_timer(masks, noise, lay, pb),
        "mask_stats": lambda lay, pb: _stats_timer(masks, lay, pb),
    }
    print("| op | g | blockwise (us) | x plain op (g = 1) | op per block (us) | x plain op |")
    print("|---|---:|---:|---:|---:|---:|")
    for op, make in ops.items():
        variants = {}
        for g in GROUPS:
            variants[("blockwise", g)] = make([UnitLayout(groups=g)], 0)
            if g > 1:
                variants[("per block", g)] = make(None, g)
        med = _interleaved(variants, rounds)
        plain = med[("blockwise", 1)]
        for g in GROUPS:
            b = med[("blockwise", g)]
            if g == 1:
                print(f"| {op} | 1 | {b * 1e6:.1f} (plain op) | 1.00 | | |")
            else:
                p = med[("per block", g)]
                print(f"| {op} | {g} | {b * 1e6:.1f} | {b / plain:.2f} | {p * 1e6:.1f} | {p / plain:.1f} |")
    print(f"(after: {_load()})")


def bench_mobilenet(rounds: int) -> None:
    from arch_models import mobilenet_v3_small

    torch.manual_seed(0)
    model = mobilenet_v3_small(num_classes=10)
    names = select_prunable(model)
    params = dict(model.named_parameters())
    layouts = topology.unit_layouts(model, names)
    gen = torch.Generator().manual_seed(1)
    masks = [torch.rand(params[n].shape, generator=gen) < 0.5 for n in names]
    scores = [torch.rand(params[n].shape, generator=gen) for n in names]
    grouped = sum(lay.groups > 1 for lay in layouts)
    numel = sum(m.numel() for m in masks)

    def noise_for(lays):
        return [None if topology.noise_shape(m.shape, lay) is None
                else torch.randn(topology.noise_shape(m.shape, lay), generator=gen)
                for m, lay in zip(masks, lays)]

    dense = [topology.DENSE] * len(names)
    n_true, n_dense = noise_for(layouts), noise_for(dense)
    print(f"\n(a) MobileNetV3-small list ({len(names)} tensors, {grouped} grouped, {numel:,} weights), 50 % kept, "
          f"one call per op; median of {rounds} interleaved rounds of {CALLS} calls; {_load()}")
    print("| op | true layouts (us) | all read as dense (us) | ratio |")
    print("|---|---:|---:|---:|")
    for op, (a, b) in {
        "density_decay_": (_decay_timer(scores, masks, layouts), _decay_timer(scores, masks, dense)),
        "restoration_scores": (_restore_timer(masks, n_true, layouts), _restore_timer(masks, n_dense, dense)),
        "mask_stats": (_stats_timer(masks, layouts), _stats_timer(masks, dense)),
    }.items():
        med = _interleaved({"true": a, "dense": b}, rounds)
        print(f"| {op} | {med['true'] * 1e6:.1f} | {med['dense'] * 1e6:.1f} | {med['true'] / med['dense']:.2f} |")
    print(f"(after: {_load()})")


# --------------------------------------------------------------------------- (b) the mode
def bench_mode(rounds: int, model_name: str = "resnet20", batch_size: int = 16) -> None:
    torch.manual_seed(0)
    model = build_model(model_name)
    names = select_prunable(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    masks = [torch.ones_like(params[n], dtype=torch.bool) for n in names]
    gen = torch.Generator().manual_seed(2)
    batch = Batch(index=0, x=torch.randn(batch_size, 3, 32, 32, generator=gen),
                  y=torch.randint(0, 10, (batch_size,), generator=gen))

    def timer(flag: bool):
        ctx = ScoreContext(model=model, names=list(names), params=params, buffers=buffers,
                           masks=masks, round=1, seed=0, twice_differentiable=flag)

        def run():
            t0 = time.perf_counter()
            ntk_score(ctx, batch, probes=1)
            return time.perf_counter() - t0
        return run

    on, off = timer(True), timer(False)
    # same scores either way (the mode substitutes nothing in a plain CNN)
    torch.manual_seed(0)
    same = all(torch.equal(a, b) for a, b in zip(
        ntk_score(ScoreContext(model, list(names), params, buffers, masks, 1, 0, twice_differentiable=True), batch),
        ntk_score(ScoreContext(model, list(names), params, buffers, masks, 1, 0, twice_differentiable=False), batch)))
    print(f"\n(b) NTK-trace HVP (ntk_score, 1 probe) on {model_name}, batch {batch_size}x3x32x32; "
          f"median of {rounds} interleaved rounds; {_load()}")
    med = _interleaved({"on": on, "off": off}, rounds)
    print("| twice_differentiable | seconds per HVP |")
    print("|---|---:|")
    print(f"| off (first-order methods) | {med['off']:.4f} |")
    print(f"| on (WideTopo mu1 != 0, GraSP) | {med['on']:.4f} |")
    print(f"mode on / off = {med['on'] / med['off']:.3f} ({(med['on'] / med['off'] - 1) * 100:+.1f} %); "
          f"scores identical: {same}")
    print(f"(after: {_load()})")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    print(f"torch {torch.__version__}; {_load()}")
    bench_depthwise(rounds)
    bench_depthwise(max(3, rounds // 3), (1024, 64, 3, 3))
    bench_mobilenet(rounds)
    bench_mode(rounds, batch_size=16)
    bench_mode(rounds, batch_size=2)


if __name__ == "__main__":
    main()
