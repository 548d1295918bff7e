"""The GPU measurements of benchmarks/gpu_check.sh, printed as one markdown table.

1. Ops on a ResNet-50-shaped list (161 tensors, 25.6 M float32 scores; --scale shrinks it),
   each against the plain-PyTorch way of doing the same job in the same run: implementations
   alternate inside every round (interleaved), the table gives medians of --rounds rounds, the
   time relative to the group's reference row, and the peak extra device memory of one call.
   The global_threshold group has a "one read" row (torch._foreach_norm over the same list: the
   least any threshold can cost) and a tie-heavy input (95 % of the scores exactly 0, the cut
   inside the zeros).
2. WideTopo-S on a CIFAR ResNet-20 (random 3x32x32 pruning batches): widetopo.prune against
   benchmarks/official_baseline.py (a plain-PyTorch WideTopo structured like the official code),
   a short schedule (--prune-rounds), wall time of each and the overlap of the two masks.

    python benchmarks/gpu_bench.py                       # on the GPU (the default when present)
    python benchmarks/gpu_bench.py --device cpu --scale 0.05 --rounds 2 --prune-rounds 1
                                                         # the same code paths on a CPU

Every result is also checked (same cut / same masks as the baseline where the rule is the
same), so a wrong kernel fails the run instead of producing a fast row.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import widetopo_ext  # noqa: E402,F401  (loads torch.ops.widetopo)
from conftest import resnet50_param_shapes  # noqa: E402

ops = torch.ops.widetopo


# ------------------------------------------------------------------------------- timing
class Clock:
    """Wall time of fn() on `device`: CUDA events around the call (the stream is synchronised
    before and after), perf_counter on a CPU. Also the peak extra device memory of the call."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(stop) / 1e3, torch.cuda.max_memory_allocated(self.device) - base
        tic = time.perf_counter()
        fn()
        return time.perf_counter() - tic, None


def interleaved(clock, impls: dict, rounds: int, warmup: int = 1):
    """{name: (median seconds, max peak bytes)}; every round runs every implementation once,
    in an order rotated from round to round."""
    names = list(impls)
    times = {n: [] for n in names}
    peaks = {n: 0 for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t, peak = clock(impls[n])
            if r >= warmup:
                times[n].append(t)
                if peak is not None:
                    peaks[n] = max(peaks[n], peak)
    return {n: (statistics.median(times[n]), peaks[n] if clock.cuda else None) for n in names}


# ------------------------------------------------------------------------------- op groups
def scores_list(device, scale, seed=0):
    """ResNet-50 parameter shapes (the first tensors up to `scale` of the 25.6 M elements),
    heavy-tailed |x * y| scores like gradient x weight saliencies."""
    shapes, total = [], sum(math.prod(s) for s in resnet50_param_shapes())
    for s in resnet50_param_shapes():
        if shapes and sum(math.prod(x) for x in shapes) + math.prod(s) > scale * total:
            continue
        shapes.append(s)
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * torch.randn(s, generator=g)).abs_().to(device) for s in shapes]


def _cat(scores):
    return torch.cat([s.reshape(-1) for s in scores])


def _ge_masks(scores, masks, cut):
    for s, m in zip(scores, masks):
        torch.ge(s, cut, out=m)


def threshold_group(scores, clock, rounds, label):
    n = sum(s.numel() for s in scores)
    keep = round(0.1 * n)
    masks = [torch.empty(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    cuts = {}

    def ours(rule):
        def run():
            cuts["widetopo " + rule] = ops.global_threshold(scores, masks, keep, rule)
        return run

    def cat_sort():
        flat = _cat(scores)
        cuts["sort"] = torch.sort(flat).values[n - keep]
        _ge_masks(scores, masks, cuts["sort"])

    def cat_kthvalue():
        flat = _cat(scores)
        cuts["kth"] = torch.kthvalue(flat, n - keep + 1).values
        _ge_masks(scores, masks, cuts["kth"])

    def cat_topk():
        flat = _cat(scores)
        cuts["topk"] = torch.topk(flat, keep, sorted=False).values.min()
        _ge_masks(scores, masks, cuts["topk"])

    impls = {
        "widetopo global_threshold exact": ours("exact"),
        "widetopo global_threshold official": ours("official"),
        "one read: torch._foreach_norm": lambda: torch._foreach_norm(scores),
        "torch.cat + torch.sort": cat_sort,
        "torch.cat + torch.kthvalue": cat_kthvalue,
        "torch.cat + torch.topk": cat_topk,
    }
    res = interleaved(clock, impls, rounds)
    # Same cut as the baselines; exact keeps exactly `keep`.
    ops.global_threshold(scores, masks, keep, "exact")
    assert sum(int(m.sum()) for m in masks) == keep, "exact mode did not keep `keep` scores"
    ref = float(torch.sort(_cat(scores)).values[n - keep])
    assert float(cuts["widetopo exact"]) == ref and float(cuts["widetopo official"]) == ref, "wrong cut"
    return [(f"global_threshold ({label}, {n / 1e6:.1f}M float32, keep 10%)", name, *res[name],
             name.startswith("widetopo")) for name in impls]


def with_ties(scores, fraction=0.95, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in scores:
        t = s.clone()
        t.view(-1)[(torch.rand(s.numel(), generator=g) < fraction).to(s.device)] = 0.0
        out.append(t)
    return out


def units_groups(scores, clock, rounds):
    device = scores[0].device
    g = torch.Generator().manual_seed(3)
    masks = [(torch.rand(s.shape, generator=g) < 0.3).to(device) for s in scores]
    noise = [torch.randn(m.shape[0], m.shape[1], generator=g).to(device) if m.dim() >= 2
             else torch.empty(0, device=device) for m in masks]
    n = sum(s.numel() for s in scores)
    rows = []
    exponent = -math.log10(0.3) / 5.0
    work = [s.clone() for s in scores]

    def decay_torch():
        for s, m in zip(work, masks):
            if s.dim() < 2:
                continue
            mf = m.reshape(m.shape[0], m.shape[1], -1).to(s.dtype)
            denom = (mf.sum(dim=(1, 2))[:, None] * mf.sum(dim=(0, 2))[None, :]).clamp_min(1.0)[:, :, None]
            s.mul_(((mf / denom) ** exponent).reshape(s.shape))

    res = interleaved(clock, {"widetopo density_decay_": lambda: ops.density_decay_(work, masks, exponent),
                              "plain PyTorch": decay_torch}, rounds)
    rows += [(f"density_decay_ ({n / 1e6:.1f}M float32)", k, *v, k.startswith("widetopo")) for k, v in res.items()]

    def restore_torch():
        out = []
        for m, z in zip(masks, noise):
            if m.dim() < 2:
                out.append(torch.where(m, 2.0, 1.0))
                continue
            mf = m.reshape(m.shape[0], m.shape[1], -1).float()
            o, i, k = mf.shape
            pruned = (1 - mf.sum(dim=(1, 2)) / (i * k))[:, None] * (1 - mf.sum(dim=(0, 2)) / (o * k))[None, :] + 1e-5 * z
            out.append(torch.where(mf.bool(), 2.0, pruned[:, :, None]).reshape(m.shape))
        return out

    res = interleaved(clock, {"widetopo restoration_scores": lambda: ops.restoration_scores(masks, noise, 1e-5),
                              "plain PyTorch": restore_torch}, rounds)
    rows += [(f"restoration_scores ({n / 1e6:.1f}M masks)", k, *v, k.startswith("widetopo")) for k, v in res.items()]

    a = [torch.randn_like(s) for s in scores]
    b = [torch.randn_like(s) for s in scores]
    acc = [torch.zeros_like(s) for s in scores]

    def accumulate_torch():
        for s, x, y, m in zip(acc, a, b, masks):
            s.add_((x * y * m).abs())

    res = interleaved(clock, {"widetopo accumulate_score_": lambda: ops.accumulate_score_(acc, a, b, masks, True),
                              "plain PyTorch": accumulate_torch}, rounds)
    rows += [(f"accumulate_score_ ({n / 1e6:.1f}M float32)", k, *v, k.startswith("widetopo")) for k, v in res.items()]

    def sq_norm_torch():
        return sum(((t * m) ** 2).sum() for t, m in zip(a, masks))

    res = interleaved(clock, {"widetopo masked_sq_norm": lambda: ops.masked_sq_norm(a, masks),
                              "plain PyTorch": sq_norm_torch}, rounds)
    rows += [(f"masked_sq_norm ({n / 1e6:.1f}M float32)", k, *v, k.startswith("widetopo")) for k, v in res.items()]

    def stats_torch():
        rows_ = []
        for m in masks:
            if m.dim() >= 2:
                m3 = m.reshape(m.shape[0], m.shape[1], -1)
                rows_.append(torch.stack([m.sum(), (m3.sum(dim=(1, 2)) > 0).sum(), (m3.sum(dim=(0, 2)) > 0).sum()]))
            else:
                k = m.sum()
                rows_.append(torch.stack([k, k, k]))
        return torch.stack(rows_)

    res = interleaved(clock, {"widetopo mask_stats": lambda: ops.mask_stats(masks), "plain PyTorch": stats_torch},
                      rounds)
    rows += [(f"mask_stats ({n / 1e6:.1f}M masks)", k, *v, k.startswith("widetopo")) for k, v in res.items()]
    assert torch.equal(ops.mask_stats(masks).cpu(), stats_torch().cpu()), "mask_stats differs from PyTorch"
    got = ops.restoration_scores(masks, noise, 1e-5)
    for x, y in zip(got[:8], restore_torch()[:8]):
        torch.testing.assert_close(x, y)
    return rows


# ------------------------------------------------------------------------------- pruning
def prune_rows(device, rounds, restore_steps, batch_size):
    # bench_engine reads its configuration from the environment at import.
    os.environ.setdefault("WIDETOPO_BENCH_ROUNDS", str(rounds))
    os.environ.setdefault("WIDETOPO_BENCH_RESTORE_STEPS", str(restore_steps))
    os.environ.setdefault("WIDETOPO_BENCH_BATCH_SIZE", str(batch_size))
    import bench_engine as be

    model, data = be.setup_problem()
    model = model.to(device)
    data = [x.to(device) for x in data]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    engine = be.run_engine(model, data)
    sync()
    baseline = be.run_baseline(model, data)
    sync()
    c = be.compare(engine, baseline)
    label = (f"WideTopo-S, CIFAR ResNet-20, {be.CONFIG['batches']}x{be.CONFIG['batch_size']} images, "
             f"T = T' = {be.CONFIG['rounds']}, R = {be.CONFIG['restorations']}, J = {be.CONFIG['restore_steps']}")
    return [
        (label, "widetopo.prune", c["engine_total_s"], None, True),
        (label, "official-structure baseline", c["baseline_total_s"], None, False),
    ], c


# ------------------------------------------------------------------------------- table
def fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def table(rows):
    lines = ["| group | implementation | median time | time / widetopo | peak extra memory |", "|---|---|---|---|---|"]
    groups = {}
    for group, name, t, peak, ours in rows:
        groups.setdefault(group, []).append((name, t, peak, ours))
    for group, items in groups.items():
        ref = next(t for _, t, _, o in items if o)
        for name, t, peak, _ in items:
            shown = f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"
            lines.append(f"| {group} | {name} | {shown} | {t / ref:.2f}x | {fmt_bytes(peak)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the 25.6 M ResNet-50 scores")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds per op group (medians)")
    p.add_argument("--prune-rounds", type=int, default=3, help="T = T' of the WideTopo-S run")
    p.add_argument("--restore-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip-prune", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
    clock = Clock(device)
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device {device}"
          + (f" = {torch.cuda.get_device_name(device)}" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads"), flush=True)
    rows = []
    t0 = time.perf_counter()
    scores = scores_list(device, args.scale)
    rows += threshold_group(scores, clock, args.rounds, "ResNet-50")
    print(f"[{time.perf_counter() - t0:.0f} s] threshold, normal scores done", flush=True)
    rows += threshold_group(with_ties(scores), clock, args.rounds, "ResNet-50, 95% zeros")
    print(f"[{time.perf_counter() - t0:.0f} s] threshold, tie-heavy scores done", flush=True)
    rows += units_groups(scores, clock, args.rounds)
    print(f"[{time.perf_counter() - t0:.0f} s] other ops done", flush=True)
    del scores
    extra = {}
    if not args.skip_prune:
        prows, extra = prune_rows(device, args.prune_rounds, args.restore_steps, args.batch_size)
        rows += prows
        print(f"[{time.perf_counter() - t0:.0f} s] WideTopo-S runs done; mask IoU engine vs baseline "
              f"{extra['iou']:.3f}, speedup {extra['speedup']:.2f}x", flush=True)
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "prune": {k: v for k, v in extra.items() if k != "layers_differing"},
                       "torch": torch.__version__, "device": str(device)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
