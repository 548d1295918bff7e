"""Architectures x methods, and the WideTopo-S scoring-round time of `vit` and ResNet-18.

1. Table: every method of the registry on every architecture of tests/arch_models.py (ViT,
   torchvision-style ResNet-18 and MobileNetV3-small, LSTM classifier, U-Net on the shapes
   dataset) at the tiny sizes of tests/test_architectures.py: "works" (exact K, caller's model
   unchanged; ", q/k collapsed" when no query and no key projection keeps a weight, see
   benchmarks/bench_collapse.py) or the error.
2. Timing at CIFAR shape: WideTopo-S on the zoo's `vit` (defaults: dim 64, depth 4, 4 heads,
   4 px patches, 65 tokens) and `resnet18` (CIFAR stem) on 2 batches of 32 random 3x32x32
   images, 10 classes; a short schedule (rounds=2, restorations=0), reported as seconds per
   scoring round (the whole widetopo.prune call divided by the rounds, setup included), next
   to one plain forward+backward (cross entropy, train mode) of the same 2 batches in the
   same run. Prune and forward+backward alternate, and the table gives medians of the
   repeats, so the machine's drift hits both.

    python benchmarks/bench_architectures.py                 # both parts, markdown tables
    WIDETOPO_BENCH_PART=table python benchmarks/bench_architectures.py

Environment: WIDETOPO_BENCH_PART (all | table | timing), WIDETOPO_BENCH_REPEATS (3),
WIDETOPO_BENCH_ROUNDS (2), WIDETOPO_BENCH_BATCHES (2), WIDETOPO_BENCH_BATCH_SIZE (32),
WIDETOPO_BENCH_IMAGE_SIZE (32), WIDETOPO_BENCH_THREADS (1: on a shared machine two threads
contend with other jobs and single calls vary 10x; both sides run with the same threads),
WIDETOPO_BENCH_SDPA_MATH=1 (time `vit` with scaled_dot_product_attention forced to its
composite math backend - a preview while the fused CPU kernel has no double backward; the
table part never uses it), WIDETOPO_BENCH_OUT=path.json (also write the numbers there).
The load of the machine (os.getloadavg) is printed with the numbers.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import widetopo  # noqa: E402
from widetopo.models import build_model  # noqa: E402
from widetopo.sparsity.selection import select_prunable  # noqa: E402

from arch_models import ARCHITECTURES, cell_options, kept_range, tiny_case  # noqa: E402

try:  # the method registry (widetopo.methods); the presets of widetopo.api before it
    from widetopo.methods import method_names

    METHODS = method_names()
except ImportError:
    from widetopo.api import METHODS as _PRESETS

    METHODS = sorted(_PRESETS)


def _env(name, default, cast=int):
    value = os.environ.get(name)
    return default if value in (None, "") else cast(value)


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


# --------------------------------------------------------------------------- 1. table
def run_cell(arch: str, method: str, density: float = 0.2) -> str:
    """'works' when prune keeps exactly round(d * N_P) weights (or, for a method that keeps whole
    kernels or graphs, a count within its kept_bounds) and leaves the model's state unchanged;
    otherwise the error (type and first line). The cells' options are the test's (cell_options)."""
    model, batches = tiny_case(arch)
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = select_prunable(model)
    params = dict(model.named_parameters())
    keep = int(density * sum(params[n].numel() for n in names) + 0.5)
    try:
        masks = widetopo.prune(model, batches, density, method=method, seed=0, verbose=False, **cell_options(method))
    except Exception as exc:  # noqa: BLE001 - the table reports any failure
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first[:110]}"
    kept = sum(int(m.sum()) for m in masks.values())
    lo, hi = kept_range(method, [tuple(params[n].shape) for n in names], keep)
    if not lo <= kept <= hi:
        return f"wrong K: kept {kept}, expected {keep}" + ("" if lo == hi else f" (range {lo}..{hi})")
    after = model.state_dict()
    if any(not torch.equal(after[k], v) for k, v in before.items()) or not all(m.training for m in model.modules()):
        return "model changed"
    from bench_collapse import qk_collapse  # ", q/k collapsed" where no q and no k projection keeps a weight

    return "works" + ("" if lo == hi else f" ({kept / keep:.2f} K)") + qk_collapse(masks, model)["text"]


def method_table() -> dict:
    methods = list(METHODS)
    return {arch: {m: run_cell(arch, m) for m in methods} for arch in ARCHITECTURES}


def print_table(table: dict) -> None:
    methods = list(next(iter(table.values())))
    print("| architecture | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    errors = {}
    for arch, row in table.items():
        cells = []
        for m in methods:
            if row[m].startswith("works"):
                cells.append(row[m])
            else:
                key = errors.setdefault(row[m], len(errors) + 1)
                cells.append(f"fails ({key})")
        print(f"| {arch} | " + " | ".join(cells) + " |")
    for message, key in errors.items():
        print(f"\n({key}) {message}")


# --------------------------------------------------------------------------- 2. timing
def _batches(n_batches, batch_size, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, size, size, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
            for _ in range(n_batches)]


def forward_backward(model, batches) -> float:
    """Seconds of one plain forward + backward (mean cross entropy) over every batch."""
    model.train()
    tic = time.perf_counter()
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    seconds = time.perf_counter() - tic
    model.zero_grad(set_to_none=True)
    return seconds


def prune_round(model, batches, rounds) -> float:
    """Seconds per scoring round of widetopo.prune(method='widetopo-s') with `rounds` rounds."""
    tic = time.perf_counter()
    widetopo.prune(model, batches, 0.05, method="widetopo-s", rounds=rounds, restorations=0, verbose=False, seed=0)
    return (time.perf_counter() - tic) / rounds


def _sdpa_math():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def timing(repeats, rounds, n_batches, batch_size, size, sdpa_math=False) -> list:
    rows = []
    for name in ("vit", "resnet18"):
        torch.manual_seed(0)
        model = build_model(name, 3, 10, size)
        batches = _batches(n_batches, batch_size, size)
        ctx = _sdpa_math if (sdpa_math and name == "vit") else contextlib.nullcontext
        fb, pr, error = [], [], None
        forward_backward(model, batches)  # warm-up
        for _ in range(repeats):
            fb.append(forward_backward(model, batches))
            if error is None:
                try:
                    with ctx():
                        pr.append(prune_round(model, batches, rounds))
                except RuntimeError as exc:
                    error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:110]}"
        row = {
            "model": name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "prunable": sum(p.numel() for n, p in model.named_parameters() if n in set(select_prunable(model))),
            "forward_backward_s": statistics.median(fb),
            "round_s": statistics.median(pr) if pr else None,
            "error": error,
            "sdpa_math": bool(sdpa_math and name == "vit"),
        }
        row["ratio"] = row["round_s"] / row["forward_backward_s"] if pr else None
        rows.append(row)
    return rows


def print_timing(rows, repeats, rounds, n_batches, batch_size, size) -> None:
    print(f"\nWideTopo-S, {n_batches} x {batch_size} random 3x{size}x{size} images, rounds={rounds}, restorations=0; "
          f"medians of {repeats} interleaved repeats; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{_load()}")
    print("| model | parameters (prunable) | forward+backward of the pruning set | WideTopo-S time per round | round / f+b |")
    print("|---|---|---|---|---|")
    for r in rows:
        label = r["model"] + (" (SDPA math backend)" if r["sdpa_math"] else "")
        if r["round_s"] is None:
            print(f"| {label} | {r['parameters']:,} ({r['prunable']:,}) | {r['forward_backward_s']:.3f} s | "
                  f"fails: {r['error']} | - |")
        else:
            print(f"| {label} | {r['parameters']:,} ({r['prunable']:,}) | {r['forward_backward_s']:.3f} s | "
                  f"{r['round_s']:.3f} s | {r['ratio']:.1f}x |")


def main() -> None:
    torch.set_num_threads(_env("WIDETOPO_BENCH_THREADS", 1))
    part = _env("WIDETOPO_BENCH_PART", "all", str)
    out = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"# bench_architectures: {platform.node()}, {_load()}")
    if part in ("all", "table"):
        out["load_before_table"] = _load()
        table = method_table()
        out["table"] = table
        print_table(table)
    if part in ("all", "timing"):
        cfg = dict(repeats=_env("WIDETOPO_BENCH_REPEATS", 3), rounds=_env("WIDETOPO_BENCH_ROUNDS", 2),
                   n_batches=_env("WIDETOPO_BENCH_BATCHES", 2), batch_size=_env("WIDETOPO_BENCH_BATCH_SIZE", 32),
                   size=_env("WIDETOPO_BENCH_IMAGE_SIZE", 32))
        out["load_before_timing"] = _load()
        rows = timing(sdpa_math=bool(_env("WIDETOPO_BENCH_SDPA_MATH", 0)), **cfg)
        out["load_after_timing"] = _load()
        out["timing"] = rows
        out["timing_config"] = cfg
        print_timing(rows, **cfg)
    path = os.environ.get("WIDETOPO_BENCH_OUT")
    if path:
        Path(path).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
