"""`widetopo prune`: prune a freshly initialized network at initialization; write a mask file."""
from __future__ import annotations

from widetopo.cli import args as cli_args
from widetopo.cli.args import out
from widetopo.experiments import recipe
from widetopo.sparsity.report import mask_report

OUTPUTS = [("output", "-o/--output", "file")]


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a freshly initialized network and write a mask file",
                       description="Prune a freshly initialized network at initialization; write a mask file.")
    cli_args.add_model_data(p)
    cli_args.add_prune(p)
    p.add_argument("-o", "--output", default="masks.wtm", help="mask file to write; default: %(default)s")
    cli_args.add_init(p)


def collapsed_note(masks) -> str:
    """"N collapsed layer(s): names" (layers left with no weight)."""
    rep = mask_report(masks)
    return f"{len(rep['collapsed'])} collapsed layer(s)" + (f": {', '.join(rep['collapsed'])}" if rep["collapsed"] else "")


def run(args, quiet: bool) -> int:
    setup, cfg = cli_args.setup_from(args), cli_args.prune_from(args)
    train_ds = recipe.load_data(setup, "train")
    model = recipe.build(setup, train_ds)
    masks, seconds = recipe.prune(setup, cfg, model, train_ds, quiet)
    masks.save(args.output)
    out(f"pruned {setup.model} on {setup.dataset} with {cfg.method}: density {masks.density:.6f} "
        f"({masks.kept} of {masks.numel} prunable weights) in {seconds:.1f} s; {collapsed_note(masks)}")
    out(f"wrote {args.output}")
    return 0
