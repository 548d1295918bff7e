"""Costs of PAGS and NPB (docs/design.md §5.10, §5.11), measured in one run:

1. PAGS's two largest singular values of a layer's mask from the short side's Gram matrix
   (widetopo.scores.pags.top_singular_values) against the plain-PyTorch baseline of a dense
   eigensolve (torch.linalg.eigvalsh) of the bipartite adjacency [[0, M^T], [M, 0]], on a
   ResNet-18 layer4 conv mask (512 x 512*9) at density 0.05;
2. NPB's integer program on one chunk of 32 rows x 512 columns with 3x3 kernels;
3. seconds of one engine round of pags (population 10; per member = that / 10) and npb on a CIFAR
   ResNet-20 at density 0.018 with two batches of 32 random images, next to one snip round on
   one batch.

    python benchmarks/bench_pags_npb.py

Environment: WIDETOPO_BENCH_THREADS (torch default).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from widetopo.engine import rounds
from widetopo.engine.state import PruneState
from widetopo.methods import get_method
from widetopo.models import build_model
from widetopo.scores.base import Batch
from widetopo.scores.npb import npb_program
from widetopo.scores.pags import top_singular_values
from widetopo.sparsity.selection import select_prunable


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spectra() -> None:
    torch.manual_seed(0)
    m = (torch.rand(512, 512 * 9) < 0.05).double()
    rows, cols = m.shape
    adjacency = torch.zeros(rows + cols, rows + cols, dtype=torch.float64)
    adjacency[:cols, cols:] = m.T
    adjacency[cols:, :cols] = m
    gram = min(_timed(lambda: top_singular_values(m)) for _ in range(3))
    dense = _timed(lambda: torch.linalg.eigvalsh(adjacency))
    s = torch.linalg.eigvalsh(adjacency).abs().sort(descending=True).values
    assert abs(top_singular_values(m)[1] - float(s[2])) < 1e-6 * float(s[0])
    print(f"| s1, s2 of a 512 x 4608 mask | Gram {gram:.3f} s | dense adjacency eigvalsh {dense:.2f} s "
          f"| {dense / gram:.0f}x |")


def npb_chunk() -> None:
    rng = np.random.default_rng(0)
    paths = np.repeat(rng.random((1, 512)) * 100, 32, 0)
    for density in (0.05, 0.01):
        budget = int(density * 32 * 512 * 9)
        seconds = _timed(lambda: npb_program(paths, np.full((32, 512), 9), budget))
        print(f"| npb program, 32 x 512 pairs, k = 9, budget {budget} | {seconds:.2f} s | | |")


def rounds_resnet20() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 3, 10, 32)
    g = torch.Generator().manual_seed(0)
    batches = [Batch(i, torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
               for i in range(2)]
    for name, opts, data in (("snip", {}, batches[:1]), ("pags", {"population": 10}, batches), ("npb", {}, batches),
                             ("npb", {"input_term": "port"}, batches)):
        scorer = get_method(name).make_scorer(**opts)
        state = PruneState(model, select_prunable(model), torch.device("cpu"))
        keep = round(0.018 * state.n_prunable)

        def one_round():
            ctx = state.context(1, seed=0)
            scores = rounds.compute_scores(scorer, ctx, data, torch.device("cpu"), "bench")
            rounds.select_masks(scorer, ctx, scores, keep, "exact", 5.0, state.kept, state.n_prunable)

        print(f"| ResNet-20 round, {name} {opts or ''} | {_timed(one_round):.2f} s | | |")


if __name__ == "__main__":
    if os.environ.get("WIDETOPO_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["WIDETOPO_BENCH_THREADS"]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    print("| what | time | baseline | ratio |\n|---|---|---|---|")
    spectra()
    npb_chunk()
    rounds_resnet20()
