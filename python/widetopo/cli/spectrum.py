"""`widetopo spectrum MASKS... [--dense] -o spectrum.png`: the empirical NTK spectrum of the dense
network and of each mask file, on the same pruning samples (widetopo.sparsity.spectrum).

The network is rebuilt from the mask files' metadata (model, dataset, seed, init file) as
`widetopo train` does (experiments.recipe.build: torch.manual_seed(seed), build_model, the
recorded --init file with its checksum checked). Every file must record the same network. The
samples are the first --samples (default: min(100, pruning_samples)) of the pruning set that
`widetopo prune` drew, rebuilt from what the file records: the training split (limited to its
--max-train-samples, which a --max-train-samples given here overrides) permuted with the seed,
whose start is the pruning set, or its class-balanced subset (--samples-per-class). When the
files record different pruning sets, the first file's is used, with a warning. (Files written
before 2026-12-06 record neither; pass --max-train-samples as when pruning.)

Writes the plot (sorted eigenvalues, log axis) and, next to it, <stem>.csv and <stem>.json.
"""
from __future__ import annotations

import logging
import os
from typing import List

from widetopo.cli import args as cli_args
from widetopo.cli.args import CLIError, UsageError, out

logger = logging.getLogger(__name__)

OUTPUTS = [("output", "-o/--output", "file")]

#: largest N (samples x outputs) for --mode full: a 20000 x 20000 float64 matrix is 3.2 GB
MAX_FULL = 20000

#: metadata that must agree between the mask files (one network, one initialization)
_SAME = ("model", "dataset", "seed", "in_channels", "num_classes", "image_size", "init_sha256")
#: metadata of the pruning set the samples are taken from (the first file's is used)
_DATA = ("pruning_samples", "samples_per_class", "max_train_samples")


def add_parser(sub) -> None:
    from widetopo.sparsity.spectrum import BATCHNORM, OUTPUTS as NTK_OUTPUTS

    p = sub.add_parser(
        "spectrum", help="NTK eigenvalue spectrum of the dense network and of mask files (plot, CSV, JSON)",
        description="Sorted eigenvalues of the empirical NTK (float64, every logit of every sample) of the "
                    "network the mask files were computed for, dense and under each mask, on the same pruning "
                    "samples; plotted on a log axis, with the numbers as CSV and JSON.")
    p.add_argument("masks", nargs="*", help="mask files written by `widetopo prune` (all for the same network)")
    p.add_argument("--dense", action="store_true", help="also the dense network (alone: the network comes from "
                                                        "--model/--dataset/--seed, default cnn / digits / 0)")
    p.add_argument("-o", "--output", default="spectrum.png",
                   help="plot to write (.png); <stem>.csv and <stem>.json go next to it; default: %(default)s")
    p.add_argument("--mode", choices=("full", "topk"), default="full",
                   help="full: every eigenvalue; topk: the --k largest by Lanczos; default: %(default)s")
    p.add_argument("--k", type=cli_args.int_at_least(1), default=None, help="eigenvalues for --mode topk")
    p.add_argument("--outputs", choices=NTK_OUTPUTS, default="per_logit",
                   help="per_logit: every logit separately; sum: their sum per sample; default: %(default)s")
    p.add_argument("--batchnorm", choices=BATCHNORM, default="eval",
                   help="eval: running statistics; train: statistics of the samples (the WideTopo figure); "
                        "default: %(default)s")
    p.add_argument("--samples", type=cli_args.int_at_least(1), default=None,
                   help="the first N pruning samples; default: min(100, the files' pruning_samples)")
    cli_args.add_model_data(p, required_defaults=False)


def _metas(paths: List[str]) -> List[dict]:
    from widetopo.sparsity.maskfile import read_header

    metas = []
    for path in paths:
        if not os.path.isfile(path):
            raise CLIError(f"mask file {path!r} does not exist" if not os.path.exists(path) else f"{path!r} is not a file")
        metas.append(read_header(path)["meta"])
    for key in _SAME:
        values = {repr(m.get(key)) for m in metas}
        if len(values) > 1:
            raise CLIError(f"the mask files record different {key} ({', '.join(sorted(values))}); their spectra "
                           "are only comparable on one network: give files of the same model, dataset and seed")
    differ = [key for key in _DATA if len({repr(m.get(key)) for m in metas}) > 1]
    if differ:
        logger.warning("the mask files were pruned on different sets (%s differ); the spectra use the samples of "
                       "the first file, %s", ", ".join(differ), paths[0])
    return metas


def _pruning_set(train_ds, meta: dict, seed: int):
    """The pruning set `widetopo prune` drew (experiments.recipe.prune), as the file records it."""
    per_class = meta.get("samples_per_class")
    if per_class:
        return train_ds.balanced_subset(int(per_class), seed=seed)
    return train_ds.subset(min(int(meta.get("pruning_samples", len(train_ds))), len(train_ds)), seed=seed)


def _labels(paths: List[str]) -> List[str]:
    """The file names without extension, made unique (and never "dense")."""
    labels: List[str] = []
    for path in paths:
        base = os.path.splitext(os.path.basename(path))[0] or path
        label, i = base, 2
        while label in labels or label == "dense":
            label, i = f"{base}-{i}", i + 1
        labels.append(label)
    return labels


def run(args, quiet: bool) -> int:
    import torch

    from widetopo.experiments import recipe
    from widetopo.sparsity.maskfile import load_masks
    from widetopo.sparsity.spectrum import spectrum_report

    paths = list(args.masks or [])
    if not paths and not args.dense:
        raise UsageError("give mask files, or --dense for the dense network alone")
    if args.mode == "topk" and args.k is None:
        raise UsageError("--mode topk needs --k")
    if args.mode == "full" and args.k is not None:
        raise UsageError("--k is only used with --mode topk")
    if not args.output.lower().endswith(".png"):
        raise UsageError(f"-o/--output must name a .png file, got {args.output!r}")
    stem = os.path.splitext(args.output)[0]
    for path, flag in ((stem + ".csv", "the CSV"), (stem + ".json", "the JSON")):
        cli_args.check_file_writable(path, flag)

    meta = _metas(paths)[0] if paths else {}
    values = {key: getattr(args, key) if getattr(args, key) is not None else meta.get(key, cli_args.DEFAULTS[key])
              for key in ("model", "dataset")}
    values["seed"] = int(args.seed if args.seed is not None else meta.get("seed", 0))
    if meta.get("init_file"):
        if not os.path.isfile(meta["init_file"]):
            raise CLIError(f"the masks were computed from init file {meta['init_file']!r}, which does not exist any more")
        values.update(init=meta["init_file"], init_sha256=meta.get("init_sha256"))
    if args.max_train_samples is None and meta.get("max_train_samples") is not None:
        values["max_train_samples"] = int(meta["max_train_samples"])
    setup = cli_args.setup_from(args, **values)
    train_ds = recipe.load_data(setup, "train")
    images, _ = _pruning_set(train_ds, meta, setup.seed).tensors()
    n = min(args.samples if args.samples is not None else 100, len(images))
    inputs = images[:n].to(setup.device)
    model = recipe.build(setup, train_ds).to(setup.device)

    per_sample = 1
    if args.outputs == "per_logit":
        with torch.no_grad():
            model.eval()  # freshly built: no mode to restore
            per_sample = model(inputs[:1]).numel()
    if args.mode == "full" and n * per_sample > MAX_FULL:
        raise CLIError(f"--mode full would build a {n * per_sample} x {n * per_sample} matrix ({n} samples x "
                       f"{per_sample} outputs; at most {MAX_FULL} here): pass fewer --samples, --outputs sum, "
                       "or --mode topk --k K")

    labels = _labels(paths)
    by_label = {"dense": None} if args.dense else {}
    for label, path in zip(labels, paths):
        by_label[label] = load_masks(path, model=model)
    info = {"model": setup.model, "dataset": setup.dataset, "seed": setup.seed,
            "mask_files": dict(zip(labels, paths))}
    result = spectrum_report(model, inputs, by_label, args.output, mode=args.mode, k=args.k, outputs=args.outputs,
                             batchnorm=args.batchnorm, info=info)
    out(f"NTK spectrum of {setup.model} on {n} {setup.dataset} samples ({args.outputs}, BatchNorm {args.batchnorm}):")
    for label, s in result["spectra"].items():
        vals = s["eigenvalues"]
        positive = [v for v in vals if v > 0]
        dens = "1" if s["density"] is None else f"{s['density']:.4g}"
        trace = f", trace {s['trace']:.6g}" if s["trace"] is not None else ""
        smallest = f", smallest positive {positive[-1]:.6g}" if positive else ""
        out(f"  {label}: density {dens}, largest {vals[0]:.6g}{smallest}{trace}")
    for path in result["files"]:
        out(f"wrote {path}")
    return 0
