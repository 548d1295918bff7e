"""`widetopo bench`: time one WideTopo scoring round and the compiled ops on this machine, against
plain PyTorch in the same run."""
from __future__ import annotations

import time

import torch

import widetopo
import widetopo_ext
from widetopo.cli import args as cli_args
from widetopo.cli.args import out
from widetopo.data import data_loader
from widetopo.experiments import recipe
from widetopo.models import build_model
from widetopo.sparsity.selection import select_prunable
from widetopo_ext import reference

OUTPUTS = []


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time one pruning round and the ops on this machine",
                       description="Time one WideTopo scoring round and the compiled ops, against plain PyTorch.")
    cli_args.add_model_data(p)
    p.add_argument("--samples", type=cli_args.int_at_least(1), default=256, help="pruning samples; default: %(default)s")
    p.add_argument("--prune-batch-size", type=cli_args.int_at_least(1), default=128,
                   help="pruning batch size; default: %(default)s")
    p.add_argument("--ops-model", type=cli_args.choices(cli_args.model_names()), default="resnet20",
                   help="network whose parameter shapes the op timings use; default: %(default)s")
    p.add_argument("--repeat", type=cli_args.int_at_least(1), default=5,
                   help="timing repetitions (best is reported); default: %(default)s")
    p.add_argument("--density", type=cli_args.density, default=0.05, help="mask density for the op timings; default: %(default)s")


def _best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(args, quiet: bool) -> int:
    with recipe.quiet_loggers():  # engine lines would break up the table on a shared terminal
        return _bench(args)


def _bench(args) -> int:
    out(f"widetopo bench: torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    kernels = widetopo_ext.build_info()["cpu_kernels" if args.device == "cpu" else "cuda_kernels"]

    # --- ops on the parameter shapes of a real network
    torch.manual_seed(0)
    net = build_model(args.ops_model)
    names = select_prunable(net)
    params = dict(net.named_parameters())
    gen = torch.Generator().manual_seed(0)
    tensors = [params[n].detach().to(args.device).clone() for n in names]
    masks = [(torch.rand(t.shape, generator=gen) < args.density).to(args.device) for t in tensors]
    scores = [torch.rand(t.shape, generator=gen).to(args.device) for t in tensors]
    n = sum(t.numel() for t in tensors)
    keep = int(round(args.density * n))
    cases = {
        "apply_masks_": (lambda f: f([t.clone() for t in tensors], masks)),
        "mask_stats": (lambda f: f(masks)),
        "global_threshold": (lambda f: f(scores, [m.clone() for m in masks], keep)),
        "density_decay_": (lambda f: f([s.clone() for s in scores], masks, 0.2)),
        "masked_sq_norm": (lambda f: f(tensors, masks)),
    }
    out(f"\nops on the {len(tensors)} prunable tensors of {args.ops_model} ({n} weights), best of {args.repeat}:")
    out(f"  {'op':<18}{'widetopo_ext':>14}{'plain PyTorch':>15}{'speedup':>9}")
    for op, call in cases.items():
        plain = _best_time(lambda: call(getattr(reference, op)), args.repeat)
        if not kernels.get(op, False):
            out(f"  {op:<18}{'no kernel':>14}{plain * 1e3:>13.2f}ms{'':>9}")
            continue
        ours = _best_time(lambda: call(getattr(widetopo_ext, op)), args.repeat)
        out(f"  {op:<18}{ours * 1e3:>12.2f}ms{plain * 1e3:>13.2f}ms{plain / ours:>8.2f}x")

    # --- one WideTopo scoring round, against one plain forward+backward pass over the same data
    train_ds = recipe.load_data(cli_args.setup_from(args), "train")
    torch.manual_seed(int(args.seed))
    model = build_model(args.model, in_channels=train_ds.in_channels, num_classes=train_ds.num_classes,
                        image_size=train_ds.image_size).to(args.device)
    loader = data_loader(train_ds.subset(min(args.samples, len(train_ds)), seed=args.seed), batch_size=args.prune_batch_size)
    batches = [(x.to(args.device), y.to(args.device)) for x, y in loader]

    def plain_pass():
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            torch.nn.functional.cross_entropy(model(x), y).backward()

    def one_round():
        widetopo.prune(model, batches, 0.5, method="widetopo", rounds=1, restorations=0, verbose=False,
                       seed=int(args.seed), device=args.device)

    plain_pass(), one_round()  # warm-up (first double-backward call loads lazy torch modules)
    base = _best_time(plain_pass, max(2, args.repeat // 2))
    rnd = _best_time(one_round, max(2, args.repeat // 2))
    model.zero_grad(set_to_none=True)
    nsamp = sum(x.shape[0] for x, _ in batches)
    out(f"\none WideTopo scoring round ({args.model}, {nsamp} {args.dataset} samples, {len(batches)} batches):")
    out(f"  widetopo round            {rnd:8.3f} s")
    out(f"  plain forward+backward    {base:8.3f} s   (round = {rnd / base:.1f}x one training pass)")
    out(f"  so on this pruning set: WideTopo-S (30 scoring rounds) ~{30 * rnd:.0f} s, WideTopo (150) ~{150 * rnd:.0f} s")
    return 0
