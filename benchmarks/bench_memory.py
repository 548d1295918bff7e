"""Peak memory of a pruning run with the pruning set on the pruning device (default) and kept
on the CPU (`data_device="cpu"`, one batch moved at a time), and that both give the same masks.

    python benchmarks/bench_memory.py [--samples 2048] [--device cpu|cuda]

Each mode runs in a fresh subprocess (peak RSS is a high-water mark). On a CUDA device the
number that matters is torch.cuda.max_memory_allocated (device memory); on the CPU the store
and the pruning device are the same memory, so both modes should show the same peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch, widetopo
from widetopo.models import build_model
args = json.loads(sys.argv[1])
torch.manual_seed(0)
device = torch.device(args["device"])
model = build_model("resnet20", in_channels=3, num_classes=10, image_size=32).to(device)
g = torch.Generator().manual_seed(1)
bs = args["batch_size"]
data = [(torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, 10, (bs,), generator=g))
        for _ in range(args["samples"] // bs)]
if args["data_device"] is None:
    data = [(x.to(device), y.to(device)) for x, y in data]   # a loader that yields device tensors
set_bytes = sum(x.numel() * x.element_size() + y.numel() * y.element_size() for x, y in data)
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tic = time.perf_counter()
masks = widetopo.prune(model, data, 0.05, method="snip", verbose=False, data_device=args["data_device"])
out = {"seconds": time.perf_counter() - tic, "set_mb": set_bytes / 2**20,
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "rss_before_mb": base / 1024,
       "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
       "mask_digest": [int(m.sum()) for m in masks.values()],
       "mask_hash": hash(tuple(bytes(m.cpu().numpy().tobytes()) for m in masks.values()))}
print(json.dumps(out))
"""


def run(mode, args):
    spec = {"device": args.device, "samples": args.samples, "batch_size": args.batch_size, "data_device": mode}
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    rows = {label: run(mode, args) for label, mode in (("on the pruning device", None), ("data_device='cpu'", "cpu"))}
    same = len({r["mask_hash"] for r in rows.values()}) == 1
    set_mb = next(iter(rows.values()))["set_mb"]
    print(f"SNIP on CIFAR ResNet-20, {args.samples} images (pruning set {set_mb:.0f} MB), device {args.device}")
    print("| pruning set | peak RSS (MB) | RSS before prune (MB) | CUDA peak (MB) | s |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        cuda = "—" if r["cuda_peak_mb"] is None else f"{r['cuda_peak_mb']:.0f}"
        print(f"| {label} | {r['peak_rss_mb']:.0f} | {r['rss_before_mb']:.0f} | {cuda} | {r['seconds']:.1f} |")
    print(f"identical masks: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
