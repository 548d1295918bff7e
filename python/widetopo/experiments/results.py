"""The results of a comparison: the summary table (mean +- std over seeds per method and density)
and the plots of accuracy and node ratio against density (widetopo compare)."""
from __future__ import annotations

import math
import os
from typing import Dict, List

from widetopo.sparsity.report import check_plot_format

__all__ = ["aggregate", "summary_table", "accuracy_figure", "node_ratio_figure", "save_plots"]


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def aggregate(rows: List[dict]) -> List[dict]:
    """Mean and sample std over seeds per (method, density); dense first, then by method, density desc."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], float(r["density_target"])), []).append(r)
    out = []
    for (method, density), rs in groups.items():
        item = {"method": method, "density_target": density, "n": len(rs)}
        for key in ("kept_fraction", "effective_density", "node_ratio", "test_accuracy", "prune_seconds", "train_seconds"):
            item[key], item[key + "_std"] = _mean_std([r.get(key) for r in rs])
        out.append(item)
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    out.sort(key=lambda a: (a["method"] != "dense", order[a["method"]], -a["density_target"]))
    return out


def summary_table(rows: List[dict]) -> str:
    """Fixed-width table: mean ± std over seeds per method and density."""
    head = ("method", "density", "seeds", "kept", "effective", "node ratio", "test accuracy", "prune s")
    lines = [head]
    for a in aggregate(rows):
        acc = f"{a['test_accuracy']:.4f} ± {a['test_accuracy_std']:.4f}"
        ratio = "-" if a["node_ratio"] is None else f"{a['node_ratio']:.3f} ± {a['node_ratio_std']:.3f}"
        lines.append((a["method"], f"{a['density_target']:g}", str(a["n"]), f"{a['kept_fraction']:.4f}",
                      f"{a['effective_density']:.4f}", ratio, acc, f"{a['prune_seconds']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = []
    for k, line in enumerate(lines):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        text.append("  ".join(cells).rstrip())
        if k == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


# ------------------------------------------------------------------------------ plots

def _figure(rows: List[dict], key: str, ylabel: str, title: str, dense_line: bool):
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (or install widetopo[plot])") from None
    agg = aggregate(rows)
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    densities = sorted({a["density_target"] for a in agg if a["method"] != "dense"})
    for method in dict.fromkeys(a["method"] for a in agg if a["method"] != "dense"):
        pts = sorted((a for a in agg if a["method"] == method and a[key] is not None), key=lambda a: a["density_target"])
        if not pts:
            continue
        xs = [a["density_target"] for a in pts]
        ys = [a[key] for a in pts]
        sd = [a[key + "_std"] for a in pts]
        (line,) = ax.plot(xs, ys, marker="o", lw=1.8, label=method)
        if any(s > 0 for s in sd):
            ax.fill_between(xs, [max(y - s, 0.0) for y, s in zip(ys, sd)], [min(y + s, 1.0) for y, s in zip(ys, sd)],
                            color=line.get_color(), alpha=0.18, lw=0)
    dense = [a for a in agg if a["method"] == "dense"]
    if dense_line and dense and dense[0][key] is not None:
        d = dense[0]
        ax.axhline(d[key], color="black", ls="--", lw=1.2, label=f"dense ({d[key]:.3f})")
        if d[key + "_std"]:
            ax.axhspan(max(d[key] - d[key + "_std"], 0.0), min(d[key] + d[key + "_std"], 1.0), color="gray", alpha=0.15, lw=0)
    ax.set_xscale("log")
    if densities:
        ax.xaxis.set_major_locator(FixedLocator(densities))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlim(min(densities) / 1.25, max(densities) * 1.25)
    ax.invert_xaxis()  # sparser to the right, as in the papers
    ax.set_xlabel("density: fraction of prunable weights kept (log scale; sparser to the right)", fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)  # both metrics are fractions: bands are clipped to [0, 1]
    ax.set_title(title, fontsize=12)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    return fig


def _title(rows):
    r = rows[0] if rows else {}
    seeds = sorted({int(x["seed"]) for x in rows})
    return f"{r.get('model', '?')} on {r.get('dataset', '?')}, {r.get('epochs', '?')} epochs, {len(seeds)} seed(s)"


def accuracy_figure(rows: List[dict]):
    """Accuracy vs density (log x): a line and ± std band per method, dense as a dashed line."""
    return _figure(rows, "test_accuracy", "test accuracy (mean ± std over seeds)",
                   "Test accuracy vs density: " + _title(rows), dense_line=True)


def node_ratio_figure(rows: List[dict]):
    """Node ratio (effective nodes / dense nodes) vs density, a line per method."""
    return _figure(rows, "node_ratio", "node ratio (effective nodes / dense nodes)",
                   "Node ratio vs density: " + _title(rows), dense_line=True)


def save_plots(rows: List[dict], out_dir, fmt: str = "png", dpi: float = 100) -> List[str]:
    """DIR/accuracy.<fmt> and DIR/node_ratio.<fmt> (png, pdf or svg); the written paths."""
    check_plot_format(fmt, dpi)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    paths = []
    for name, make in (("accuracy", accuracy_figure), ("node_ratio", node_ratio_figure)):
        path = os.path.join(os.fspath(out_dir), f"{name}.{fmt}")
        tmp = path + f".tmp{os.getpid()}.{fmt}"
        try:
            FigureCanvasAgg(make(rows)).print_figure(tmp, format=fmt, dpi=dpi)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        paths.append(path)
    return paths
