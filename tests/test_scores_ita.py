"""ITA saliency against four explicit forwards of deep-copied models with an explicit mask."""
import copy

import pytest
import torch

from references import reference_ita
from scoring_nets import MLP1 as MLP
from scoring_nets import TinyCNN, make_ctx, make_model
from widetopo.scores import Batch, ita_score
from widetopo.scores.ita import no_tf32

needs_ops = pytest.mark.needs_kernel("accumulate_score_")


def make_batch(index=3, shape=(4, 1, 8, 8), dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(index, torch.randn(shape, generator=g, dtype=dtype))


@needs_ops
@pytest.mark.parametrize("cls", [TinyCNN, MLP])
def test_ita_matches_four_explicit_forwards(cls):
    model = make_model(cls)
    ctx = make_ctx(model)
    batch = make_batch(shape=(4, 1, 8, 8) if cls is TinyCNN else (5, 10))
    got = ita_score(ctx, batch)
    ref = reference_ita(model, ctx, batch)
    for n, a, b in zip(ctx.names, got, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=n)
    assert all(float(b.sum()) > 0 for b in ref)
    for s, m in zip(got, ctx.masks):
        assert torch.all(s[~m] == 0)


@needs_ops
def test_ita_float32_close_to_float64_evaluation():
    # float32 finite differences (one concatenated batch) against a float64 evaluation with the
    # same (float32) random draws: a few percent of noise, as expected for this estimator
    model64 = make_model()
    model32 = copy.deepcopy(model64).float()
    batch = make_batch()
    got = ita_score(make_ctx(model32), Batch(batch.index, batch.x.float()))
    ref = reference_ita(model64, make_ctx(model64), batch, draw_dtype=torch.float32)
    for a, r in zip(got, ref):
        assert a.dtype == torch.float32
        assert float((a.double() - r).norm() / r.norm()) < 0.05


@needs_ops
def test_ita_two_batches_accumulate_and_eps_options():
    model = make_model()
    ctx = make_ctx(model)
    b1, b2 = make_batch(1, seed=1), make_batch(2, seed=2)
    out = ita_score(ctx, b1, eps_x=1e-3, eps_theta=2e-4)
    out = ita_score(ctx, b2, eps_x=1e-3, eps_theta=2e-4, out=out)
    ref = [a + b for a, b in zip(reference_ita(model, ctx, b1, 1e-3, 2e-4), reference_ita(model, ctx, b2, 1e-3, 2e-4))]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@needs_ops
def test_ita_without_running_stats_uses_separate_forwards():
    # BatchNorm without running statistics couples the samples of a batch; the scorer must not
    # concatenate x and x + eps dx then (the reference runs them separately).
    model = make_model(track=False)
    ctx = make_ctx(model)
    batch = make_batch()
    got = ita_score(ctx, batch)
    ref = reference_ita(model, ctx, batch)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@needs_ops
def test_ita_runs_two_forwards_and_leaves_state_unchanged():
    model = make_model()
    model.train()
    ctx = make_ctx(model)
    calls = []
    handle = model.register_forward_pre_hook(lambda mod, inp: calls.append(inp[0].shape[0]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p.clone() for n, p in ctx.params.items()}
    rng = torch.random.get_rng_state()
    try:
        ita_score(ctx, make_batch())
    finally:
        handle.remove()
    assert calls == [8, 8]  # x and x + eps dx as one batch, once per parameter set
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for n, p in ctx.params.items():
        assert torch.equal(p, params[n])


def test_no_tf32_disables_and_restores_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        with no_tf32(torch.device("cuda")):  # only flags are touched; no GPU needed
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pytest.raises(RuntimeError):
            with no_tf32("cuda"):
                raise RuntimeError("boom")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with no_tf32("cpu"):  # CPU: nothing changes
            assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_ita_rejects_bad_eps_and_integer_inputs():
    model = make_model(MLP)
    ctx = make_ctx(model)
    for bad in (0, -1e-3, float("inf"), float("nan"), "1e-3"):
        with pytest.raises(ValueError, match="eps"):
            ita_score(ctx, make_batch(shape=(2, 10)), eps=bad)
    with pytest.raises(TypeError, match="floating"):
        ita_score(ctx, Batch(0, torch.ones(2, 10, dtype=torch.long)))


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ita_of_16bit_model_is_evaluated_in_float32(dtype):
    model16 = make_model(MLP, dtype=dtype)
    model32 = copy.deepcopy(model16).float()
    batch = make_batch(shape=(5, 10), dtype=dtype)
    got = ita_score(make_ctx(model16), batch)
    ref = reference_ita(model32, make_ctx(model32), Batch(batch.index, batch.x.float()))
    for a, r in zip(got, ref):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert float((a - r).norm() / r.norm()) < 0.05
