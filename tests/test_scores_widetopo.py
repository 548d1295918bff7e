"""WideTopoScorer (mu1 * S_ntk + mu2 * S_ita with per-batch BN calibration), the factory,
determinism and error handling. The references are the hand-written NTK / ITA ones of tests/references.py."""
import copy

import pytest
import torch

from references import reference_ita, reference_ntk
from scoring_nets import MLP, TinyCNN, calibrated_buffers, make_ctx, make_model
from widetopo.methods import method_names
from widetopo.scores import (Batch, MagnitudeScorer, RandomScorer, SNIPScorer,
                             SynFlowScorer, WideTopoScorer, make_scorer, scorer_options)

needs_ops = pytest.mark.needs_kernel("accumulate_score_", "masked_sq_norm")


def batches(n=2, shape=(4, 1, 8, 8)):
    g = torch.Generator().manual_seed(17)
    return [Batch(10 + i, torch.randn(shape, generator=g, dtype=torch.float64)) for i in range(n)]


def fresh_ctx(model, **kw):
    return make_ctx(model, **kw)


@needs_ops
def test_widetopo_equals_mu1_ntk_plus_mu2_ita_with_calibration():
    model = make_model(TinyCNN)
    ctx = fresh_ctx(model)
    bs = batches(2)
    mu1, mu2, probes = 0.3, 0.7, 2
    got = WideTopoScorer(mu1=mu1, mu2=mu2, probes=probes).score(ctx, bs)
    ref = [torch.zeros_like(ctx.params[n]) for n in ctx.names]
    for b in bs:
        cb = copy.copy(ctx)
        cb.buffers = calibrated_buffers(model, ctx, b.x)
        ntk = reference_ntk(model, cb, b, probes)
        ita = reference_ita(model, cb, b)
        ref = [r + mu1 * u + mu2 * v for r, u, v in zip(ref, ntk, ita)]
    for n, a, r in zip(ctx.names, got, ref):
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-9, msg=n)
    # both terms matter for the ranking test above to be meaningful
    assert all(float(t.sum()) > 0 for t in ntk) and all(float(t.sum()) > 0 for t in ita)


@needs_ops
def test_widetopo_defaults_and_forward_count():
    model = make_model(TinyCNN)
    ctx = fresh_ctx(model)
    scorer = make_scorer("widetopo")
    assert isinstance(scorer, WideTopoScorer)
    assert (scorer.mu1, scorer.mu2, scorer.eps, scorer.probes) == (0.01, 1.0, 5e-4, 1)
    assert scorer.decay and scorer.data_dependent and not scorer.needs_targets
    calls = []
    handle = model.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    try:
        scorer.score(ctx, batches(2))
    finally:
        handle.remove()
    # per batch: calibration (4), NTK (4), ITA source and target on x ++ x+eps dx (8, 8)
    assert calls == [4, 4, 8, 8] * 2


@needs_ops
def test_widetopo_deterministic_per_seed_and_round_and_leaves_state_alone():
    model = make_model(MLP)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bs = batches(2, shape=(6, 10))
    scorer = WideTopoScorer()
    rng = torch.random.get_rng_state()
    a = scorer.score(fresh_ctx(model, seed=1, round_index=3), bs)
    b = scorer.score(fresh_ctx(model, seed=1, round_index=3), bs)
    c = scorer.score(fresh_ctx(model, seed=1, round_index=4), bs)
    d = scorer.score(fresh_ctx(model, seed=2, round_index=3), bs)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not all(torch.equal(x, y) for x, y in zip(a, d))
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@needs_ops
def test_widetopo_non_finite_scores_name_layer_and_round():
    model = make_model(MLP)
    ctx = fresh_ctx(model, round_index=7)
    x = torch.randn(4, 10, dtype=torch.float64)
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'layers\.0\.weight'.*round 7"):
        WideTopoScorer().score(ctx, [Batch(0, x)])


def test_widetopo_no_batches_gives_zeros():
    model = make_model(MLP)
    ctx = fresh_ctx(model)
    out = WideTopoScorer().score(ctx, [])
    assert [o.shape for o in out] == [ctx.params[n].shape for n in ctx.names]
    assert all(float(o.abs().sum()) == 0 for o in out)


def test_factory_methods_options_and_errors():
    assert {"widetopo", "widetopo-s", "random", "magnitude", "snip", "synflow"} <= set(method_names())
    s = make_scorer("widetopo-s", mu1=0.5, probes=3)
    assert isinstance(s, WideTopoScorer) and s.mu1 == 0.5 and s.probes == 3 and s.name == "widetopo-s"
    assert type(make_scorer("random")) is RandomScorer
    assert type(make_scorer("magnitude")) is MagnitudeScorer
    assert type(make_scorer("snip")) is SNIPScorer
    assert type(make_scorer("synflow")) is SynFlowScorer
    assert make_scorer("random", distribution="normal").distribution == "normal"
    assert set(scorer_options("widetopo")) == {"mu1", "mu2", "eps", "probes", "ita_batched"}
    with pytest.raises(ValueError, match="unknown method 'no-such-method'"):
        make_scorer("no-such-method")
    with pytest.raises(ValueError, match="mu3"):
        make_scorer("widetopo", mu3=1.0)
    with pytest.raises(ValueError, match="eps"):
        make_scorer("magnitude", eps=1.0)
    for bad in ({"mu1": -1.0}, {"mu2": float("nan")}, {"eps": 0.0}, {"probes": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_scorer("widetopo", **bad)


def test_factory_rejects_non_string_method():
    with pytest.raises(TypeError, match="method must be a method name"):
        make_scorer(["widetopo"])
