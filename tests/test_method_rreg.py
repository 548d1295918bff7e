"""RReg (docs/design.md §5.8): the regular graphs (degrees, expansion of the random graph against
the Havel-Hakimi port's), the pair counts [E, E + r^2 - 1] with E from the ERK counts of the
erk-random method, whole kernels, the kept-count bounds by hand, one-shot refusal, determinism
from the seed with the global RNG and the caller's model untouched."""
import math

import pytest
import torch
from torch import nn

import widetopo
from method_checks import assert_same_state, check_seeded, check_two_processes, model_state
from widetopo.methods import get_method
from widetopo.scores.rreg import RRegScorer, havel_hakimi_bipartite, random_regular_bipartite, regular_pairs

pytestmark = [pytest.mark.needs_kernel("global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("v, r", [(10, 3), (16, 15), (15, 15), (9, 5), (30, 1), (7, 0)])
def test_random_graph_is_r_regular(v, r):
    for seed in range(3):
        adj = random_regular_bipartite(v, r, gen(seed))
        assert adj.shape == (v, v) and adj.dtype == torch.bool
        assert adj.sum(0).tolist() == [r] * v and adj.sum(1).tolist() == [r] * v


def test_random_graphs_differ_and_follow_the_generator():
    a, b, c = (random_regular_bipartite(40, 5, gen(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def second_singular_ratio(adj, r):
    s = torch.linalg.svdvals(adj.double())
    assert float(s[0]) == pytest.approx(r)  # a regular graph: sigma_1 = r
    return float(s[1]) / r


def test_random_graph_expands_and_the_port_does_not():
    # design.md §5.8: v = 128, r = 15: random ~0.48 (2 sqrt(14)/15 = 0.499), Havel-Hakimi ~0.98
    ratios = [second_singular_ratio(random_regular_bipartite(128, 15, gen(s)), 15) for s in range(3)]
    assert max(ratios) < 0.6
    hh = havel_hakimi_bipartite(128, 15)
    assert hh.sum(0).tolist() == [15] * 128 and hh.sum(1).tolist() == [15] * 128
    assert second_singular_ratio(hh, 15) > 0.9
    assert torch.equal(hh, havel_hakimi_bipartite(128, 15))  # deterministic


def test_one_placement_is_one_regular_block_on_random_channels():
    # E = 100, r = 15 on 40 x 50: v = max(min(100 // 15, 40), 15) = 15 -> one 15 x 15 block, 225 pairs
    pairs = regular_pairs(40, 50, 100, 15, gen(3))
    assert int(pairs.sum()) == 225
    rows, cols = pairs.any(1), pairs.any(0)
    assert int(rows.sum()) == 15 and int(cols.sum()) == 15
    assert set(pairs.sum(1)[rows].tolist()) == {15} and set(pairs.sum(0)[cols].tolist()) == {15}


@pytest.mark.parametrize("graph", ["random", "havel_hakimi"])
def test_pair_counts_lie_in_the_documented_range(graph):
    for c_out, c_in, degree in ((32, 24, 15), (12, 40, 15), (64, 64, 4), (5, 7, 15)):
        r = min(degree, c_out, c_in)
        for e in (1, r, r * r, c_out * c_in // 3, c_out * c_in - 1, c_out * c_in):
            got = int(regular_pairs(c_out, c_in, e, degree, gen(e), graph).sum())
            assert e <= got <= min(e + r * r - 1, c_out * c_in), (c_out, c_in, e, got)
    assert int(regular_pairs(8, 8, 0, 15, gen()).sum()) == 0


class Net(nn.Module):
    """Conv (16, 8, 3, 3), Conv (32, 16, 3, 3), Linear (10, 32): 1152 + 4608 + 320 = 6080 weights."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def net():
    torch.manual_seed(0)
    return Net()


DATA = [torch.randn(2, 8, 4, 4, generator=gen(1))]


@pytest.mark.parametrize("graph", ["random", "havel_hakimi"])
def test_layers_keep_whole_kernels_and_erk_pair_counts(graph):
    density = 0.15
    masks = widetopo.prune(net(), DATA, density, method="rreg", graph=graph, verbose=False)
    erk = widetopo.prune(net(), DATA, density, method="erk-random", verbose=False)  # the ERK counts q_l
    for name, m in masks.items():
        q = int(erk[name].sum())
        if m.dim() == 4:
            assert bool((m == m[:, :, :1, :1]).all())  # constant over each kernel
            pairs = m[:, :, 0, 0]
        else:
            pairs = m
        taps = m[0, 0].numel() if m.dim() == 4 else 1
        r = min(15, *pairs.shape)
        e = q // taps
        assert e <= int(pairs.sum()) <= min(e + r * r - 1, pairs.numel()), name
    assert masks.meta["method"] == "rreg" and masks.meta["graph"] == graph


def test_kept_bounds_by_hand():
    shapes = [(16, 8, 3, 3), (32, 16, 3, 3), (10, 32)]
    n = 6080
    keep = round(0.15 * n)  # 912
    # ERK by hand: p*N = 16+8+9... = (16+8+3+3) = 30, (32+16+3+3) = 54, (10+32) = 42 -> sum 126;
    # eps = 912 / 126 = 7.238; fc: 7.238 * 42 = 304 <= 320: nothing saturates.
    # counts 217.14, 390.86, 304.0 -> 217 + 390 + 304 = 911, one more to the largest remainder (c2)
    q = [217, 391, 304]
    assert RRegScorer().quotas(shapes, keep) == q
    e = [217 // 9, 391 // 9, 304]  # 24, 43, 304 pairs; r = min(15, C_out, C_in) = 8, 15, 10
    lo = e[0] * 9 + e[1] * 9 + e[2] * 1
    hi = min(e[0] + 8 * 8 - 1, 128) * 9 + min(e[1] + 15 * 15 - 1, 512) * 9 + min(e[2] + 10 * 10 - 1, 320)
    assert (lo, hi) == (907, 87 * 9 + 267 * 9 + 320)
    assert RRegScorer().kept_bounds(shapes, keep) == (lo, hi)
    masks = widetopo.prune(net(), DATA, keep / n, method="rreg", verbose=False)
    kept = sum(int(m.sum()) for m in masks.values())
    assert lo <= kept <= hi


def test_rank_one_and_dense_layers_keep_exact_counts():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    masks = widetopo.prune(model, [torch.randn(3, 6)], 0.5, method="rreg", include_bias=True, verbose=False)
    shapes = [tuple(p.shape) for p in model.parameters()]
    q = RRegScorer().quotas(shapes, round(0.5 * sum(math.prod(s) for s in shapes)))
    for (name, m), count in zip(masks.items(), q):
        if m.dim() == 1 or count == m.numel():
            assert int(m.sum()) == count, name


def test_seeded_and_leaves_model_and_rng_alone():
    check_seeded("rreg", net, DATA, 0.2, seed=4, other_seed=5)


@pytest.mark.parametrize("opts", [{"rounds": 2}, {"restorations": 1}])
def test_more_than_one_shot_is_refused_before_any_work(opts):
    model = net()
    before = model_state(model)
    with pytest.raises(ValueError, match="rreg builds its masks in one shot"):
        widetopo.prune(model, DATA, 0.2, method="rreg", verbose=False, **opts)
    assert_same_state(before, model_state(model))


def test_registry_entry_and_options():
    m = get_method("rreg")
    assert m.scorer is RRegScorer and m.schedule.rounds == 1 and RRegScorer.selection == "mask"
    assert m.defaults() == {"degree": 15, "graph": "random", "power_scale": 1.0}
    with pytest.raises(ValueError, match="graph must be one of"):
        m.make_options(graph="regular")
    with pytest.raises(ValueError, match="degree must be an integer >= 1"):
        m.make_options(degree=0)


def test_two_processes_give_the_masks_of_one():
    check_two_processes("rreg")


def test_every_placed_block_is_r_regular_on_v_distinct_channels(monkeypatch):
    import widetopo.scores.rreg as rreg

    placed, depth = [], [0]
    real_block = rreg.random_regular_bipartite

    def record_block(v, r, g):  # (r > v/2 recurses for the complement: record the outer block only)
        depth[0] += 1
        try:
            block = real_block(v, r, g)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            placed.append(block)
        return block

    monkeypatch.setattr(rreg, "random_regular_bipartite", record_block)
    pairs = regular_pairs(48, 40, 700, 15, gen(8))  # several placements: v = 40, then smaller
    assert len(placed) >= 2
    for block in placed:
        v = block.shape[0]
        assert block.shape == (v, v) and 15 <= v <= 40
        assert set(block.sum(0).tolist()) == {15} and set(block.sum(1).tolist()) == {15}
    assert 700 <= int(pairs.sum()) <= 700 + 15 * 15 - 1
