"""`widetopo compare` wall time, one cell at a time against parallel cells: an 8-cell grid
(4 methods x 2 densities, one seed, plus the dense cell: 9 cells; 3 epochs on digits; one
CPU thread per cell) run by the CLI as

    w1    --workers 1                  the cells one after another in the command's process (the baseline)
    w2    --workers 2                  two worker processes (forked on Linux), 1 thread each
    ray2  --executor ray --workers 2   two Ray tasks at a time on a local Ray the command starts

Each is timed end to end: a fresh `python -m widetopo compare` process and output directory
(imports, worker or Ray start, data loading, every cell, journal), wall clock and the CPU seconds
of the command and the workers it waited for (Ray's own processes are not all in that count).
The configurations are interleaved
(w1 w2 ray2 w1 w2 ray2 ...) so load drifts on a shared machine hit all of them alike, and
compared by their medians. The rows of every run are checked to be identical to those of w1
(timing columns left out). The 1-minute load average is printed before and after each run.
Target: w2 <= 0.7 x w1 on 2 cores.

    python benchmarks/bench_compare_workers.py                 # 1 repeat
    python benchmarks/bench_compare_workers.py --repeats 3 --no-ray
    python benchmarks/bench_compare_workers.py --epochs 10      # heavier cells: worker start matters less
    python benchmarks/bench_compare_workers.py --methods snip,grasp,synflow,widetopo-s   # the papers' methods

The default methods (random, magnitude, snip, synflow) are the cheapest: about 0.35 s per cell, so
the fixed costs every run pays once (imports, the first optimizer step) are half of the run.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHEAP = "random,magnitude,snip,synflow"
GRID = ["--methods", CHEAP, "--densities", "0.1,0.02", "--seeds", "0", "--epochs", "3",
        "--no-plots", "--threads", "1", "-q"]
CONFIGS = {"w1": ["--workers", "1"], "w2": ["--workers", "2", "--worker-threads", "1"],
           "ray2": ["--executor", "ray", "--workers", "2", "--worker-threads", "1"]}
TIMING = {"prune_seconds", "train_seconds"}


def _rows(out: Path) -> dict:
    with open(out / "results.csv", newline="") as f:
        return {(r["method"], r["density_target"], r["seed"]): {k: v for k, v in r.items() if k not in TIMING}
                for r in csv.DictReader(f)}


def run_once(name: str, work: Path) -> tuple:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "widetopo", "compare", "-o", str(out)] + GRID + CONFIGS[name]
    load = os.getloadavg()[0]
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    now = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and the workers it waited for
    cpu_seconds = (now.ru_utime + now.ru_stime) - (used.ru_utime + used.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, cpu_seconds, load, os.getloadavg()[0], _rows(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-ray", action="store_true", help="leave out the Ray configuration")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of every cell; default: 3 (the target's grid)")
    p.add_argument("--methods", default=CHEAP, help=f"comma-separated methods of the grid; default: {CHEAP}")
    args = p.parse_args(argv)
    GRID[GRID.index("--epochs") + 1] = str(args.epochs)
    GRID[GRID.index("--methods") + 1] = args.methods
    names = ["w1", "w2"] + ([] if args.no_ray else ["ray2"])
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    reference = None
    print(f"cores: {os.cpu_count()}; grid: {' '.join(GRID)}")
    with tempfile.TemporaryDirectory(prefix="bench-compare-workers-") as tmp:
        for r in range(args.repeats):
            for name in names:
                seconds, cpu_seconds, before, after, rows = run_once(name, Path(tmp))
                if reference is None:
                    reference = rows
                same = rows == reference
                times[name].append(seconds)
                cpu[name].append(cpu_seconds)
                print(f"repeat {r + 1} {name:5s} {seconds:7.1f} s (CPU {cpu_seconds:5.1f} s)  load {before:.1f} -> {after:.1f}  "
                      f"{len(rows)} rows, identical to w1: {'yes' if same else 'NO'}", flush=True)
                if not same:
                    raise SystemExit(f"{name}: rows differ from w1's")
    base = statistics.median(times["w1"])
    print()
    print("| command | median wall s | x of --workers 1 | median CPU s | runs |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        med = statistics.median(times[name])
        print(f"| `{' '.join(CONFIGS[name])}` | {med:.1f} | {med / base:.2f} | {statistics.median(cpu[name]):.1f} "
              f"| {len(times[name])} |")
    print(f"\nload average now: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
