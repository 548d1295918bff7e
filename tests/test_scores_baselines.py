"""Random, Magnitude, SNIP and SynFlow scorers against straightforward implementations; random
pruning against the uniform distribution (chi-square and Kolmogorov-Smirnov tests)."""

import pytest
import scipy.stats
import torch
from torch import nn

import widetopo
from method_checks import ALPHA, uniform_keep_pvalue
from references import reference_snip, reference_synflow
from scoring_nets import MLP, TinyCNN, make_ctx, make_model, masked_copy
from widetopo.scores import Batch, MagnitudeScorer, RandomScorer, SNIPScorer, SynFlowScorer
from widetopo.scores.baselines import synflow_scores

needs_acc = pytest.mark.needs_kernel("accumulate_score_")


def labelled_batches(n=2, shape=(4, 1, 8, 8), classes=5):
    g = torch.Generator().manual_seed(23)
    return [Batch(i, torch.randn(shape, generator=g, dtype=torch.float64),
                  torch.randint(0, classes, (shape[0],), generator=g)) for i in range(n)]


# --------------------------------------------------------------------------------- magnitude
@needs_acc
def test_magnitude_is_abs_of_masked_weights():
    model = make_model(TinyCNN, dtype=torch.float32)
    ctx = make_ctx(model)
    s = MagnitudeScorer()
    assert not s.data_dependent and not s.decay and not s.needs_targets
    out = s.score(ctx, [])
    for n, o, m in zip(ctx.names, out, ctx.masks):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o, (dict(model.named_parameters())[n].detach() * m).abs(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ random
@needs_acc
@pytest.mark.parametrize("distribution", ["uniform", "normal"])
def test_random_scores_depend_on_seed_and_round_only(distribution):
    model = make_model(MLP, dtype=torch.float32)
    ctx = make_ctx(model, seed=5, round_index=9)
    rng = torch.random.get_rng_state()
    out = RandomScorer(distribution).score(ctx, [])
    assert torch.equal(rng, torch.random.get_rng_state())
    for o, m in zip(out, ctx.masks):
        assert torch.all(o[m] > 0) and torch.all(o[~m] == 0)
        if distribution == "uniform":
            assert float(o.max()) <= 1.0
    again = RandomScorer(distribution).score(make_ctx(model, seed=5, round_index=9), [])
    other_round = RandomScorer(distribution).score(make_ctx(model, seed=5, round_index=10), [])
    other_seed = RandomScorer(distribution).score(make_ctx(model, seed=6, round_index=9), [])
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    assert not any(torch.equal(a, b) for a, b in zip(out, other_round))
    assert not any(torch.equal(a, b) for a, b in zip(out, other_seed))
    assert not RandomScorer().data_dependent


@needs_acc
def test_random_score_values_follow_the_chosen_distribution():
    """The scores of the kept weights, pooled over 10 rounds: U(0, 1] for "uniform", |z| with
    z ~ N(0, 1) (half-normal) for "normal" (Kolmogorov-Smirnov at ALPHA); each sample fails the
    other distribution's test, so the option is not ignored."""
    model = make_model(MLP, dtype=torch.float32)
    ctxs = [make_ctx(model, seed=5, round_index=r) for r in range(10)]
    values = {}
    for distribution in ("uniform", "normal"):
        values[distribution] = torch.cat([o[m].double() for ctx in ctxs
                                          for o, m in zip(RandomScorer(distribution).score(ctx, []), ctx.masks)])
    assert values["uniform"].numel() > 2000
    assert scipy.stats.kstest(values["uniform"].numpy(), "uniform").pvalue > ALPHA
    assert scipy.stats.kstest(values["normal"].numpy(), "halfnorm").pvalue > ALPHA
    assert scipy.stats.kstest(values["uniform"].numpy(), "halfnorm").pvalue < ALPHA
    assert scipy.stats.kstest(values["normal"].numpy(), "uniform").pvalue < ALPHA


class _FirstLayerHeavy(RandomScorer):
    """Deliberately biased: the first tensor's draws scaled by 1.1 (at density 0.25 its weights
    are kept with probability 0.29 instead of 0.25, the others' with 0.22)."""

    def score(self, ctx, batches=()):
        out = super().score(ctx, batches)
        out[0] = out[0] * 1.1
        return out


class _SeedBlind(RandomScorer):
    """Deliberately biased: draws that ignore the seed (the same subset for every seed)."""

    def score(self, ctx, batches=()):
        gen = torch.Generator().manual_seed(ctx.round)
        return [(1 - torch.rand(p.shape, generator=gen)) * m for p, m in zip(ctx.prunable, ctx.masks)]


def _random_runs(method, seeds=range(500), **options):
    """Masks of MLP (10-16-12-3, 388 prunable weights) pruned to density 0.25 once per seed."""
    model = make_model(MLP, dtype=torch.float32)
    data = [torch.zeros(2, 10)]
    return [widetopo.prune(model, data, 0.25, method=method, seed=s, verbose=False, **options) for s in seeds]


@pytest.mark.needs_kernel("accumulate_score_", "global_threshold", "apply_masks_", "mask_stats")
@pytest.mark.parametrize("distribution", ["uniform", "normal"])
def test_random_pruning_keeps_every_weight_equally_often(distribution):
    """Over 500 seeds each weight is kept equally often (chi-square of the keep counts): the
    97 kept weights are a uniformly random subset of the 388, across layers."""
    runs = _random_runs("random", distribution=distribution)
    assert uniform_keep_pvalue(runs, [list(runs[0])]) > ALPHA


@pytest.mark.needs_kernel("accumulate_score_", "global_threshold", "apply_masks_", "mask_stats")
@pytest.mark.parametrize("biased", [_FirstLayerHeavy, _SeedBlind])
def test_the_keep_frequency_check_fails_a_biased_sampler(biased):
    runs = _random_runs(biased())
    assert uniform_keep_pvalue(runs, [list(runs[0])]) < ALPHA


def test_random_rejects_unknown_distribution():
    with pytest.raises(ValueError, match="distribution"):
        RandomScorer("cauchy")


# -------------------------------------------------------------------------------------- SNIP
@needs_acc
@pytest.mark.parametrize("bn", ["train", "eval"])
def test_snip_matches_hand_autograd(bn):
    model = make_model(TinyCNN)
    model.train()
    ctx = make_ctx(model)
    buffers = {n: b.clone() for n, b in ctx.buffers.items()}
    bs = labelled_batches()
    scorer = SNIPScorer() if bn == "train" else SNIPScorer(batchnorm="eval")
    assert scorer.needs_targets and scorer.data_dependent and not scorer.decay
    rng = torch.random.get_rng_state()
    signed = scorer.score(ctx, bs)
    assert any(bool((s < 0).any()) for s in signed)  # the sum is signed until finalize
    got = scorer.finalize(ctx, signed)
    assert torch.equal(rng, torch.random.get_rng_state())
    ref = reference_snip(model, ctx, bs, bn_train=bn == "train")
    for n, a, r in zip(ctx.names, got, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12, msg=n)
    # the test data tells the conventions apart: per-batch absolute values, or the other
    # BatchNorm mode, would not match
    other = reference_snip(model, ctx, bs, per_batch_abs=True, bn_train=bn == "train")
    assert not all(torch.allclose(a, r) for a, r in zip(got, other))
    other_mode = reference_snip(model, ctx, bs, bn_train=bn != "train")
    assert not all(torch.allclose(a, r) for a, r in zip(got, other_mode))
    if bn == "eval":  # (train mode may write the engine's private copies, ctx.buffers)
        assert all(torch.equal(buffers[n], ctx.buffers[n]) for n in buffers)
    assert all(m.training for m in model.modules())


@needs_acc
def test_snip_with_batchnorm_calibration():
    from scoring_nets import calibrated_buffers

    model = make_model(TinyCNN)
    ctx = make_ctx(model)
    bs = labelled_batches()
    scorer = SNIPScorer(batchnorm="eval", calibrate_bn=True)
    got = scorer.finalize(ctx, scorer.score(ctx, bs))
    ref = reference_snip(model, ctx, bs, [calibrated_buffers(model, ctx, b.x) for b in bs])
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_snip_calibration_needs_eval_mode():
    with pytest.raises(ValueError, match="calibrate_bn=True needs batchnorm='eval'"):
        SNIPScorer(calibrate_bn=True)


def test_snip_requires_targets():
    model = make_model(MLP)
    ctx = make_ctx(model)
    with pytest.raises(ValueError, match="targets.*batch 4"):
        SNIPScorer().score(ctx, [Batch(4, torch.randn(2, 10, dtype=torch.float64))])


# ----------------------------------------------------------------------------------- SynFlow
def _normalised(scores):
    peak = max(float(s.max()) for s in scores)
    return [s / peak for s in scores]


@needs_acc
def test_synflow_matches_float64_reference():
    model = make_model(TinyCNN, dtype=torch.float32)
    ctx = make_ctx(model)
    scorer = SynFlowScorer()
    assert not scorer.data_dependent and not scorer.needs_targets
    batch = Batch(0, torch.randn(4, 1, 8, 8))
    rng = torch.random.get_rng_state()
    got = scorer.score(ctx, [batch])
    assert torch.equal(rng, torch.random.get_rng_state())
    assert not scorer.diagnostics["rescaled"]
    ref, _ = reference_synflow(model, ctx, (1, 8, 8))
    for n, a, r, m in zip(ctx.names, got, _normalised(ref), ctx.masks):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-14, msg=n)
        assert torch.all(a[~m] == 0)
    # input_shape option instead of a batch
    again = SynFlowScorer(input_shape=(1, 8, 8)).score(ctx, [])
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    with pytest.raises(ValueError, match="input_shape"):
        SynFlowScorer().score(ctx, [])


def deep_net(depth, width=64, bn=True, bias=True, std=None):
    """A plain chain of Linear (+ BatchNorm1d) + ReLU layers; std sets N(0, std^2) weights."""
    torch.manual_seed(1)
    layers = [nn.Linear(8, width, bias=bias)]
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=bias)] + ([nn.BatchNorm1d(width)] if bn else []) + [nn.ReLU()]
    layers.append(nn.Linear(width, 3, bias=bias))
    net = nn.Sequential(*layers)
    if std is not None:
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, std)
    return net


@needs_acc
@pytest.mark.parametrize("bn", [True, False])
def test_synflow_deep_net_does_not_overflow(bn):
    # |w| * width ~ 100 per layer: the float64 R (~100^160) overflows, float32 much earlier
    model = deep_net(160, bn=bn, std=2.0)
    ctx = make_ctx(model, keep=0.9)
    net = masked_copy(model, ctx).double().eval()
    with torch.no_grad():
        for v in net.state_dict().values():
            if v.is_floating_point():
                v.abs_()
        r = net(torch.ones(1, 8, dtype=torch.float64)).sum()
    assert not torch.isfinite(r)  # the exact float64 computation overflows on this net
    scorer = SynFlowScorer(input_shape=(8,))
    got = scorer.score(ctx, [])
    assert scorer.diagnostics["rescaled"]
    for s, m in zip(got, ctx.masks):
        assert torch.isfinite(s).all()
        assert torch.all(s[~m] == 0)
    assert float(got[0][ctx.masks[0]].min()) > 0  # the first layer still gets a signal
    assert float(got[-1][ctx.masks[-1]].min()) > 0


@needs_acc
def test_synflow_rescaling_is_exact_for_bias_free_chain():
    model = deep_net(40, bn=True, bias=False)
    ctx = make_ctx(model, keep=0.8)
    exact, r = synflow_scores(ctx, (8,), rescale=False)
    scaled, r2 = synflow_scores(ctx, (8,), rescale=True)
    assert torch.isfinite(r) and float(r) > 1e15 and float(r2) < float(r)  # rescaling did act
    for a, b in zip(_normalised(exact), _normalised(scaled)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)
