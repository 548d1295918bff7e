"""`widetopo run`: prune, then train the pruned and the dense network from the same initialization
(the built-in demo without arguments)."""
from __future__ import annotations

from widetopo.cli import args as cli_args
from widetopo.cli.args import out
from widetopo.cli.prune import collapsed_note
from widetopo.experiments import recipe

OUTPUTS = [("output", "-o/--output", "file"), ("results", "--results", "file")]


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="prune, then train dense and pruned; the built-in demo without arguments",
                       description="Prune at initialization, then train the pruned network and (unless --no-dense) the "
                                   "dense network from the same initialization; print both accuracies. Without "
                                   "arguments: WideTopo-S, density 0.05, small CNN on scikit-learn digits.")
    cli_args.add_model_data(p)
    cli_args.add_prune(p)
    cli_args.add_train(p, epochs_default=10)
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    p.add_argument("-o", "--output", default=None, help="also write the mask file here")
    cli_args.add_init(p)


def run(args, quiet: bool) -> int:
    setup, cfg, tcfg = cli_args.setup_from(args), cli_args.prune_from(args), cli_args.train_from(args)
    data = recipe.load_datasets(setup, augment=tcfg.augment)
    model = recipe.build(setup, data.train)
    out(f"widetopo run: {cfg.method} at density {cfg.density} on {setup.model} / {setup.dataset} "
        f"({len(data.train)} train, {len(data.test)} test samples), seed {setup.seed}")
    masks, seconds = recipe.prune(setup, cfg, model, data.train, quiet)
    out(f"pruned in {seconds:.1f} s: density {masks.density:.6f} ({masks.kept} of {masks.numel} prunable weights); "
        f"{collapsed_note(masks)}")
    if args.output:
        masks.save(args.output)
        out(f"wrote {args.output}")
    results = {}
    runs = [("pruned", masks)] + ([] if args.no_dense else [("dense", None)])
    for label, m in runs:
        net = recipe.build(setup, data.train)  # the same initialization the masks were computed for
        results[label] = recipe.train(setup, tcfg, net, m, data.train_aug, data.test, quiet, label)
        out(f"{label:>6}: test accuracy {results[label]['final']['accuracy']:.4f} after {tcfg.epochs} epochs "
            f"({results[label]['seconds']:.1f} s)")
    out("")
    out(f"{'':8}{'density':>10}{'test acc':>10}")
    for label, m in runs:
        d = masks.density if m is not None else 1.0
        out(f"{label:<8}{d:>10.4f}{results[label]['final']['accuracy']:>10.4f}")
    if args.results:
        cli_args.write_json(args.results, {
            "model": setup.model, "dataset": setup.dataset, "method": cfg.method, "density": masks.density,
            "pruning_seconds": seconds, "mask_meta": masks.meta,
            **{label: {"test_accuracy": r["final"]["accuracy"], "history": r["history"]} for label, r in results.items()},
        })
    return 0
