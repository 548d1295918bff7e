"""NTK-trace (Hutchinson) saliency against a double backward written out by hand."""

import pytest
import torch

from widetopo.engine.rng import make_generator
from references import reference_ntk
from scoring_nets import MLP, TinyCNN, make_ctx, make_model, masked_copy
from widetopo.scores import Batch, ntk_score
from widetopo.scores.ntk import NTK_STREAM

needs_ops = pytest.mark.needs_kernel("accumulate_score_", "masked_sq_norm")


def batches(n=2, shape=(4, 1, 8, 8), dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    return [Batch(i + 7, torch.randn(shape, generator=g, dtype=dtype)) for i in range(n)]


@needs_ops
def test_ntk_matches_hand_double_backward_cnn():
    model = make_model(TinyCNN)
    ctx = make_ctx(model)
    (batch,) = batches(1)
    got = ntk_score(ctx, batch)
    ref = reference_ntk(model, ctx, batch)
    assert len(got) == len(ctx.names)
    for n, a, b in zip(ctx.names, got, ref):
        assert a.shape == b.shape and a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=n)
    assert any(float(b.abs().sum()) > 0 for b in ref)


@needs_ops
def test_ntk_probes_summed_signed_before_abs_and_batches_accumulate():
    model = make_model(MLP)
    ctx = make_ctx(model, keep=0.6)
    bs = batches(2, shape=(6, 10))
    out = None
    for b in bs:
        out = ntk_score(ctx, b, probes=3, out=out)
    ref = [a + b for a, b in zip(reference_ntk(model, ctx, bs[0], 3), reference_ntk(model, ctx, bs[1], 3))]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@needs_ops
def test_ntk_pruned_entries_zero_and_nonprunable_gradients_counted():
    model = make_model(TinyCNN)
    ctx = make_ctx(model, keep=0.5)
    (batch,) = batches(1)
    got = ntk_score(ctx, batch)
    for s, m in zip(got, ctx.masks):
        assert torch.all(s[~m] == 0)
    # a reference that drops the non-prunable gradients from t gives a different score
    net = masked_copy(model, ctx).eval()
    pr = [dict(net.named_parameters())[n] for n in ctx.names]
    gen = make_generator(ctx.seed, ctx.round, batch.index, "cpu", NTK_STREAM)
    out = net(batch.x)
    v = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    g = torch.autograd.grad((v * out).sum(), pr, create_graph=True)
    t = sum(((gi * m) ** 2).sum() for gi, m in zip(g, ctx.masks))
    h = torch.autograd.grad(t, pr)
    only_prunable = [(hi * ctx.params[n] * m).abs() for hi, n, m in zip(h, ctx.names, ctx.masks)]
    assert not all(torch.allclose(a, b) for a, b in zip(got, only_prunable))


@needs_ops
def test_ntk_leaves_global_rng_model_and_context_unchanged():
    model = make_model(TinyCNN)
    model.train()
    ctx = make_ctx(model)
    before_params = {n: p.clone() for n, p in ctx.params.items()}
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    ntk_score(ctx, batches(1)[0])
    assert torch.equal(state, torch.random.get_rng_state())
    assert model.training and all(m.training for m in model.modules())
    for n, p in ctx.params.items():
        assert torch.equal(p, before_params[n]) and not p.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k])


def test_ntk_rejects_bad_probes():
    model = make_model(MLP)
    ctx = make_ctx(model)
    for bad in (0, -1, 1.5, True):
        try:
            ntk_score(ctx, Batch(0, torch.randn(2, 10, dtype=torch.float64)), probes=bad)
        except ValueError as e:
            assert "probes" in str(e)
        else:
            raise AssertionError(f"probes={bad!r} accepted")
