"""ERK allocations (docs/design.md §5.6): per-layer counts against a hand computation with saturated
layers, exact totals, the choice inside a layer (a uniformly random subset: chi-square of the keep
counts over many seeds; |theta| keeping large negative weights), and the run-level properties of
every method."""
import pytest
import torch
from torch import nn

import widetopo
from method_checks import ALPHA, check_resume, check_run_properties, uniform_keep_pvalue
from widetopo.scores.base import ScoreContext
from widetopo.scores.erk import ERKMagnitudeScorer, ERKRandomScorer, erk_quotas

pytestmark = [pytest.mark.needs_kernel("accumulate_score_", "global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]


class FourLayers(nn.Module):
    """Weights of shapes (8, 3), (16, 8, 3, 3), (4, 16), (10, 16) - 1400 prunable entries -
    plus biases and a BatchNorm, which must not count in the budget."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 8)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc2 = nn.Linear(16, 4)
        self.fc3 = nn.Linear(16, 10)

    def forward(self, x):  # x: [N, 3]
        h = torch.relu(self.fc1(x))[:, :, None, None].expand(-1, -1, 3, 3)
        h = torch.relu(self.bn(self.conv(h))).mean((2, 3))
        return torch.cat([self.fc2(h), self.fc3(h)], 1)


SHAPES = [(8, 3), (16, 8, 3, 3), (4, 16), (10, 16)]

# By hand, K = 400 of 1400: p = (sum of dims)/(product) = 11/24, 30/1152, 20/64, 26/160, so
# p*N = 11, 30, 20, 26.  eps = 400/87 = 4.598: eps*p(fc1) = 2.11 >= 1 -> fc1 dense (24).
# eps = (400-24)/76 = 4.947: eps*p(fc2) = 1.55 >= 1 -> fc2 dense (64).
# eps = (400-24-64)/56 = 5.571: eps*p(fc3) = 0.905, eps*p(conv) = 0.145 -> stop.
# conv: 5.571*30 = 167.14, fc3: 5.571*26 = 144.86 -> 167 + 144 + 88 = 399, one left for the
# largest remainder (fc3) -> [24, 167, 64, 145].
HAND_400 = [24, 167, 64, 145]


def ctx_of(model, masks=None):
    names = [n for n, p in model.named_parameters() if p.dim() > 1]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = masks or [torch.ones(params[n].shape, dtype=torch.bool) for n in names]
    for n, m in zip(names, masks):
        params[n] = params[n] * m
    return ScoreContext(model=model, names=names, params=params, buffers={}, masks=masks, round=1, seed=3)


def test_counts_match_the_hand_computation_with_saturated_layers():
    assert erk_quotas(SHAPES, 400) == HAND_400
    model = FourLayers()
    for scorer in (ERKRandomScorer(), ERKMagnitudeScorer()):
        assert scorer.layer_quotas(ctx_of(model), 400) == HAND_400  # biases and BN not counted


def test_power_scale_is_the_exponent_of_the_ratio():
    # power_scale 0: p = 1 everywhere, counts proportional to the sizes: 0.25 * (24, 1152, 64, 160)
    assert erk_quotas(SHAPES, 350, power_scale=0.0) == [6, 288, 16, 40]
    # power_scale 2 by hand: p^2 * N = 5.0417, 0.78125, 6.25, 4.225 (sum 16.298); eps = 100/16.298 = 6.136:
    # eps * p^2(fc1) = 0.2101 * 6.136 = 1.29 >= 1 -> fc1 dense (24); eps = 76/11.256 = 6.752: the
    # largest of the rest, eps * p^2(fc2) = 0.0977 * 6.752 = 0.66 < 1 -> stop. conv 0.78125 * 6.752 = 5.27,
    # fc2 6.25 * 6.752 = 42.20, fc3 4.225 * 6.752 = 28.53 -> 5 + 42 + 28 + 24 = 99, one more to fc3
    assert erk_quotas(SHAPES, 100, power_scale=2.0) == [24, 5, 42, 29]


@pytest.mark.parametrize("shapes", [SHAPES, [(3, 5, 7), (6,), (2, 2, 2, 2, 2), (9, 9)], [(1, 1)]])
def test_total_is_exactly_k_for_every_budget(shapes):
    sizes = [int(torch.tensor(s).prod()) for s in shapes]
    for keep in range(0, sum(sizes) + 1, max(1, sum(sizes) // 97)):
        counts = erk_quotas(shapes, keep)
        assert sum(counts) == keep
        assert all(0 <= c <= n for c, n in zip(counts, sizes))
    assert erk_quotas(shapes, sum(sizes)) == sizes


def test_quotas_are_capped_by_what_a_layer_still_keeps():
    model = FourLayers()
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(s, generator=g) < 0.5 for s in SHAPES]
    masks[0][:] = False
    masks[0][0, :2] = True  # fc1 keeps 2 of 24
    caps = [int(m.sum()) for m in masks]
    counts = ERKRandomScorer().layer_quotas(ctx_of(model, masks), 300)
    assert sum(counts) == 300 and counts[0] == 2 and all(c <= k for c, k in zip(counts, caps))
    with pytest.raises(ValueError, match="keep must be an integer in"):
        erk_quotas(SHAPES, sum(caps) + 1, caps=caps)


def test_random_erk_scores_depend_on_seed_and_round_only():
    model = FourLayers()
    ctx = ctx_of(model)
    rng = torch.random.get_rng_state()
    out = ERKRandomScorer().score(ctx, [])
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(bool(((o > 0) & (o <= 1)).all()) for o in out)
    again = ERKRandomScorer().score(ctx_of(model), [])
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    other = ctx_of(model)
    other.round = 2
    assert not any(torch.equal(a, b) for a, b in zip(out, ERKRandomScorer().score(other, [])))


class _FirstRowsHeavy(ERKRandomScorer):
    """Deliberately biased: inside every layer the draws of the first half of the output units
    are scaled by 1.1 (in the conv layer, at its 14.5 % quota, they are kept with probability
    0.186 instead of 0.145, the other half with 0.104)."""

    def score(self, ctx, batches=()):
        out = super().score(ctx, batches)
        for o in out:
            o[: o.shape[0] // 2] *= 1.1
        return out


def _erk_runs(method, seeds=range(300)):
    model = FourLayers()
    data = [torch.randn(4, 3, generator=torch.Generator().manual_seed(0))]
    return [widetopo.prune(model, data, 400 / 1400, method=method, seed=s, verbose=False) for s in seeds]


def test_random_erk_keeps_a_uniform_subset_of_each_layer():
    """Over 300 seeds every weight of a layer is kept equally often (chi-square of the keep
    counts per layer, the ERK quota fixed per layer; fc1 and fc2 are kept whole)."""
    runs = _erk_runs("erk-random")
    assert [[int(m.sum()) for m in run.values()] for run in runs[:2]] == [HAND_400] * 2
    assert uniform_keep_pvalue(runs, [[name] for name in runs[0]]) > ALPHA


def test_the_per_layer_keep_frequency_check_fails_a_biased_sampler():
    runs = _erk_runs(_FirstRowsHeavy())
    assert [int(m.sum()) for m in runs[0].values()] == HAND_400
    assert uniform_keep_pvalue(runs, [[name] for name in runs[0]]) < ALPHA


def test_magnitude_erk_keeps_large_negative_weights():
    torch.manual_seed(0)
    model = FourLayers()
    with torch.no_grad():
        model.conv.weight.uniform_(-0.01, 0.01)
        model.conv.weight.view(-1)[:100] = -1.0 - torch.arange(100) / 100  # the 100 largest |theta|, all negative
    masks = widetopo.prune(model, [torch.randn(4, 3)], 400 / 1400, method="erk-magnitude", verbose=False)
    assert [int(m.sum()) for m in masks.values()] == HAND_400  # exactly the quota, none lost per layer
    conv = masks["conv.weight"].view(-1)
    assert bool(conv[:100].all())  # every large negative weight kept
    w = model.conv.weight.detach().abs().view(-1)
    assert float(w[conv].min()) >= float(w[~conv].max())  # the kept ones are the largest |theta|


def test_random_erk_end_to_end_counts():
    masks = widetopo.prune(FourLayers(), [torch.randn(4, 3)], 400 / 1400, method="rand_erk", verbose=False)
    assert [int(m.sum()) for m in masks.values()] == HAND_400
    assert masks.meta["method"] == "erk-random"


def test_registry_and_options():
    from widetopo.methods import get_method

    for name, alias, cls in (("erk-random", "rand_erk", ERKRandomScorer), ("erk-magnitude", "magnitude_erk",
                                                                           ERKMagnitudeScorer)):
        m = get_method(alias)
        assert m.name == name and m.scorer is cls and m.schedule.rounds == 1
        assert cls.selection == "layerwise" and not cls.data_dependent and not cls.decay
        assert m.defaults()["power_scale"] == 1.0
        with pytest.raises(ValueError, match=r"power_scale must be in \[0, 10\]"):
            m.make_options(power_scale=-1.0)


# ------------------------------------------------------------------------- run properties
def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


DATA = [torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1)) for _ in range(2)]


@pytest.mark.parametrize("method", ["erk-random", "erk-magnitude"])
def test_run_properties(method):
    masks = check_run_properties(method, small_model, DATA, 0.2)
    # shapes (4, 2, 3, 3) and (3, 64), K = round(0.2 * 264) = 53: p*N = 12, 67; eps = 53/79 = 0.671,
    # counts 8.05 and 44.95 -> 8 + 44 = 52, one more to the larger remainder (the linear layer)
    assert [int(m.sum()) for m in masks.values()] == [8, 45]


@pytest.mark.parametrize("method", ["erk-random", "erk-magnitude"])
def test_resume_after_kill(tmp_path, monkeypatch, method):
    check_resume(tmp_path, monkeypatch, method, small_model, DATA, 0.1, 1, rounds=3)
