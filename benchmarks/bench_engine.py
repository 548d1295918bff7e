"""End-to-end WideTopo-S: widetopo.prune vs the plain-PyTorch, official-structure baseline
(benchmarks/official_baseline.py) in the same run, on a CIFAR ResNet-20 with a small pruning
set of random 3x32x32 images (default 2 batches of 16). The full preset is 30 scoring rounds
and 100 restoration steps per implementation: measured ~35 s per round per implementation on
the shared 2-core box under load ~10 (estimated ~8 s idle), so set WIDETOPO_BENCH_ROUNDS=2
(6 rounds, 7.8 min for both under that load) on a busy machine; 2 x 32 images doubles it. Reports seconds per scoring round and per restoration step for
both, the end-to-end speedup (target >= 2x) and the overlap of the two masks.

    pytest benchmarks/bench_engine.py            # pytest-benchmark; table printed at the end
    python benchmarks/bench_engine.py            # same measurement, table only

Environment (to shrink the run on a slow machine; defaults = the full WideTopo-S preset):
    WIDETOPO_BENCH_BATCHES=2  WIDETOPO_BENCH_BATCH_SIZE=16  WIDETOPO_BENCH_IMAGE_SIZE=32
    WIDETOPO_BENCH_ROUNDS=10 (T = T')  WIDETOPO_BENCH_RESTORE_STEPS=50  WIDETOPO_BENCH_RESTORATIONS=2
    WIDETOPO_BENCH_MODEL=resnet20  WIDETOPO_BENCH_DENSITY=0.05
    WIDETOPO_BENCH_MIN_SPEEDUP=2.0   (the speedup the comparison test requires)
    WIDETOPO_BENCH_MIN_IOU=0.9       (the mask overlap the comparison test requires)
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
from widetopo import engine as _engine  # noqa: E402
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
MIN_SPEEDUP = _env("WIDETOPO_BENCH_MIN_SPEEDUP", 2.0, float)
MIN_IOU = _env("WIDETOPO_BENCH_MIN_IOU", 0.9, float)

RESULTS: dict = {}


def setup_problem():
    """The model (seeded Kaiming init) and the pruning batches (seeded N(0, 1) images)."""
    torch.manual_seed(0)
    model = build_model(CONFIG["model"], 3, 10, CONFIG["image_size"])
    gen = torch.Generator().manual_seed(1)
    s = CONFIG["image_size"]
    data = [torch.randn(CONFIG["batch_size"], 3, s, s, generator=gen) for _ in range(CONFIG["batches"])]
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

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "kept_engine": kept_e,
        "kept_baseline": kept_b,
        "common": common,
        "common_fraction": common / max(kept_b, 1),
        "iou": common / max(union, 1),
        "layers_differing": layers_differing,
        "engine_round_s": mean(engine["round_seconds"]),
        "baseline_round_s": mean(baseline["round_seconds"]),
        "engine_restore_step_s": mean(engine["restore_step_seconds"]),
        "baseline_restore_step_s": mean(baseline["restore_step_seconds"]),
        "engine_rounds": len(engine["round_seconds"]),
        "baseline_rounds": len(baseline["round_seconds"]),
        "engine_total_s": engine["total"],
        "baseline_total_s": baseline["total"],
        "speedup": baseline["total"] / engine["total"],
    }


def table(c: dict) -> str:
    cfg = CONFIG
    head = (f"WideTopo-S on {cfg['model']} ({cfg['batches']} x {cfg['batch_size']} random 3x{cfg['image_size']}"
            f"x{cfg['image_size']} images), density {cfg['density']}, T = T' = {cfg['rounds']}, "
            f"R = {cfg['restorations']}, J = {cfg['restore_steps']}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
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
                 f"IoU {c['iou']:.4%}; layers differing: {len(c['layers_differing'])}")
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
    c = compare(RESULTS["engine"], RESULTS["baseline"])
    with capsys.disabled():
        print("\n" + table(c))
    _save(c)
    assert c["engine_rounds"] == c["baseline_rounds"]
    assert c["kept_engine"] == c["kept_baseline"]
    assert c["iou"] >= MIN_IOU, f"masks differ more than floating-point noise: IoU {c['iou']:.4f}"
    assert c["speedup"] >= MIN_SPEEDUP, f"end-to-end speedup {c['speedup']:.2f}x < {MIN_SPEEDUP}x"


def _save(c: dict) -> None:
    out = os.environ.get("WIDETOPO_BENCH_OUT")
    if out:
        import json

        Path(out).write_text(json.dumps({"config": CONFIG, "results": c, "table": table(c)}, indent=2))


def main() -> None:
    model, data = setup_problem()
    engine = run_engine(model, data)
    baseline = run_baseline(model, data)
    c = compare(engine, baseline)
    print(table(c))
    _save(c)


if __name__ == "__main__":
    main()
