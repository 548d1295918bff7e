"""What a mask does to a network: per-layer density, kept weights, active units, collapsed layers.

A layer has *collapsed* when it keeps no weight at all, or (rank >= 2) when no output unit or
no input unit keeps a connection - then no signal passes through it and the pruned network
is disconnected, the failure WideTopo's density decay and restoration are designed to avoid.
The counts come from one topology-aware mask_stats call over all masks (units of grouped and
transposed convolutions read as widetopo.sparsity.topology says). With the model, the
report also gives effective weights (kept and on an input -> output path of kept weights),
effective nodes and the node ratio (widetopo.sparsity.effective, docs/design.md §6).

Inside a fused attention tensor (q, k, v in one weight) and per attention head, a projection
can keep nothing while the tensor keeps weights; the report lists those blocks too
(widetopo.sparsity.blocks: "collapsed_parts" names every tensor, projection and head left with
no weight).
"""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

import torch
from torch import nn

from widetopo.sparsity import blocks as fused
from widetopo.sparsity import topology

logger = logging.getLogger(__name__)


def _collapse_reason(kept: int, numel: int, active_out: int, active_in: int, rank: int) -> Optional[str]:
    if numel == 0:
        return None
    if kept == 0:
        return "no kept weights"
    if rank >= 2 and active_out == 0:
        return "no active output units"
    if rank >= 2 and active_in == 0:
        return "no active input units"
    return None


def _layouts(masks, model: Optional[nn.Module], names: List[str]):
    """The unit topology of each mask (grouped / transposed convs, tokens): from the model when
    given, else what the masks carry (widetopo.Masks.layouts), else dense."""
    if model is not None:
        return topology.unit_layouts(model, names)
    carried = getattr(masks, "layouts", None)
    return list(carried) if carried else [topology.DENSE] * len(names)


def mask_report(masks, model: Optional[nn.Module] = None, input_shape=None) -> dict:
    """A JSON-ready summary of `masks` (name -> bool tensor, e.g. widetopo.Masks).

    Per layer: name, shape, numel, kept, density = kept / numel, out_units / in_units (dims 0 and
    1; each entry for rank < 2), active_out / active_in (units with at least one kept weight),
    collapsed (reason or None); blocks (the kept weights of each projection and attention head
    of a fused attention tensor, when known from `model` or the masks' .blocks); with `model`,
    also the module type and whether the mask fits. collapsed: the tensors that collapsed;
    collapsed_parts: every tensor, projection (`name[q]`) and head (`name[k head 1]`) left
    with no kept weight.
    Totals: numel, kept, density over all masks; with `model`, the model's parameter count and
    the density over all its parameters (unmasked ones counted as kept).
    Effective sparsity, with `model` and an input shape (`input_shape`, else from the masks'
    metadata in_channels/image_size): per layer effective, effective_density, units and
    effective_nodes; totals effective, effective_density, nodes, effective_nodes, node_ratio.
    """
    if not hasattr(masks, "items"):
        raise TypeError(f"masks must be a mapping name -> bool tensor (e.g. widetopo.Masks), got {type(masks).__name__}")
    names = list(masks.keys())
    tensors = [masks[n] for n in names]
    for n, m in zip(names, tensors):
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"masks[{n!r}] must be a torch.bool tensor, got {getattr(m, 'dtype', type(m).__name__)}")
    modules = dict(model.named_modules()) if model is not None else {}
    params = dict(model.named_parameters()) if model is not None else {}
    for name, m in zip(names, tensors):
        if model is not None and name not in params:
            raise ValueError(f"masks[{name!r}] is not a parameter of the model")
    layouts = _layouts(masks, model, names)
    split = fused.model_blocks(model, names) if model is not None else dict(getattr(masks, "blocks", None) or {})
    table = topology.mask_stats([m.cpu() for m in tensors], layouts).tolist() if tensors else []
    layers, collapsed = [], []
    for name, m, layout, (kept, act_out, act_in) in zip(names, tensors, layouts, table):
        numel = m.numel()
        out_units, in_units = topology.unit_counts(tuple(m.shape), layout)
        reason = _collapse_reason(kept, numel, act_out, act_in, m.dim())
        row = {
            "name": name,
            "shape": list(m.shape),
            "numel": numel,
            "kept": int(kept),
            "density": kept / numel if numel else 1.0,
            "out_units": int(out_units),
            "in_units": int(in_units),
            "active_out": int(act_out),
            "active_in": int(act_in),
            "collapsed": reason,
        }
        if name in split:
            row["blocks"] = [{"label": b.label, "head": b.head, "dim": b.dim, "start": b.start, "stop": b.stop,
                              "kept": b.kept, "numel": b.numel} for b in fused.block_stats(m.cpu(), split[name])]
        if model is not None:
            owner = modules.get(name.rpartition(".")[0])
            row["module"] = type(owner).__name__ if owner is not None else None
            if name not in params:
                raise ValueError(f"masks[{name!r}] is not a parameter of the model")
            if tuple(params[name].shape) != tuple(m.shape):
                raise ValueError(f"masks[{name!r}] has shape {list(m.shape)}, the model's parameter has {list(params[name].shape)}")
        layers.append(row)
        if reason:
            collapsed.append(name)

    numel = sum(r["numel"] for r in layers)
    kept = sum(r["kept"] for r in layers)
    report = {
        "layers": layers,
        "collapsed": collapsed,
        "collapsed_parts": fused.collapsed_parts(dict(zip(names, [m.cpu() for m in tensors])), blocks=split),
        "total": {"numel": numel, "kept": kept, "density": kept / numel if numel else 1.0, "layers": len(layers)},
        "meta": _plain(dict(getattr(masks, "meta", None) or {})),
    }
    if model is not None:
        from widetopo.sparsity.effective import effective_sparsity, input_shape_from_meta

        shape = input_shape if input_shape is not None else input_shape_from_meta(getattr(masks, "meta", None) or {})
        if shape is not None:
            eff = effective_sparsity(model, dict(zip(names, tensors)), tuple(shape))
            for row in layers:
                e = eff["layers"][row["name"]]
                row["effective"] = e["effective"]
                row["effective_density"] = e["effective"] / row["numel"] if row["numel"] else 1.0
                row["units"] = e["units"]
                row["effective_nodes"] = e["effective_nodes"]
            report["total"].update({k: eff["total"][k] for k in
                                    ("effective", "effective_density", "nodes", "effective_nodes", "node_ratio")})
            report["input_shape"] = list(shape)
        total_params = sum(p.numel() for p in model.parameters())
        report["total"]["model_params"] = total_params
        report["total"]["model_density"] = (total_params - numel + kept) / total_params if total_params else 1.0
    return report


def _plain(value):
    """Metadata made JSON-safe (tensors -> numbers/lists, anything else -> repr)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return repr(value)


def format_table(report: dict) -> str:
    """The per-layer table as fixed-width text (what `widetopo report` prints)."""
    t = report["total"]
    eff = "effective" in t
    head = ["layer", "shape", "kept", "numel", "density"] + (["effective", "eff. dens."] if eff else [])
    head += ["active out", "active in"] + (["eff. nodes"] if eff else []) + [""]
    rows = [tuple(head)]
    for r in report["layers"]:
        row = [r["name"], "x".join(map(str, r["shape"])), str(r["kept"]), str(r["numel"]), f"{r['density']:.4f}"]
        if eff:
            row += [str(r["effective"]), f"{r['effective_density']:.4f}"]
        row += [f"{r['active_out']}/{r['out_units']}", f"{r['active_in']}/{r['in_units']}"]
        if eff:
            row.append(f"{r['effective_nodes']}/{r['units']}" if r["units"] is not None else "-")
        row.append(f"COLLAPSED: {r['collapsed']}" if r["collapsed"] else "")
        rows.append(tuple(row))
    total = ["total", "", str(t["kept"]), str(t["numel"]), f"{t['density']:.4f}"]
    if eff:
        total += [str(t["effective"]), f"{t['effective_density']:.4f}", "", "", f"{t['effective_nodes']}/{t['nodes']}"]
    else:
        total += ["", ""]
    rows.append(tuple(total + [""]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = set(range(2, len(head) - 1))
    lines = []
    for k, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0 or k == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths).rstrip())
    if report["collapsed"]:
        lines.append(f"{len(report['collapsed'])} collapsed layer(s): {', '.join(report['collapsed'])}")
    else:
        lines.append("no collapsed layers")
    parts = [p for p in report.get("collapsed_parts", ()) if p not in report["collapsed"]]
    if parts:
        lines.append(f"{len(parts)} collapsed attention projection(s)/head(s) (no kept weight): {', '.join(parts)}")
    if eff:
        ratio = t["node_ratio"]
        lines.append(f"effective density {t['effective_density']:.4f} ({t['effective']} of {t['kept']} kept weights on an "
                     f"input-output path); node ratio {ratio:.4f}" if ratio is not None else
                     f"effective density {t['effective_density']:.4f}")
    return "\n".join(lines)


def write_json(report: dict, path) -> str:
    """Write the report as indented JSON; returns the path."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=False)
        f.write("\n")
    return path


PLOT_FORMATS = ("png", "pdf", "svg")


def check_plot_format(fmt: str, dpi) -> None:
    """Refuse an unknown plot format or a dpi outside [10, 1200], naming the argument."""
    if fmt not in PLOT_FORMATS:
        raise ValueError(f"plot format must be one of {', '.join(PLOT_FORMATS)}, got {fmt!r}")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not 10 <= dpi <= 1200:
        raise ValueError(f"dpi must be a number in [10, 1200], got {dpi!r}")


def plot_report(report: dict, out_dir, prefix: str = "mask", fmt: str = "png", dpi: float = 100) -> List[str]:
    """Two plots in `out_dir`: <prefix>_density.<fmt> (per-layer density bars, log scale) and
    <prefix>_units.<fmt> (active / total output and input units per layer); fmt is png, pdf or
    svg. Needs matplotlib; draws on Agg figures directly, so the caller's pyplot backend and
    state are left alone. Returns the written paths."""
    check_plot_format(fmt, dpi)
    try:
        import matplotlib  # noqa: F401  (the package itself first: a clear error when it is absent)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (or install widetopo[plot])") from None
    os.makedirs(out_dir, exist_ok=True)
    layers = report["layers"]
    labels = [r["name"] for r in layers]
    x = list(range(len(layers)))
    width = max(6.0, 0.35 * len(layers) + 2)
    paths = []

    def finish(fig, axes, suffix):
        for ax in axes:
            ax.set_xticks(x)
            ax.set_xticklabels(labels, rotation=90, fontsize=7)
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(os.fspath(out_dir), f"{prefix}_{suffix}.{fmt}"))
        FigureCanvasAgg(fig).print_figure(paths[-1], format=fmt, dpi=dpi)

    fig = Figure(figsize=(width, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    dens = [r["density"] for r in layers]
    colors = ["tab:red" if r["collapsed"] else "tab:blue" for r in layers]
    has_eff = "effective_density" in report["total"]
    ax.bar(x, [max(d, 1e-6) for d in dens], color=colors, label="kept" if has_eff else None)
    shown = [max(d, 1e-6) for d in dens]
    if has_eff:
        shown += [max(r["effective_density"], 1e-6) for r in layers]
        ax.bar(x, shown[len(dens):], width=0.4, color="tab:orange", label="effective")
        ax.axhline(report["total"]["effective_density"], color="tab:orange", ls=":", lw=1.2,
                   label=f"overall effective {report['total']['effective_density']:.4f}")
    ax.set_yscale("log")
    if shown:
        ax.set_ylim(bottom=min(shown) / 3, top=min(1.5, max(shown) * 2))  # bars start well below the lowest one
    ax.axhline(report["total"]["density"], color="k", ls="--", lw=1, label=f"overall {report['total']['density']:.4f}")
    ax.set_ylabel("density (kept / total), log scale")
    ax.set_title("per-layer density" + (" (red: collapsed)" if report["collapsed"] else ""))
    finish(fig, [ax], "density")

    fig = Figure(figsize=(width * 1.4, 4.5))
    axes = [fig.add_subplot(1, 2, k) for k in (1, 2)]
    for ax, (active, total, title) in zip(axes, [("active_out", "out_units", "output units"), ("active_in", "in_units", "input units")]):
        ax.bar(x, [r[total] for r in layers], color="lightgray", label="total")
        ax.bar(x, [r[active] for r in layers], color="tab:green", label="active")
        if active == "active_out" and "effective_nodes" in report["total"]:
            ax.bar(x, [r["effective_nodes"] or 0 for r in layers], width=0.4, color="tab:orange", label="effective nodes")
        ax.set_title(f"active {title} per layer")
        ax.set_ylabel(f"{title} (count)")
    finish(fig, axes, "units")
    logger.info("wrote plots %s", ", ".join(paths))
    return paths
