"""`widetopo spectrum MASKS... [--dense] -o spectrum.png`: the empirical NTK spectrum of the dense
network and of each mask file, on the same pruning samples (widetopo.sparsity.spectrum).

The network is rebuilt from the mask files' metadata (model, dataset, in_channels,
num_classes, image_size, seed, init file), as `widetopo train` does: torch.manual_seed(seed)
then build_model, then the recorded --init file if any. Every file must record the same
network. The samples are the first --samples (default: min(100, pruning_samples)) of the
pruning set `widetopo prune` drew: the training split, permuted with the seed (the pruning set
is the start of that permutation). If pruning used --max-train-samples, pass the same value.

Writes the PNG (sorted eigenvalues, log axis) and, next to it, <stem>.csv and <stem>.json.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List

logger = logging.getLogger("widetopo.cli.spectrum")

#: largest N (samples x outputs) for --mode full: a 20000 x 20000 float64 matrix is 3.2 GB
MAX_FULL = 20000

_KEYS = ("model", "dataset", "seed", "in_channels", "num_classes", "image_size", "init_sha256")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `spectrum` command on an argparse subparsers object; returns its parser."""
    from widetopo.sparsity.spectrum import BATCHNORM, OUTPUTS

    p = subparsers.add_parser(
        "spectrum", help="NTK eigenvalue spectrum of the dense network and of mask files (plot, CSV, JSON)",
        description="Sorted eigenvalues of the empirical NTK (float64, every logit of every sample) of the "
                    "network the mask files were computed for, dense and under each mask, on the same pruning "
                    "samples; plotted on a log axis, with the numbers as CSV and JSON.")
    p.add_argument("masks", nargs="*", help="mask files written by `widetopo prune` (all for the same network)")
    p.add_argument("--dense", action="store_true", help="also the dense network (alone: give --model/--dataset)")
    p.add_argument("-o", "--output", default="spectrum.png", help="PNG to write; <stem>.csv and <stem>.json go "
                                                                  "next to it; default: %(default)s")
    p.add_argument("--mode", choices=("full", "topk"), default="full",
                   help="full: every eigenvalue; topk: the --k largest by Lanczos; default: %(default)s")
    p.add_argument("--k", type=_int_at_least(1), default=None, help="eigenvalues for --mode topk")
    p.add_argument("--outputs", choices=OUTPUTS, default="per_logit",
                   help="per_logit: every logit separately; sum: their sum per sample; default: %(default)s")
    p.add_argument("--batchnorm", choices=BATCHNORM, default="eval",
                   help="eval: running statistics; train: statistics of the samples (the WideTopo figure); "
                        "default: %(default)s")
    p.add_argument("--samples", type=_int_at_least(1), default=None,
                   help="first N pruning samples; default: min(100, the file's pruning_samples)")
    p.add_argument("--model", default=None, help="network (without mask files, or to override the files')")
    p.add_argument("--dataset", default=None, help="dataset (without mask files, or to override the files')")
    p.add_argument("--seed", type=int, default=None, help="initialization seed; default: from the mask files (0)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files")
    p.add_argument("--max-train-samples", type=_int_at_least(1), default=None,
                   help="the --max-train-samples pruning used, if any (so the samples are the same)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]; default: %(default)s")
    p.set_defaults(command="spectrum")
    return p


def _metas(paths: List[str]) -> List[dict]:
    from widetopo.sparsity.maskfile import read_header

    metas = []
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"mask file {path!r} does not exist" if not os.path.exists(path) else f"{path!r} is not a file")
        metas.append(read_header(path)["meta"])
    for key in _KEYS:
        values = {repr(m.get(key)) for m in metas}
        if len(values) > 1:
            raise ValueError(f"the mask files record different {key} ({', '.join(sorted(values))}); their spectra "
                             "are only comparable on one network: give files of the same model, dataset and seed")
    return metas


def _labels(paths: List[str]) -> List[str]:
    labels = []
    for path in paths:
        base = os.path.splitext(os.path.basename(path))[0] or path
        label, i = base, 2
        while label in labels or label == "dense":
            label, i = f"{base}-{i}", i + 1
        labels.append(label)
    return labels


def _check_output(path: str) -> None:
    if not path.lower().endswith(".png"):
        raise ValueError(f"-o/--output must name a .png file, got {path!r}")
    stem = os.path.splitext(path)[0]
    for target in (path, stem + ".csv", stem + ".json"):
        if os.path.isdir(target):
            raise ValueError(f"cannot write {target!r}: it is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write -o/--output {path!r}: directory {parent!r} does not exist or is not writable")


def run(args) -> int:
    """Run `widetopo spectrum` from parsed arguments; returns the exit status (errors raise)."""
    import torch

    from widetopo.data import load_dataset
    from widetopo.models import build_model
    from widetopo.sparsity.maskfile import load_masks
    from widetopo.sparsity.spectrum import spectrum_report

    paths = list(args.masks or [])
    if not paths and not args.dense:
        raise ValueError("give mask files, or --dense for the dense network alone")
    if args.mode == "topk" and args.k is None:
        raise ValueError("--mode topk needs --k")
    if args.mode == "full" and args.k is not None:
        raise ValueError("--k is only used with --mode topk")
    _check_output(args.output)
    meta = _metas(paths)[0] if paths else {}
    name = args.model or meta.get("model")
    dataset = args.dataset or meta.get("dataset")
    if name is None or dataset is None:
        raise ValueError("the network is unknown: the mask files do not record model/dataset; pass --model and --dataset")
    seed = int(args.seed if args.seed is not None else meta.get("seed", 0))

    ds = load_dataset(dataset, split="train", data_dir=args.data_dir, max_samples=args.max_train_samples)
    pool = int(meta.get("pruning_samples", len(ds)))
    n = min(args.samples if args.samples is not None else min(100, pool), len(ds))
    images, _ = ds.subset(min(pool, len(ds)), seed=seed).tensors()
    inputs = images[:n].to(args.device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(name, in_channels=ds.in_channels, num_classes=ds.num_classes, image_size=ds.image_size)
    if meta.get("init_file"):
        from widetopo.experiments.pretrained import load_init

        info = load_init(model, meta["init_file"])
        if meta.get("init_sha256") and info["init_sha256"] != meta["init_sha256"]:
            raise ValueError(f"init file {meta['init_file']!r} changed since the masks were computed")
    model = model.to(args.device)
    per_sample = 1
    if args.outputs == "per_logit":
        with torch.no_grad():
            model.eval()  # freshly built: nothing to restore
            per_sample = model(inputs[:1]).numel()
    if args.mode == "full" and n * per_sample > MAX_FULL:
        raise ValueError(f"--mode full would build a {n * per_sample} x {n * per_sample} matrix ({n} samples x "
                         f"{per_sample} outputs; at most {MAX_FULL} here): pass fewer --samples, --outputs sum, "
                         "or --mode topk --k K")

    by_label = {"dense": None} if args.dense else {}
    for label, path in zip(_labels(paths), paths):
        by_label[label] = load_masks(path, model=model)
    info = {"model": name, "dataset": dataset, "seed": seed, "mask_files": {lab: p for lab, p in zip(_labels(paths), paths)}}
    result = spectrum_report(model, inputs, by_label, args.output, mode=args.mode, k=args.k, outputs=args.outputs,
                             batchnorm=args.batchnorm, info=info)
    out = sys.stdout
    print(f"NTK spectrum of {name} on {n} {dataset} samples ({args.outputs}, BatchNorm {args.batchnorm}):", file=out)
    for label, s in result["spectra"].items():
        vals = s["eigenvalues"]
        positive = [v for v in vals if v > 0]
        dens = "1" if s["density"] is None else f"{s['density']:.4g}"
        trace = f", trace {s['trace']:.6g}" if s["trace"] is not None else ""
        print(f"  {label}: density {dens}, largest {vals[0]:.6g}, smallest positive "
              f"{(positive[-1] if positive else float('nan')):.6g}{trace}", file=out)
    for path in result["files"]:
        print(f"wrote {path}", file=out)
    return 0
