"""NPB (docs/design.md §5.11): the per-layer integer program against brute force over every mask of
tiny layers (objective written here), exact per-layer counts, k_max and chunk budgets, path counts
of an MLP against products of its mask matrices, and the clear errors (no scipy, unsupported
layers, no target)."""
import itertools
import sys

import numpy as np
import pytest
import torch
from torch import nn

import widetopo
from method_checks import check_resume, check_run_properties, check_two_processes
from widetopo.scores import npb as npb_mod
from widetopo.scores.erk import erk_quotas
from widetopo.scores.npb import npb_program

pytestmark = [pytest.mark.needs_kernel("global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]


def objective(pairs, paths, budget, b_max, alpha, beta, port=False):
    """alpha*A + (1-alpha)*B + beta*R of a pair-count matrix, written out."""
    rows, cols = len(pairs), len(pairs[0])
    live = lambda r, c: pairs[r][c] > 0 and paths[r][c] > 0  # noqa: E731
    active_rows = sum(any(live(r, c) for c in range(cols)) for r in range(rows))
    if port:
        dot = sum(paths[r][c] / max(max(row) for row in paths) * pairs[r][c] for r in range(rows) for c in range(cols))
        active_cols = cols - max(0.0, 1.0 - dot)
    else:
        active_cols = sum(any(live(r, c) for r in range(rows)) for c in range(cols))
    a = (active_rows + active_cols) / (rows + cols)
    b = sum(paths[r][c] * pairs[r][c] for r in range(rows) for c in range(cols)) / b_max
    distinct = sum(pairs[r][c] > 0 for r in range(rows) for c in range(cols))
    return alpha * a + (1 - alpha) * b + beta * distinct / budget


def brute_force(shape, paths, budget, alpha, beta, port=False):
    """Best objective over every binary mask of `shape` (rows, cols, taps) keeping `budget` weights."""
    rows, cols, taps = shape
    n = rows * cols * taps
    masks = []
    for kept in itertools.combinations(range(n), budget):
        m = [[0] * cols for _ in range(rows)]
        for flat in kept:
            m[flat // (cols * taps)][(flat // taps) % cols] += 1
        masks.append(m)
    b_max = max(sum(paths[r][c] * m[r][c] for r in range(rows) for c in range(cols)) for m in masks)
    return max(objective(m, paths, budget, b_max, alpha, beta, port) for m in masks), b_max


@pytest.mark.parametrize("budget", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("alpha", [0.01, 0.5, 1.0])
@pytest.mark.parametrize("port", [False, True])
def test_linear_3x2_program_equals_brute_force(budget, alpha, port):
    paths = [[3.0, 1.0], [3.0, 1.0], [3.0, 1.0]]  # input 0 carries three times the paths of input 1
    best, b_max = brute_force((3, 2, 1), paths, budget, alpha, 0.0, port)
    m = npb_program(np.array(paths), np.ones((3, 2), dtype=np.int64), budget, alpha, 0.0,
                    "port" if port else "paper")
    assert m.sum() == budget and m.min() >= 0 and m.max() <= 1
    assert objective(m.tolist(), paths, budget, b_max, alpha, 0.0, port) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("budget", [2, 3, 5])
@pytest.mark.parametrize("alpha,beta", [(0.01, 1.0), (0.3, 0.2), (0.01, 0.0)])
def test_conv_program_equals_brute_force(budget, alpha, beta):
    paths = [[2.0, 0.5, 1.0], [2.0, 0.5, 1.0]]  # 2 outputs x 3 inputs, kernels of 2 taps
    best, b_max = brute_force((2, 3, 2), paths, budget, alpha, beta)
    m = npb_program(np.array(paths), np.full((2, 3), 2), budget, alpha, beta)
    assert m.sum() == budget and m.min() >= 0 and m.max() <= 2
    assert objective(m.tolist(), paths, budget, b_max, alpha, beta) == pytest.approx(best, abs=1e-9)


def test_alpha_one_with_enough_budget_isolates_no_unit():
    rng = np.random.default_rng(0)
    paths = np.repeat(rng.random((1, 9)) + 0.1, 7, axis=0)
    m = npb_program(paths, np.full((7, 9), 4), 9, alpha=1.0, beta=0.0)
    assert m.sum() == 9 and (m.sum(0) > 0).all() and (m.sum(1) > 0).all()


# --------------------------------------------------------------------------- on networks
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        return self.fc(self.pool(torch.relu(self.conv2(h))).flatten(1))


def make_net():
    torch.manual_seed(0)
    return Net()


DATA = [torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(1))]


def test_per_layer_counts_k_max_and_largest_taps():
    model = make_net()
    masks = widetopo.prune(model, DATA, 0.15, method="npb", k_max=3, verbose=False)
    shapes = [(6, 2, 3, 3), (8, 6, 3, 3), (3, 8)]
    keep = int(0.15 * (108 + 432 + 24) + 0.5)
    counts = [int(m.sum()) for m in masks.values()]
    assert sum(counts) == keep and counts == erk_quotas(shapes, keep)
    for name in ("conv1.weight", "conv2.weight"):
        m, w = masks[name], dict(model.named_parameters())[name].detach().abs()
        per_kernel = m.flatten(2).sum(-1)
        assert per_kernel.max() <= 3
        for o, i in itertools.product(range(m.shape[0]), range(m.shape[1])):  # the largest |w| taps of each kernel
            taps = w[o, i].flatten()
            expect = torch.zeros(9, dtype=torch.bool)
            expect[taps.argsort(descending=True, stable=True)[:int(per_kernel[o, i])]] = True
            assert torch.equal(m[o, i].flatten(), expect)


def test_run_properties_resume_and_two_processes(tmp_path, monkeypatch):
    check_run_properties("npb", make_net, DATA, 0.2)
    check_run_properties("npb", make_net, DATA, 0.2, input_term="port", rounds=2)
    check_resume(tmp_path, monkeypatch, "npb", make_net, DATA, 0.2, kill_after=1, rounds=2)
    check_two_processes("npb")


def test_paths_of_an_mlp_are_products_of_the_mask_matrices(monkeypatch):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    seen = []
    real = npb_mod.npb_program
    monkeypatch.setattr(npb_mod, "npb_program", lambda paths, *a, **k: seen.append(paths.copy()) or real(paths, *a, **k))
    masks = widetopo.prune(model, [torch.randn(3, 4)], 0.4, method="npb", verbose=False)
    m1, m2, _ = (m.double() for m in masks.values())
    ones = torch.ones(4, dtype=torch.float64)
    expect = [ones, m1 @ ones, m2 @ m1 @ ones]  # paths reaching each input unit of layers 1, 2, 3
    assert len(seen) == 3
    for got, want, rows in zip(seen, expect, (6, 5, 3)):
        np.testing.assert_allclose(got, want.repeat(rows, 1).numpy(), rtol=1e-12)


def test_chunks_split_the_layer_budget(monkeypatch):
    seen = []
    real = npb_mod.npb_program
    monkeypatch.setattr(npb_mod, "npb_program",
                        lambda paths, upper, budget, *a: seen.append((paths.shape, budget)) or real(paths, upper, budget, *a))
    model = make_net()
    masks = widetopo.prune(model, DATA, 0.3, method="npb", chunk=4, chunk_above=40, verbose=False)
    # conv1: 6 x 2 = 12 pairs (one program); conv2: 8 x 6 = 48 > 40 -> rows 0-3, 4-7; fc: 3 x 8 = 24
    assert [s for s, _ in seen] == [(6, 2), (4, 6), (4, 6), (3, 8)]
    q = [int(m.sum()) for m in masks.values()]
    halves = [seen[1][1], seen[2][1]]
    assert sum(halves) == q[1] and abs(halves[0] - halves[1]) <= 1  # equal capacities: equal shares (+-1)
    assert seen[0][1] == q[0] and seen[3][1] == q[2]


def test_unsupported_layers_and_missing_scipy_refuse_before_work(monkeypatch):
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0].mean(1))

    model = Attn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="attn.in_proj_weight"):
        widetopo.prune(model, [torch.randn(2, 3, 4)], 0.5, method="npb", verbose=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        widetopo.prune(make_net(), DATA, 0.5, method="npb", verbose=False)
    monkeypatch.undo()
    sal = widetopo.saliency(make_net(), DATA, "npb")  # |theta|, the ranking of taps inside a kernel
    for name, p in make_net().named_parameters():
        if name in sal:
            torch.testing.assert_close(sal[name], p.detach().abs())
    with pytest.raises(ValueError, match="'conv1.weight' must keep .* k_max = 1 taps per kernel allow only 12"):
        widetopo.prune(make_net(), DATA, 0.5, method="npb", k_max=1, verbose=False)
    with pytest.raises(ValueError, match="alpha must be in"):
        widetopo.prune(make_net(), DATA, 0.5, method="npb", alpha=1.5)
    with pytest.raises(ValueError, match="input_term must be one of"):
        widetopo.prune(make_net(), DATA, 0.5, method="npb", input_term="dot")


def test_prunable_biases_keep_their_largest_magnitudes():
    model = make_net()
    masks = widetopo.prune(model, DATA, 0.03, method="npb", include_bias=True, verbose=False)
    params = dict(model.named_parameters())
    names = list(masks)
    keep = int(0.03 * sum(params[n].numel() for n in names) + 0.5)
    counts = [int(m.sum()) for m in masks.values()]
    assert sum(counts) == keep and counts == erk_quotas([params[n].shape for n in names], keep)
    assert 0 < counts[names.index("conv2.bias")] < 8  # a partial quota (ERK at 3 %)
    for n in ("conv2.bias", "fc.bias"):
        w = params[n].detach().abs()
        expect = torch.zeros_like(w, dtype=torch.bool)
        expect[w.argsort(descending=True, stable=True)[:int(masks[n].sum())]] = True
        assert torch.equal(masks[n], expect), n
