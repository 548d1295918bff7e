"""Time and peak memory of widetopo.ntk_spectrum (empirical NTK of a masked network, float64) on
CIFAR ResNet-20 with 100 random 3x32x32 samples, every logit (N = 1000), against plain PyTorch
that builds J (N x 270,896) whole and forms J Jᵀ.

    OMP_NUM_THREADS=1 python benchmarks/bench_spectrum.py [--samples 100] [--cases all]

Each case runs in a fresh subprocess (peak RSS is a high-water mark); "peak MB" is the peak RSS
minus the RSS after building the model and the inputs. The mask is random at density 0.0687
(= 0.8^12, PX's figure) over the prunable weights; BatchNorm in eval mode. Baselines:
  plain-loop   per sample one forward, per logit one torch.autograd.grad (retain_graph) -> a row
               of the preallocated J; then J Jᵀ, eigvalsh, and (J*J).sum() for the trace
  plain-vmap   torch.func.vmap(jacrev) over chunks of 8 samples into the preallocated J; the same
Their "trace" time is building J plus ‖J‖² (one dot product); "full" and "topk" need J Jᵀ and
eigvalsh (plain PyTorch has no Lanczos; with J Jᵀ in hand all eigenvalues cost 0.1 s at N = 1000).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time, torch, widetopo
from torch.func import functional_call, jacrev, vmap
from widetopo.models import build_model
args = json.loads(sys.argv[1])
case = args["case"]
torch.manual_seed(0)
model = build_model("resnet20", in_channels=3, num_classes=10, image_size=32).eval()
names = widetopo.select_prunable(model)
params = dict(model.named_parameters())
g = torch.Generator().manual_seed(1)
x = torch.randn(args["samples"], 3, 32, 32, generator=g)
masks = {n: torch.rand(params[n].shape, generator=g) < 0.0687 for n in names}
P = sum(params[n].numel() for n in names)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"case": case, "P": P}
tic = time.perf_counter()
if case.startswith("ours"):
    kw = {"trace": dict(mode="trace"), "hutchinson": dict(mode="trace", probes=args["probes"]),
          "topk": dict(mode="topk", k=10), "full": dict(mode="full"),
          "full-1g": dict(mode="full", max_block_bytes=2 ** 30)}[case.split(":")[1]]
    res = widetopo.ntk_spectrum(model, x, masks, **kw)
    out["seconds"] = time.perf_counter() - tic
else:
    net = build_model("resnet20", in_channels=3, num_classes=10, image_size=32).eval()
    net.load_state_dict(model.state_dict())
    net = net.double()
    with torch.no_grad():
        for n in names:
            dict(net.named_parameters())[n].mul_(masks[n])
    ps = [dict(net.named_parameters())[n] for n in names]
    mflat = torch.cat([masks[n].reshape(-1) for n in names]).double()
    xd = x.double()
    n_out = 10
    J = torch.empty(xd.shape[0] * n_out, P, dtype=torch.float64)
    if case == "plain-loop":
        for i in range(xd.shape[0]):
            o = net(xd[i:i + 1])[0]
            for c in range(n_out):
                gr = torch.autograd.grad(o[c], ps, retain_graph=c + 1 < n_out)
                J[i * n_out + c] = torch.cat([t.reshape(-1) for t in gr])
    else:
        pd = {k: v.detach() for k, v in net.named_parameters()}
        bd = dict(net.named_buffers())
        u = tuple(pd[n] for n in names)
        def fs(u, xi):
            return functional_call(net, ({**pd, **dict(zip(names, u))}, bd), (xi.unsqueeze(0),)).squeeze(0)
        for s in range(0, xd.shape[0], 8):
            gr = vmap(jacrev(fs), in_dims=(None, 0))(u, xd[s:s + 8])
            J[s * n_out:(s + 8) * n_out] = torch.cat([t.reshape(t.shape[0] * n_out, -1) for t in gr], dim=1)
    J.mul_(mflat)
    out["seconds_J"] = time.perf_counter() - tic
    t1 = time.perf_counter()
    out["trace"] = float(torch.dot(J.view(-1), J.view(-1)))  # no temporary the size of J
    out["seconds_trace_sum"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    theta = J @ J.T
    res = torch.linalg.eigvalsh(theta).flip(0)
    out["seconds_gram_eig"] = time.perf_counter() - t1
    out["seconds"] = time.perf_counter() - tic
out["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
torch.save(res, args["save"])
print(json.dumps(out))
"""

CASES = ["plain-loop", "plain-vmap", "ours:trace", "ours:hutchinson", "ours:topk", "ours:full", "ours:full-1g"]


def run(case, args, tmp):
    save = os.path.join(tmp, case.replace(":", "_") + ".pt")
    spec = {"case": case, "samples": args.samples, "probes": args.probes, "save": save}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{case} failed:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch

    out["result"] = torch.load(save)
    print(f"  {case}: {out['seconds']:.1f} s, peak {out['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--probes", type=int, default=32, help="Hutchinson probes; default: %(default)s")
    p.add_argument("--cases", default="all", help=f"comma-separated subset of {','.join(CASES)}")
    args = p.parse_args()
    cases = CASES if args.cases == "all" else args.cases.split(",")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        rows = {c: run(c, args, tmp) for c in cases}
    ref = rows.get("plain-vmap") or rows.get("plain-loop")
    n = args.samples * 10
    P = next(iter(rows.values()))["P"]
    print(f"ResNet-20, {args.samples} random 3x32x32 samples x 10 logits (N = {n}), P = {P} prunable weights, "
          f"float64, torch {torch.__version__}, {torch.get_num_threads()} thread(s); J whole = {n * P * 8 / 2**30:.2f} GiB")
    print("| case | what | time (s) | peak RSS delta (MB) | agreement with plain (J whole) |")
    print("|---|---|---|---|---|")
    for c, r in rows.items():
        if c.startswith("plain"):
            what = (f"J {r['seconds_J']:.1f} s; trace = J + {r['seconds_trace_sum']:.2f} s; "
                    f"full/topk = J + {r['seconds_gram_eig']:.1f} s (J Jᵀ, eigvalsh)")
            agree = "reference" if r is ref else (
                f"max |Δλ|/λ₁ = {float((r['result'] - ref['result']).abs().max() / ref['result'][0]):.1e}")
        else:
            res = r["result"]
            what = c.split(":")[1]
            if ref is None:
                agree = "—"
            elif res.dim() == 0:
                rel = abs(float(res) - ref["trace"]) / ref["trace"]
                agree = f"|Δtr|/tr = {rel:.1e}"
            else:
                rv = ref["result"][: res.numel()]
                agree = f"max |Δλ|/λ₁ = {float((res - rv).abs().max() / rv[0]):.1e}"
                if res.numel() == ref["result"].numel():
                    agree += f" (smallest: ours {float(res[-1]):.3g}, plain {float(rv[-1]):.3g})"
        print(f"| {c} | {what} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {agree} |")


if __name__ == "__main__":
    main()
