"""Quality of every registered method on one real offline dataset (run by hand, not in CI).

Every method of widetopo.methods at densities 0.05, 0.01 and 0.002, with the same model, the same
class-balanced pruning set (10 images per class, as in the WideTopo and PX papers), the same
training recipe and 2 seeds, through `widetopo compare` (resumable: rerun to continue). The table
gives test accuracy (mean ± std over seeds), kept fraction, effective density (the fraction of
weights kept and on an input-output path), the fraction of active output units (output units
keeping at least one weight, over every prunable layer) and the node ratio.

    python benchmarks/bench_quality.py -o quality/              # Fashion-MNIST if installed, else digits
    python benchmarks/bench_quality.py --dataset digits --epochs 10 -o quality-digits/

Fashion-MNIST comes from Debian's dataset-fashion-mnist package (apt-get install
dataset-fashion-mnist); digits from scikit-learn. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict

DENSITIES = "0.05,0.01,0.002"


def _default_dataset() -> str:
    try:
        from widetopo.data import load_dataset

        load_dataset("fashion-mnist", split="test", max_samples=1)
        return "fashion-mnist"
    except Exception:  # not installed: the small offline set that always is
        return "digits"


def active_output_fraction(path: str) -> float:
    """Active output units / output units over every prunable tensor of a mask file."""
    from widetopo.sparsity.masks import Masks

    stats = Masks.load(path).stats()
    return sum(s.active_out for s in stats) / sum(s.out_units for s in stats)


def _mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(out_dir: str) -> str:
    with open(os.path.join(out_dir, "results.json")) as f:
        rows = json.load(f)["rows"]
    cells = defaultdict(list)
    for r in rows:
        cells[(r["method"], r["density_target"])].append(r)
    from widetopo.methods import method_names

    order = {m: i for i, m in enumerate(["dense"] + method_names())}
    lines = ["| method | density | test accuracy | kept fraction | effective density | active output units | node ratio "
             "| prune s |",
             "|---|---|---|---|---|---|---|---|"]
    with open(os.path.join(out_dir, "results.json")) as f:
        failed = json.load(f).get("failed", [])
    for r in failed:
        cells.setdefault((r["method"], r["density_target"]), [])
    errors = defaultdict(list)
    for r in failed:
        errors[(r["method"], r["density_target"])].append(r["error"])
    for (method, density), rs in sorted(cells.items(), key=lambda kv: (order.get(kv[0][0].split(":")[0], 99), kv[0][0], -kv[0][1])):
        if not rs:
            lines.append(f"| {method} | {density:g} | failed ({len(errors[(method, density)])} seeds): "
                         f"{errors[(method, density)][0].splitlines()[0][:90]} | | | | | |")
            continue
        acc, acc_sd = _mean_std([r["test_accuracy"] for r in rs])
        kept, _ = _mean_std([r["kept_fraction"] for r in rs])
        effective, _ = _mean_std([r["effective_density"] for r in rs])
        active, _ = _mean_std([active_output_fraction(os.path.join(out_dir, r["mask_file"])) if r["mask_file"]
                               else 1.0 for r in rs])
        node, _ = _mean_std([r["node_ratio"] for r in rs])
        prune_s, _ = _mean_std([r["prune_seconds"] for r in rs])
        lines.append(f"| {method} | {density:g} | {acc:.4f} ± {acc_sd:.4f} | {kept:.4f} | {effective:.4f} | {active:.3f} | {node:.3f} "
                     f"| {prune_s:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None, help="fashion-mnist (default if installed) or digits")
    p.add_argument("--model", default="cnn")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-train-samples", type=int, default=None, help="default: 10000 for fashion-mnist")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--densities", default=DENSITIES)
    p.add_argument("--methods", default="all")
    p.add_argument("--threads", default="auto", help="intra-op CPU threads for widetopo compare (a number or auto)")
    p.add_argument("-o", "--output", default="widetopo-quality")
    p.add_argument("--table-only", action="store_true", help="print the table of an existing run")
    args = p.parse_args(argv)
    if not args.table_only:
        import widetopo.cli as cli

        dataset = args.dataset or _default_dataset()
        cmd = ["--threads", str(args.threads), "compare", "--model", args.model, "--dataset", dataset, "--methods", args.methods,
               "--densities", args.densities, "--seeds", args.seeds, "--epochs", str(args.epochs),
               "--samples-per-class", "10", "--prune-batch-size", "256", "-o", args.output]
        limit = args.max_train_samples or (10000 if dataset == "fashion-mnist" else None)
        if limit:
            cmd += ["--max-train-samples", str(limit)]
        print("widetopo " + " ".join(cmd), flush=True)
        rc = cli.main(cmd)  # 1 when some cells failed: they are listed in the table too
        if rc not in (0, 1):
            return rc
    print(table(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
