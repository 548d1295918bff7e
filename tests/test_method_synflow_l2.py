"""SynFlow-L2 (docs/design.md §5.5) against its closed form on a linear two-layer net, a straightforward
float64 deep-copy reference, and the run-level properties of every method."""
import pytest
import torch
from torch import nn

from method_checks import check_resume, check_run_properties
from references import reference_synflow_l2, synflow_l2_closed_form
from scoring_nets import TinyCNN, make_ctx, make_model
from widetopo.scores.base import Batch, ScoreContext
from widetopo.scores.baselines import synflow_scores
from widetopo.scores.synflow_l2 import SynFlowL2Scorer

pytestmark = [pytest.mark.needs_kernel("accumulate_score_", "global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]


def linear_ctx(n_in=4, hidden=6, n_out=3, keep=0.7):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_in, hidden, bias=False), nn.Linear(hidden, n_out, bias=False)).double()
    g = torch.Generator().manual_seed(1)
    names = ["0.weight", "1.weight"]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = [torch.rand(params[n].shape, generator=g) < keep for n in names]
    for n, m in zip(names, masks):
        params[n] = params[n] * m
    return model, ScoreContext(model=model, names=names, params=params, buffers={}, masks=masks)


def normalised(scores):
    peak = max(float(s.max()) for s in scores)
    return [s / peak for s in scores]


@pytest.mark.parametrize("form,q", [("abs", 1), ("square", 2)])
def test_linear_two_layer_closed_form(form, q):
    model, ctx = linear_ctx()
    W1, W2 = ctx.params["0.weight"], ctx.params["1.weight"]
    R1, R2 = synflow_l2_closed_form(W1, W2, q)
    raw, _ = synflow_scores(ctx, (4,), power=2, multiplier_power=q)
    torch.testing.assert_close(raw[0], R1, rtol=1e-12, atol=0)
    torch.testing.assert_close(raw[1], R2, rtol=1e-12, atol=0)
    got = SynFlowL2Scorer(input_shape=(4,), score_form=form).score(ctx, [])
    for a, r, m in zip(got, normalised([R1, R2]), ctx.masks):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=0)
        assert torch.all(a[~m] == 0)


def test_the_two_forms_rank_differently():
    _, ctx = linear_ctx(hidden=8)
    a = torch.cat([s.flatten() for s in SynFlowL2Scorer(input_shape=(4,)).score(ctx, [])])
    b = torch.cat([s.flatten() for s in SynFlowL2Scorer(input_shape=(4,), score_form="square").score(ctx, [])])
    assert not torch.equal(a.argsort(), b.argsort())


@pytest.mark.parametrize("form,q", [("abs", 1), ("square", 2)])
def test_cnn_with_batchnorm_matches_reference(form, q):
    model = make_model(TinyCNN, dtype=torch.float32)
    model.train()
    ctx = make_ctx(model)
    batch = Batch(0, torch.randn(2, 1, 8, 8))
    rng = torch.random.get_rng_state()
    scorer = SynFlowL2Scorer(score_form=form)
    got = scorer.score(ctx, [batch])
    assert torch.equal(rng, torch.random.get_rng_state())
    assert not scorer.diagnostics["rescaled"] and all(m.training for m in model.modules())
    ref = normalised(reference_synflow_l2(model, ctx, (1, 8, 8), q))
    for n, a, r, m in zip(ctx.names, got, ref, ctx.masks):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-14, msg=n)
        assert torch.all(a[~m] == 0) and float(a[m].max()) > 0


def test_deep_net_is_rescaled_instead_of_overflowing():
    torch.manual_seed(1)
    layers = [nn.Linear(8, 32, bias=False)]
    for _ in range(160):
        layers += [nn.Linear(32, 32, bias=False), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(32, 3, bias=False))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.uniform_(1.5, 2.5)  # theta^2 * kept fan-in ~ 117 per layer: 117^160 overflows float64
    ctx = make_ctx(model, keep=0.9)
    scores, r = synflow_scores(ctx, (8,), power=2, multiplier_power=1)
    assert scores is None and not torch.isfinite(r)
    scorer = SynFlowL2Scorer(input_shape=(8,))
    got = scorer.score(ctx, [])
    assert scorer.diagnostics["rescaled"]
    for s, m in zip(got, ctx.masks):
        assert torch.isfinite(s).all() and float(s[m].min()) > 0 and torch.all(s[~m] == 0)


def test_options_and_registry():
    from widetopo.methods import get_method

    m = get_method("synflow_l2")
    assert m.name == "synflow-l2" and m.schedule.rounds == 100 and m.scorer is SynFlowL2Scorer
    assert m.defaults() == {"input_shape": None, "score_form": "abs"}
    assert not SynFlowL2Scorer.data_dependent
    with pytest.raises(ValueError, match="score_form must be one of 'abs', 'square'"):
        m.make_options(score_form="cube")
    with pytest.raises(ValueError, match="input_shape"):
        SynFlowL2Scorer().score(make_ctx(make_model(TinyCNN)), [])


# ------------------------------------------------------------------------- run properties
def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


DATA = [torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1)) for _ in range(2)]


def test_run_properties():
    masks = check_run_properties("synflow-l2", small_model, DATA, 0.1, rounds=3, seed=1, score_form="square")
    assert masks.meta["method"] == "synflow-l2"


def test_resume_after_kill(tmp_path, monkeypatch):
    check_resume(tmp_path, monkeypatch, "synflow_l2", small_model, DATA, 0.1, 2, rounds=3)
