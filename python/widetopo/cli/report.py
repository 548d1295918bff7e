"""`widetopo report`: per-layer density, active units and collapsed layers of a mask file."""
from __future__ import annotations

import os

from widetopo.cli import args as cli_args
from widetopo.cli.args import CLIError, out
from widetopo.models import build_model
from widetopo.sparsity.maskfile import load_masks, read_header
from widetopo.sparsity.report import format_table, mask_report, plot_report, write_json

OUTPUTS = [("json", "--json", "file"), ("plots", "--plots", "dir")]
COMPUTES = False  # reads a mask file; no "machine busy" thread choice


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="per-layer density, active units and collapsed layers of a mask file",
                       description="Per-layer table of a mask file; optional JSON and PNG plots.")
    p.add_argument("masks", help="mask file")
    p.add_argument("--json", metavar="PATH", default=None, help="write the report as JSON")
    p.add_argument("--plots", metavar="DIR", default=None, help="write plots (needs matplotlib) into DIR")
    cli_args.add_plot_flags(p)
    p.add_argument("--model", type=cli_args.choices(cli_args.model_names()), default=None,
                   help="check the masks against this network (default: the one named in the file, if any)")


def run(args, quiet: bool) -> int:
    if not os.path.isfile(args.masks):
        raise CLIError(f"mask file {args.masks!r} does not exist" if not os.path.exists(args.masks)
                       else f"{args.masks!r} is not a file")
    meta = read_header(args.masks)["meta"]
    model = None
    name = args.model or meta.get("model")
    if name is not None and all(k in meta for k in ("in_channels", "num_classes", "image_size")):
        size = meta["image_size"]
        model = build_model(name, in_channels=meta["in_channels"], num_classes=meta["num_classes"],
                            image_size=tuple(size) if isinstance(size, list) else size)
    elif args.model is not None:
        raise CLIError("the mask file does not record in_channels/num_classes/image_size, so --model cannot be checked")
    masks = load_masks(args.masks, model=model)
    rep = mask_report(masks, model)
    rep["file"] = os.fspath(args.masks)
    info = ", ".join(f"{k} {meta[k]}" for k in ("method", "model", "dataset", "seed") if k in meta)
    out(f"{args.masks}: {info}")
    out(format_table(rep))
    if args.json:
        write_json(rep, args.json)
        out(f"wrote {args.json}")
    if args.plots:
        for path in plot_report(rep, args.plots, prefix=os.path.splitext(os.path.basename(args.masks))[0],
                                fmt=args.plot_format, dpi=args.dpi):
            out(f"wrote {path}")
    return 0
