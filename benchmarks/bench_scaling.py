"""How the cost of one WideTopo-S scoring round grows with the network and with the pruning set.

Two sweeps on a CIFAR ResNet-20 (3 stages x 3 basic blocks, widths w / 2w / 4w; w = 16 is the
standard network) with random 3x32x32 images in batches of --batch-size:
  width  w = 8 -> 64 (doubling) at a fixed pruning set (--width-images, default 64 images);
  data   64 -> 1024 images (doubling) at a fixed width (--data-width).
Each point times `widetopo.prune(model, batches, density, method="widetopo-s", rounds=1,
restorations=0, verbose=False)` and, interleaved with it in the same run, a plain forward +
backward (cross-entropy against fixed random labels) of the same batches on a copy of the same
network; the table gives medians of --reps pairs and their ratio.

Times: wall clock and the CPU time of this process (time.process_time). The machine this was
written on is shared (2 cores, several busy processes), so the wall time of a point depends on
how much of a core the process got; with one intra-op thread (--threads 1, the default) the CPU
time is the work done and is what the slopes and the flag use (wall slopes are printed as well).

Slopes: the least-squares slope of log(time) over the sweep, and the slope of every doubling step.
Against the width, a convolution's work grows as w**2, so the slope is also given against the
multiply-accumulates of one forward pass (counted from the layer shapes, no timing), which is
the work measure the prune time should follow linearly; a step whose slope against that work
(or against the number of images) exceeds 1.15 is flagged SUPERLINEAR, and the flag says whether
the plain forward + backward stepped alike (the ratio prune / fwd+bwd flat: the step is the
network's or the machine's, not the pruning engine's) or the ratio itself grew by more than
0.15 in slope.

    python benchmarks/bench_scaling.py --plot scaling.png                 # small default sweep
    python benchmarks/bench_scaling.py --full --plot scaling.png          # w 8..64, 64..1024 images
    WIDETOPO_SCALING_FULL=1 python benchmarks/bench_scaling.py            # same as --full
    pytest benchmarks/bench_scaling.py                                    # pytest-benchmark entry

The ResNet-20 of widetopo.models has fixed widths 16/32/64; this script builds the width-scaled
one from the same library classes (widetopo.models.ResNet + kaiming_init_), so no library change.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import widetopo  # noqa: E402
from widetopo.models import ResNet, kaiming_init_  # noqa: E402

SUPERLINEAR = 1.15
DEFAULT = {"widths": [8, 16, 32], "width_images": 64, "images": [64, 128, 256, 512], "data_width": 8, "reps": 3}
FULL = {"widths": [8, 16, 32, 64], "width_images": 64, "images": [64, 128, 256, 512, 1024], "data_width": 16,
        "reps": 3}


def resnet20(width: int, num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-20 with stage widths width, 2 width, 4 width (width 16: the standard one)."""
    return kaiming_init_(ResNet([3, 3, 3], [width, 2 * width, 4 * width], 3, num_classes))


def forward_macs(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-accumulates of one forward pass of one image through the conv and linear layers,
    from their shapes (hooks record the output sizes)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output[0].numel() * k
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()
            model(torch.zeros(1, 3, image_size, image_size))
            model.train()
    finally:
        for h in handles:
            h.remove()
    return total


def make_batches(images: int, batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sizes = [batch_size] * (images // batch_size) + ([images % batch_size] if images % batch_size else [])
    xs = [torch.randn(n, 3, 32, 32, generator=g) for n in sizes]
    ys = [torch.randint(0, 10, (n,), generator=g) for n in sizes]
    return xs, ys


def time_prune(model, xs, density):
    """(wall seconds, CPU seconds of this process) of one WideTopo-S scoring round."""
    tic, cpu = time.perf_counter(), time.process_time()
    widetopo.prune(model, xs, density, method="widetopo-s", rounds=1, restorations=0, verbose=False)
    return time.perf_counter() - tic, time.process_time() - cpu


def time_plain(model, xs, ys):
    """(wall, CPU) seconds of one forward + backward of every batch (what a training step costs)."""
    loss_fn = nn.CrossEntropyLoss()
    tic, cpu = time.perf_counter(), time.process_time()
    for x, y in zip(xs, ys):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
    return time.perf_counter() - tic, time.process_time() - cpu


def measure_point(width: int, images: int, batch_size: int, reps: int, density: float) -> Dict:
    torch.manual_seed(0)
    model = resnet20(width)
    plain_model = copy.deepcopy(model)
    xs, ys = make_batches(images, batch_size)
    time_plain(plain_model, xs[:1], ys[:1])  # warm-up (allocator, kernels) for both
    time_prune(model, xs[:1], density)
    prune_t, plain_t = [], []
    for _ in range(reps):  # interleaved: the machine's drift hits both sides
        prune_t.append(time_prune(model, xs, density))
        plain_t.append(time_plain(plain_model, xs, ys))
    med = lambda pairs, i: statistics.median(t[i] for t in pairs)  # noqa: E731
    row = {"width": width, "images": images, "params": sum(q.numel() for q in model.parameters()),
           "macs": forward_macs(model), "prune_s": med(prune_t, 0), "plain_s": med(plain_t, 0),
           "prune_cpu": med(prune_t, 1), "plain_cpu": med(plain_t, 1), "prune_all": prune_t, "plain_all": plain_t}
    row["ratio"] = statistics.median(a[0] / b[0] for a, b in zip(prune_t, plain_t))
    row["ratio_cpu"] = statistics.median(a[1] / b[1] for a, b in zip(prune_t, plain_t))
    return row


def slopes(xs: Sequence[float], ts: Sequence[float]):
    """(least-squares slope of log t over log x, slope of every step)."""
    lx, lt = [math.log(x) for x in xs], [math.log(t) for t in ts]
    n = len(lx)
    mx, mt = sum(lx) / n, sum(lt) / n
    var = sum((a - mx) ** 2 for a in lx)
    fit = sum((a - mx) * (b - mt) for a, b in zip(lx, lt)) / var if var > 0 else float("nan")
    steps = [(lt[i + 1] - lt[i]) / (lx[i + 1] - lx[i]) for i in range(n - 1)]
    return fit, steps


def sweep_summary(name: str, rows: List[Dict], work_key: str) -> Dict:
    work = [r[work_key] for r in rows]
    out = {"sweep": name, "work": work_key}
    for what in ("prune_cpu", "plain_cpu", "prune_s", "plain_s"):
        fit, steps = slopes(work, [r[what] for r in rows])
        out[what] = {"fit": fit, "steps": steps, "superlinear": [i for i, s in enumerate(steps) if s > SUPERLINEAR]}
    ratio_fit, ratio_steps = slopes(work, [r["ratio_cpu"] for r in rows])
    out["ratio"] = {"fit": ratio_fit, "steps": ratio_steps,
                    "grows": [i for i, s in enumerate(ratio_steps) if s > SUPERLINEAR - 1]}
    if name == "width":
        out["prune_vs_width"] = slopes([r["width"] for r in rows], [r["prune_cpu"] for r in rows])[0]
    return out


def format_table(rows: List[Dict], summaries: List[Dict], header: str) -> str:
    lines = [header, "",
             "| sweep | width | images | params | fwd MMAC/img | prune round CPU | fwd+bwd CPU | ratio CPU "
             "| prune round wall | fwd+bwd wall | ratio wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sweep']} | {r['width']} | {r['images']} | {r['params']:,} | {r['macs'] / 1e6:.1f} | "
                     f"{r['prune_cpu']:.3f} s | {r['plain_cpu']:.3f} s | {r['ratio_cpu']:.2f}x | "
                     f"{r['prune_s']:.3f} s | {r['plain_s']:.3f} s | {r['ratio']:.2f}x |")
    lines += ["", "Slopes of log(time) (CPU time of the process; wall in brackets):", "",
              "| sweep | against | prune slope (fit) | prune slope per doubling | fwd+bwd slope (fit) "
              "| fwd+bwd slope per doubling | flags |",
              "|---|---|---|---|---|---|---|"]
    for s in summaries:
        steps = ", ".join(f"{x:.2f}" for x in s["prune_cpu"]["steps"])
        flag = ("SUPERLINEAR step(s) " + ", ".join(str(i + 1) for i in s["prune_cpu"]["superlinear"])
                if s["prune_cpu"]["superlinear"] else "none")
        if s["prune_s"]["superlinear"]:
            flag += " (wall: step(s) " + ", ".join(str(i + 1) for i in s["prune_s"]["superlinear"]) + ")"
        if s["ratio"]["grows"]:
            flag += "; prune / fwd+bwd grows faster than the work at step(s) " + ", ".join(
                str(i + 1) for i in s["ratio"]["grows"])
        elif s["prune_cpu"]["superlinear"]:
            flag += "; fwd+bwd steps alike (ratio flat)"
        base_steps = ", ".join(f"{x:.2f}" for x in s["plain_cpu"]["steps"])
        against = "forward MACs" if s["work"] == "macs" else "images"
        lines.append(f"| {s['sweep']} | {against} | {s['prune_cpu']['fit']:.2f} ({s['prune_s']['fit']:.2f}) | "
                     f"{steps} | {s['plain_cpu']['fit']:.2f} ({s['plain_s']['fit']:.2f}) | {base_steps} | {flag} |")
        if "prune_vs_width" in s:
            lines.append(f"| {s['sweep']} | width | {s['prune_vs_width']:.2f} | (work grows as width^2) | | | |")
    return "\n".join(lines)


def plot(rows: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name, key, label in ((axes[0], "width", "width", "base width w (ResNet-20: w, 2w, 4w)"),
                                 (axes[1], "data", "images", "pruning-set images")):
        rs = [r for r in rows if r["sweep"] == name]
        if not rs:
            ax.set_visible(False)
            continue
        x = [r[key] for r in rs]
        ax.loglog(x, [r["prune_cpu"] for r in rs], "o-", label="WideTopo-S round (widetopo.prune), CPU")
        ax.loglog(x, [r["plain_cpu"] for r in rs], "s--", label="plain forward + backward, CPU")
        ax.loglog(x, [r["prune_s"] for r in rs], "o", mfc="none", color="C0", alpha=0.5, label="round, wall")
        ax.loglog(x, [r["plain_s"] for r in rs], "s", mfc="none", color="C1", alpha=0.5, label="fwd+bwd, wall")
        ref = rs[0]["prune_cpu"]
        slope = 2 if name == "width" else 1
        ax.loglog(x, [ref * (v / x[0]) ** slope for v in x], ":", color="grey",
                  label=f"slope {slope} from the first point")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(x)
        ax.set_xticklabels([str(v) for v in x])
        ax.set_xlabel(label)
        ax.set_ylabel("seconds (median of the pairs)")
        ax.set_title(f"{name} sweep")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: Dict, batch_size: int, density: float, log=print) -> Dict:
    rows = []
    for w in config["widths"]:
        r = measure_point(w, config["width_images"], batch_size, config["reps"], density)
        r["sweep"] = "width"
        rows.append(r)
        log(f"width {w:3d}, {config['width_images']} images: prune {r['prune_cpu']:.3f} s CPU, "
            f"fwd+bwd {r['plain_cpu']:.3f} s CPU ({r['ratio_cpu']:.2f}x; wall {r['ratio']:.2f}x)")
    for n in config["images"]:
        r = measure_point(config["data_width"], n, batch_size, config["reps"], density)
        r["sweep"] = "data"
        rows.append(r)
        log(f"width {config['data_width']}, {n:4d} images: prune {r['prune_cpu']:.3f} s CPU, "
            f"fwd+bwd {r['plain_cpu']:.3f} s CPU ({r['ratio_cpu']:.2f}x; wall {r['ratio']:.2f}x)")
    summaries = []
    for name, key in (("width", "macs"), ("data", "images")):
        rs = [r for r in rows if r["sweep"] == name]
        if len(rs) >= 2:
            summaries.append(sweep_summary(name, rs, key))
    return {"rows": rows, "summaries": summaries}


def main(argv=None) -> int:
    full_env = os.environ.get("WIDETOPO_SCALING_FULL", "") not in ("", "0")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", default=full_env,
                    help="the full sweep: widths 8..64 and 64..1024 images at width 16 (also WIDETOPO_SCALING_FULL=1)")
    ap.add_argument("--plot", default=None, help="write the log-log plot (PNG) here")
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument("--widths", type=int, nargs="+", default=None)
    ap.add_argument("--images", type=int, nargs="+", default=None, help="pruning-set sizes of the data sweep")
    ap.add_argument("--width-images", type=int, default=None, help="pruning-set size of the width sweep")
    ap.add_argument("--data-width", type=int, default=None, help="width of the data sweep")
    ap.add_argument("--reps", type=int, default=None, help="interleaved prune / fwd+bwd pairs per point (median)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared machine more threads mostly add noise)")
    args = ap.parse_args(argv)
    config = dict(FULL if args.full else DEFAULT)
    for key in ("widths", "images", "width_images", "data_width", "reps"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    torch.set_num_threads(args.threads)
    logging.getLogger("widetopo").setLevel(logging.ERROR)  # "no weights kept in ..." at one-round densities
    tic = time.perf_counter()
    result = run(config, args.batch_size, args.density)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
              f"batch size {args.batch_size}, density {args.density}, {config['reps']} interleaved pairs per point, "
              f"load average {'/'.join(f'{x:.1f}' for x in load) if load else '?'} at the end, "
              f"{time.perf_counter() - tic:.0f} s in all")
    print(format_table(result["rows"], result["summaries"], header))
    if args.plot:
        plot(result["rows"], args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config, "header": header, **result}, indent=1))
    return 0


# --------------------------------------------------------------------------- pytest-benchmark
def test_scaling_small(benchmark):
    """Two widths and two pruning-set sizes, one pair each (pytest benchmarks/bench_scaling.py)."""
    config = {"widths": [8, 16], "width_images": 32, "images": [32, 64], "data_width": 8, "reps": 1}
    logging.getLogger("widetopo").setLevel(logging.ERROR)
    result = benchmark.pedantic(run, args=(config, 32, 0.05), kwargs={"log": lambda *_: None}, rounds=1,
                                iterations=1)
    for r in result["rows"]:
        benchmark.extra_info[f"{r['sweep']}_w{r['width']}_n{r['images']}_ratio"] = r["ratio"]
    assert all(r["prune_s"] > 0 and r["plain_s"] > 0 for r in result["rows"])


if __name__ == "__main__":
    sys.exit(main())
