"""PHEW (docs/design.md §5.9): the traced unit graph against hand-drawn graphs (layers declared out
of order, concatenation, residual add, conv -> flatten -> linear, grouped and transposed convs),
a 2-layer net whose kept paths are known, the |theta| bias of the first step (chi-square, fixed
seeds), effective weights on a chain, exact K / K <= kept <= K + L - 1, the fill when walks
stall, refusals before any work, determinism from the seed."""
import logging

import pytest
import torch
from scipy import stats
from torch import nn

import widetopo
from method_checks import assert_same_state, check_seeded, check_two_processes, model_state
from scoring_nets import make_ctx
from widetopo.methods import get_method
from widetopo.scores.phew import PHEWScorer, _global_index, phew_masks, trace_unit_graph

pytestmark = [pytest.mark.needs_kernel("global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]


def ctx_of(model):
    return make_ctx(model, keep=1.0)


class Branchy(nn.Module):
    """head declared first but used last; a and b concatenated into head: parameter order
    (head, a, b) is not the data flow."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 2)
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], 1))


def test_trace_follows_concatenation_not_parameter_order():
    torch.manual_seed(0)
    model = Branchy()
    g = trace_unit_graph(ctx_of(model), torch.randn(4, 3))
    head, a, b = 0, 1, 2
    assert sorted(g.sources) == [(a, i) for i in range(3)] + [(b, i) for i in range(3)]
    assert g.sinks == [(head, 0), (head, 1)]
    assert g.feeds[a] == [[(head, o)] for o in range(4)]
    assert g.feeds[b] == [[(head, 4 + o)] for o in range(2)]
    assert g.fed_by[head] == [[(a, i)] for i in range(4)] + [[(b, i)] for i in range(2)]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.c1(x)
        return self.c3(h + torch.relu(self.c2(torch.relu(h))))


def test_trace_follows_a_residual_add():
    torch.manual_seed(1)
    g = trace_unit_graph(ctx_of(Residual()), torch.randn(4, 4))
    assert g.feeds[0] == [[(1, o), (2, o)] for o in range(4)]  # c1 feeds c2 and, through the skip, c3
    assert g.feeds[1] == [[(2, o)] for o in range(4)]
    assert g.sources == [(0, i) for i in range(4)] and g.sinks == [(2, o) for o in range(3)]


def test_trace_maps_a_flattened_channel_to_its_spatial_slots():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))  # 4x4 -> 2x2
    g = trace_unit_graph(ctx_of(model), torch.randn(4, 2, 4, 4))
    assert g.feeds[0] == [[(1, c * 4 + s) for s in range(4)] for c in range(3)]


def test_global_index_of_grouped_and_transposed_convs():
    conv = nn.Conv2d(4, 6, 2, groups=2)  # weight (6, 2, 2, 2): output o sees inputs of its group
    ix = _global_index(conv, conv.weight)
    assert ix.shape == (6, 4, 4)
    for o in range(6):
        grp = o // 3
        for i in range(4):
            for t in range(4):
                want = o * 8 + (i - 2 * grp) * 4 + t if i // 2 == grp else -1
                assert int(ix[o, i, t]) == want
    tconv = nn.ConvTranspose2d(4, 6, 2, groups=2)  # weight (4, 3, 2, 2): input i feeds outputs of its group
    ix = _global_index(tconv, tconv.weight)
    assert ix.shape == (6, 4, 4)
    for o in range(6):
        for i in range(4):
            want = i * 12 + (o - 3 * (i // 2)) * 4 if i // 2 == o // 3 else -1
            assert int(ix[o, i, 0]) == want


def two_layer_net():
    """in 2 -> hidden 3 -> out 2. Nonzero: W1[0,0], W1[1,1], W2[0,0], W2[1,2]. Forward from input 0:
    hidden 0 -> out 0; from input 1: hidden 1, whose column of W2 is 0 (stop). Backward from out 0:
    hidden 0 -> input 0; from out 1: hidden 2, whose row of W1 is 0 (stop). Kept: exactly those 4."""
    net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        net[0].weight.zero_()
        net[2].weight.zero_()
        net[0].weight[0, 0], net[0].weight[1, 1] = 1.0, 2.0
        net[2].weight[0, 0], net[2].weight[1, 2] = 1.5, 0.5
    return net


def test_hand_made_two_layer_net_keeps_the_known_paths():
    data = [torch.randn(3, 2)]
    for stop in ("exact", "walk"):
        masks = widetopo.prune(two_layer_net(), data, 4 / 12, method="phew", stop=stop, verbose=False)
        assert masks["0.weight"].nonzero().tolist() == [[0, 0], [1, 1]]
        assert masks["2.weight"].nonzero().tolist() == [[0, 0], [1, 2]]


def test_walks_that_stall_are_filled_with_the_largest_magnitudes(caplog):
    net = two_layer_net()  # only 4 weights have |theta| > 0: walks cannot reach K = 6
    with caplog.at_level(logging.WARNING, logger="widetopo.scores.phew"):
        masks = widetopo.prune(net, [torch.randn(3, 2)], 6 / 12, method="phew", verbose=False)
    assert sum(int(m.sum()) for m in masks.values()) == 6
    assert bool(masks["0.weight"][0, 0] & masks["0.weight"][1, 1] & masks["2.weight"][0, 0] & masks["2.weight"][1, 2])
    assert "added no weight" in caplog.text


def test_first_step_frequencies_follow_the_magnitudes():
    """Forward walk 0 starts at input unit 0 of the only layer and keeps (o, tap) with probability
    |W[o, 0, tap]| / sum: with keep = 1 the kept weight is that draw (one seed per draw)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.1, 0.2, 0.4, 0.8, 1.6, 0.3, 0.5, 0.9, 1.2, 0.05, 0.6, 0.7])
                          .view(3, 1, 2, 2).repeat(1, 2, 1, 1) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
    model = nn.Sequential(conv)
    ctx = ctx_of(model)
    graph = trace_unit_graph(ctx, torch.randn(2, 2, 3, 3))
    assert graph.sources[0] == (0, 0)
    w = conv.weight.detach()
    counts = torch.zeros(3, 4)
    n = 3000
    for seed in range(n):
        (m,) = phew_masks(graph, [w], [conv], 1, torch.Generator().manual_seed(seed))
        o, i, kh, kw = m.nonzero()[0].tolist()
        assert i == 0
        counts[o, kh * 2 + kw] += 1
    p = w[:, 0].abs().flatten() / w[:, 0].abs().sum()
    _, pvalue = stats.chisquare(counts.flatten().numpy(), (p * n).numpy())
    assert pvalue > 1e-3


def chain():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def effective(masks):
    """Kept weights on some input -> output path of kept weights (a chain: reachability both ways)."""
    ms = [m.double() for m in masks]
    fwd = [torch.ones(ms[0].shape[1], dtype=torch.double)]
    for m in ms:
        fwd.append((m @ fwd[-1] > 0).double())
    bwd = [torch.ones(ms[-1].shape[0], dtype=torch.double)]
    for m in reversed(ms):
        bwd.insert(0, (m.T @ bwd[0] > 0).double())
    return [m.bool() & (b[:, None] > 0) & (f[None, :] > 0) for m, f, b in zip(masks, fwd[:-1], bwd[1:])]


def test_chain_walks_keep_effective_weights():
    data = [torch.randn(3, 6)]
    n = 6 * 8 + 8 * 8 + 8 * 4
    for density in (0.1, 0.3, 0.6):
        k = round(density * n)
        walk = list(widetopo.prune(chain(), data, density, method="phew", stop="walk", verbose=False).values())
        kept = sum(int(m.sum()) for m in walk)
        assert k <= kept <= k + 2  # L = 3 layers
        assert all(torch.equal(m, e) for m, e in zip(walk, effective(walk)))  # complete paths only
        exact = list(widetopo.prune(chain(), data, density, method="phew", verbose=False).values())
        assert sum(int(m.sum()) for m in exact) == k
        assert sum(int((m & ~e).sum()) for m, e in zip(exact, effective(exact))) <= 2  # the cut last walk
    # enough walks: every input and output unit is connected
    masks = list(widetopo.prune(chain(), data, 0.6, method="phew", stop="walk", verbose=False).values())
    assert bool(masks[0].any(0).all()) and bool(masks[-1].any(1).all())


def test_later_rounds_walk_inside_the_current_mask():
    data = [torch.randn(3, 6)]
    one = widetopo.prune(chain(), data, 0.2, method="phew", verbose=False)
    two = widetopo.prune(chain(), data, 0.2, method="phew", rounds=3, verbose=False)
    assert sum(int(m.sum()) for m in two.values()) == sum(int(m.sum()) for m in one.values()) == round(0.2 * 144)


def test_seeded_and_leaves_model_and_rng_alone():
    check_seeded("phew", chain, [torch.randn(3, 6)], 0.25, seed=1, other_seed=2)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.emb(x).mean(1))


def test_unsupported_networks_are_refused_and_left_alone():
    model = WithEmbedding()
    before = model_state(model)
    with pytest.raises(ValueError, match="'emb.weight' is 'weight' of a Embedding"):
        widetopo.prune(model, [torch.randint(0, 10, (3, 5))], 0.5, method="phew",
                       names=["emb.weight", "fc.weight"], verbose=False)
    assert_same_state(before, model_state(model))
    model = Shared()
    before = model_state(model)
    with pytest.raises(ValueError, match="runs more than once in one forward"):
        widetopo.prune(model, [torch.randn(3, 4)], 0.5, method="phew", verbose=False)
    assert_same_state(before, model_state(model))


def test_registry_entry_and_options():
    m = get_method("phew")
    assert m.scorer is PHEWScorer and m.schedule.rounds == 1 and PHEWScorer.selection == "mask"
    assert m.defaults() == {"stop": "exact"} and not PHEWScorer.data_dependent
    with pytest.raises(ValueError, match="stop must be one of"):
        m.make_options(stop="never")


def test_trace_without_batched_backward_gives_the_same_graph(monkeypatch):
    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(4, 3)
    want = trace_unit_graph(ctx_of(model), x)
    real = torch.autograd.grad

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("vmap: not supported")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    assert trace_unit_graph(ctx_of(model), x) == want


def test_two_processes_give_the_masks_of_one():
    check_two_processes("phew")
