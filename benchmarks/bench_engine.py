"""End-to-end WideTopo-S: widetopo.prune vs the plain-PyTorch, official-structure baseline
(benchmarks/official_baseline.py) in the same run, on a CIFAR ResNet-20 with a small pruning
set of random 3x32x32 images (default 2 batches of 16). The full preset is 30 scoring rounds
and 100 restoration steps per implementation. On our idle 2-core machine a round of 2 x 32
images takes ~1.5-2 s for either implementation; the whole module (float64 check included)
runs in about 3 minutes with the defaults (set WIDETOPO_BENCH_ROUNDS=2 for a quick look).
Reports seconds per scoring round and per restoration step (medians) for both, the end-to-end
speedup (target >= 2x) and the overlap of the two masks.

Mask overlap: both implementations compute the same scores up to floating-point evaluation
order, but in float32 the ITA finite difference carries rounding noise of a few percent, and
over 30 rounds of score -> threshold -> re-score any flipped weight changes every later score:
the final float32 masks of the two overlap only partly, while each is exactly reproducible.
test_float64_masks_agree therefore checks agreement where rounding noise is negligible, with
both implementations in float64 (2 x 8 images, the same schedule).

    pytest benchmarks/bench_engine.py            # pytest-benchmark; table printed at the end
    python benchmarks/bench_engine.py            # same float32 measurement, table only

Environment (to shrink the run on a slow machine; defaults = the full WideTopo-S preset):
    WIDETOPO_BENCH_BATCHES=2  WIDETOPO_BENCH_BATCH_SIZE=16  WIDETOPO_BENCH_IMAGE_SIZE=32
    WIDETOPO_BENCH_ROUNDS=10 (T = T')  WIDETOPO_BENCH_RESTORE_STEPS=50  WIDETOPO_BENCH_RESTORATIONS=2
    WIDETOPO_BENCH_MODEL=resnet20  WIDETOPO_BENCH_DENSITY=0.05
    WIDETOPO_BENCH_PAIRS=1           (engine/baseline pairs; more pairs run interleaved, and the
                                      table gives medians: the machine's drift hits both sides)
    WIDETOPO_BENCH_MIN_SPEEDUP=2.0   (the speedup the comparison test requires)
    WIDETOPO_BENCH_MIN_IOU=0.99      (the float64 mask overlap test_float64_masks_agree requires)
    WIDETOPO_BENCH_F64_BATCH_SIZE=8  (batch size of that float64 comparison)
    WIDETOPO_BENCH_OUT=path.json     (also write the numbers and the table there)
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from official_baseline import prune_baseline  # noqa: E402

import widetopo  # noqa: E402
from widetopo.engine import pruner as _engine  # noqa: E402
from widetopo.models import build_model  # noqa: E402


def _env(name, default, cast=int):
    value = os.environ.get(name)
    return default if value in (None, "") else cast(value)


CONFIG = {
    "model": _env("WIDETOPO_BENCH_MODEL", "resnet20", str),
    "batches": _env("WIDETOPO_BENCH_BATCHES", 2),
    "batch_size": _env("WIDETOPO_BENCH_BATCH_SIZE", 16),
    "image_size": _env("WIDETOPO_BENCH_IMAGE_SIZE", 32),
    "rounds": _env("WIDETOPO_BENCH_ROUNDS", 10),
    "restore_steps": _env("WIDETOPO_BENCH_RESTORE_STEPS", 50),
    "restorations": _env("WIDETOPO_BENCH_RESTORATIONS", 2),
    "density": _env("WIDETOPO_BENCH_DENSITY", 0.05, float),
    "seed": 0,
}
PAIRS = _env("WIDETOPO_BENCH_PAIRS", 1)
MIN_SPEEDUP = _env("WIDETOPO_BENCH_MIN_SPEEDUP", 2.0, float)
MIN_IOU = _env("WIDETOPO_BENCH_MIN_IOU", 0.99, float)
F64_BATCH_SIZE = _env("WIDETOPO_BENCH_F64_BATCH_SIZE", 8)

RESULTS: dict = {}


def setup_problem(dtype=torch.float32, batch_size=None):
    """The model (seeded Kaiming init) and the pruning batches (seeded N(0, 1) images)."""
    torch.manual_seed(0)
    model = build_model(CONFIG["model"], 3, 10, CONFIG["image_size"]).to(dtype)
    gen = torch.Generator().manual_seed(1)
    s, n = CONFIG["image_size"], batch_size or CONFIG["batch_size"]
    data = [torch.randn(n, 3, s, s, generator=gen).to(dtype) for _ in range(CONFIG["batches"])]
    return model, data


def _schedule_options():
    return {
        "rounds": CONFIG["rounds"],
        "restorations": CONFIG["restorations"],
        "restore_steps": CONFIG["restore_steps"],
        "restore_rounds": CONFIG["rounds"],
    }


@contextlib.contextmanager
def _engine_timers(timings):
    """Time the engine's scoring rounds and restorations by wrapping Pruner._score_round and
    the engine's restore_masks (restoration time is split evenly over its steps)."""
    score_round, restore = _engine.Pruner._score_round, _engine.restore_masks

    def timed_round(self, *args, **kwargs):
        tic = time.perf_counter()
        try:
            return score_round(self, *args, **kwargs)
        finally:
            timings["round_seconds"].append(time.perf_counter() - tic)

    def timed_restore(masks, target, restoration=0, steps=50, **kwargs):
        tic = time.perf_counter()
        try:
            return restore(masks, target, restoration, steps, **kwargs)
        finally:
            n = steps - kwargs.get("start_step", 0)
            timings["restore_step_seconds"] += [(time.perf_counter() - tic) / max(n, 1)] * n

    _engine.Pruner._score_round, _engine.restore_masks = timed_round, timed_restore
    try:
        yield
    finally:
        _engine.Pruner._score_round, _engine.restore_masks = score_round, restore


def run_engine(model, data):
    timings = {"round_seconds": [], "restore_step_seconds": []}
    with _engine_timers(timings):
        tic = time.perf_counter()
        masks = widetopo.prune(model, data, CONFIG["density"], method="widetopo-s", seed=CONFIG["seed"],
                               verbose=False, **_schedule_options())
        total = time.perf_counter() - tic
    return {"masks": {n: m.clone() for n, m in masks.items()}, "total": total, **timings}


def run_baseline(model, data):
    timings = {"round_seconds": [], "restore_step_seconds": []}
    tic = time.perf_counter()
    masks = prune_baseline(model, data, CONFIG["density"], seed=CONFIG["seed"], timings=timings,
                           **_schedule_options())
    total = time.perf_counter() - tic
    return {"masks": dict(masks), "total": total, **timings}


def compare(engine, baseline) -> dict:
    names = list(baseline["masks"])
    assert list(engine["masks"]) == names, "engine and baseline prune different parameter sets"
    common = sum(int((engine["masks"][n] & baseline["masks"][n]).sum()) for n in names)
    union = sum(int((engine["masks"][n] | baseline["masks"][n]).sum()) for n in names)
    kept_e = sum(int(engine["masks"][n].sum()) for n in names)
    kept_b = sum(int(baseline["masks"][n].sum()) for n in names)
    layers_differing = [n for n in names if not torch.equal(engine["masks"][n], baseline["masks"][n])]

    def median(xs):  # a round's time: robust to the odd stall of a shared machine
        import statistics

        return statistics.median(xs) if xs else float("nan")

    return {
        "kept_engine": kept_e,
        "kept_baseline": kept_b,
        "common": common,
        "common_fraction": common / max(kept_b, 1),
        "iou": common / max(union, 1),
        "layers_differing": layers_differing,
        "engine_round_s": median(engine["round_seconds"]),
        "baseline_round_s": median(baseline["round_seconds"]),
        "engine_restore_step_s": median(engine["restore_step_seconds"]),
        "baseline_restore_step_s": median(baseline["restore_step_seconds"]),
        "engine_rounds": len(engine["round_seconds"]),
        "baseline_rounds": len(baseline["round_seconds"]),
        "engine_total_s": engine["total"],
        "baseline_total_s": baseline["total"],
        "speedup": baseline["total"] / engine["total"],
    }


def run_pairs(model, data, pairs, first=None):
    """`pairs` (engine, baseline) comparisons, the first one given or run here; the others run
    interleaved, baseline first in every second pair, so slow drift of the machine's speed
    affects both implementations alike."""
    out = [first] if first is not None else []
    for i in range(len(out), pairs):
        if i % 2:
            baseline = run_baseline(model, data)
            engine = run_engine(model, data)
        else:
            engine = run_engine(model, data)
            baseline = run_baseline(model, data)
        out.append((engine, baseline))
    return out


def combine(runs) -> dict:
    """compare() of the first pair, with every timing replaced by its median over the pairs
    and the speedup by the median of the per-pair speedups. Repeated runs must give the same
    masks (each implementation is deterministic)."""
    import statistics

    first_engine, first_baseline = runs[0]
    for engine, baseline in runs[1:]:
        for name, mask in first_engine["masks"].items():
            assert torch.equal(engine["masks"][name], mask), f"engine masks changed between repeats: {name}"
            assert torch.equal(baseline["masks"][name], first_baseline["masks"][name]), name
    pairs = [compare(e, b) for e, b in runs]
    c = dict(pairs[0])
    for key in ("engine_round_s", "baseline_round_s", "engine_restore_step_s", "baseline_restore_step_s",
                "engine_total_s", "baseline_total_s", "speedup"):
        c[key] = statistics.median(p[key] for p in pairs)
    c["pairs"] = len(pairs)
    c["pair_speedups"] = [p["speedup"] for p in pairs]
    return c


def table(c: dict) -> str:
    cfg = CONFIG
    head = (f"WideTopo-S on {cfg['model']} ({cfg['batches']} x {cfg['batch_size']} random 3x{cfg['image_size']}"
            f"x{cfg['image_size']} images), density {cfg['density']}, T = T' = {cfg['rounds']}, "
            f"R = {cfg['restorations']}, J = {cfg['restore_steps']}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; medians of {c.get('pairs', 1)} run pair(s)")
    rows = [
        ("", "widetopo.prune", "baseline", "ratio"),
        ("s / scoring round", f"{c['engine_round_s']:.3f}", f"{c['baseline_round_s']:.3f}",
         f"{c['baseline_round_s'] / c['engine_round_s']:.2f}x"),
        ("s / restoration step", f"{c['engine_restore_step_s']:.4f}", f"{c['baseline_restore_step_s']:.4f}",
         f"{c['baseline_restore_step_s'] / c['engine_restore_step_s']:.2f}x"),
        ("end to end (s)", f"{c['engine_total_s']:.1f}", f"{c['baseline_total_s']:.1f}", f"{c['speedup']:.2f}x"),
        ("kept weights", str(c["kept_engine"]), str(c["kept_baseline"]), ""),
    ]
    lines = [head]
    for r in rows:
        lines.append(f"  {r[0]:<22}{r[1]:>16}{r[2]:>14}{r[3]:>10}")
    lines.append(f"  mask overlap: {c['common']} kept in common = {c['common_fraction']:.4%} of the baseline's, "
                 f"IoU {c['iou']:.4%}; layers differing: {len(c['layers_differing'])} (float32: see the "
                 "module docstring)")
    lines.append(f"  speedup target >= {MIN_SPEEDUP:g}x: {'met' if c['speedup'] >= MIN_SPEEDUP else 'NOT met'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- pytest-benchmark
def _problem():
    if "problem" not in RESULTS:
        RESULTS["problem"] = setup_problem()
    return RESULTS["problem"]


def test_widetopo_s_engine(benchmark):
    model, data = _problem()
    result = benchmark.pedantic(run_engine, args=(model, data), rounds=1, iterations=1, warmup_rounds=0)
    RESULTS["engine"] = result
    benchmark.extra_info.update(config=dict(CONFIG), round_s=sum(result["round_seconds"]) / len(result["round_seconds"]))


def test_widetopo_s_official_structure_baseline(benchmark):
    model, data = _problem()
    result = benchmark.pedantic(run_baseline, args=(model, data), rounds=1, iterations=1, warmup_rounds=0)
    RESULTS["baseline"] = result
    benchmark.extra_info.update(config=dict(CONFIG), round_s=sum(result["round_seconds"]) / len(result["round_seconds"]))


def test_engine_vs_baseline(capsys):
    import pytest

    if "engine" not in RESULTS or "baseline" not in RESULTS:
        pytest.skip("needs both benchmark runs of this module in the same session (run the whole file)")
    model, data = _problem()
    c = combine(run_pairs(model, data, PAIRS, first=(RESULTS["engine"], RESULTS["baseline"])))
    with capsys.disabled():
        print("\n" + table(c))
    _save(c)
    assert c["engine_rounds"] == c["baseline_rounds"]
    assert c["kept_engine"] == c["kept_baseline"]
    assert c["speedup"] >= MIN_SPEEDUP, f"end-to-end speedup {c['speedup']:.2f}x < {MIN_SPEEDUP}x"


def test_float64_masks_agree(capsys):
    """Both implementations in float64 (rounding noise ~1e-16 instead of the float32 ITA's few
    percent): the full schedule must end with (nearly) the same masks."""
    model, data = setup_problem(torch.float64, F64_BATCH_SIZE)
    c = compare(run_engine(model, data), run_baseline(model, data))
    with capsys.disabled():
        print(f"\nfloat64, {CONFIG['batches']} x {F64_BATCH_SIZE} images: IoU {c['iou']:.4%}, "
              f"{len(c['layers_differing'])} layer(s) differing, kept {c['kept_engine']} / {c['kept_baseline']}")
    assert c["engine_rounds"] == c["baseline_rounds"]
    assert c["kept_engine"] == c["kept_baseline"]
    assert c["iou"] >= MIN_IOU, f"float64 masks differ: IoU {c['iou']:.4f} < {MIN_IOU}"


def _save(c: dict) -> None:
    out = os.environ.get("WIDETOPO_BENCH_OUT")
    if out:
        import json

        Path(out).write_text(json.dumps({"config": CONFIG, "results": c, "table": table(c)}, indent=2))


def main() -> None:
    model, data = setup_problem()
    c = combine(run_pairs(model, data, PAIRS))
    print(table(c))
    _save(c)


if __name__ == "__main__":
    main()
