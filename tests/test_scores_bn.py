"""BatchNorm calibration against a deep copy run in train mode with momentum 1."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from references import reference_eval_batchnorm
from scoring_nets import calibrated_copy
from scoring_nets import make_ctx as _make_ctx
from widetopo.scores import calibrate_batchnorm
from widetopo.scores.bn import affine_batchnorm, eval_mode


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6, momentum=None)  # cumulative average by default
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = self.drop(F.relu(self.bn1(self.conv1(x))))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


def make_ctx(model, keep=0.7):
    return _make_ctx(model, keep=keep, seed=0, round_index=0, mask_seed=3)


def make_model():
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():  # stale statistics that calibration must overwrite
        for m in (model.bn1, model.bn2):
            m.running_mean.uniform_(-3, 3)
            m.running_var.uniform_(5, 9)
            m.num_batches_tracked.fill_(17)
    return model


def x_batch(seed=1):
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_calibration_matches_train_mode_copy_with_momentum_one():
    model = make_model()
    ctx = make_ctx(model)
    x = x_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = calibrate_batchnorm(ctx, x)
    assert n == 2
    ref = calibrated_copy(model, ctx, x)
    for k, v in ref.named_buffers():
        torch.testing.assert_close(ctx.buffers[k], v, rtol=1e-6, atol=1e-7, msg=k)
    # by hand for the first layer: batch mean and unbiased variance of conv1's output
    h = F.conv2d(x, ctx.params["conv1.weight"], ctx.params["conv1.bias"], padding=1)
    torch.testing.assert_close(ctx.buffers["bn1.running_mean"], h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ctx.buffers["bn1.running_var"], h.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-6)
    assert int(ctx.buffers["bn1.num_batches_tracked"]) == 1
    # eval-mode outputs with the calibrated buffers equal the reference copy's
    with eval_mode(model):
        out = ctx.forward(ctx.params, x)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)
    # the caller's model is untouched: buffers, flags, momenta
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and all(m.training for m in model.modules())
    assert model.bn1.momentum == 0.1 and model.bn2.momentum is None


def test_calibration_draws_nothing_from_global_rng_and_repeats_exactly():
    model = make_model()
    ctx = make_ctx(model)
    state = torch.random.get_rng_state()
    calibrate_batchnorm(ctx, x_batch())
    first = {k: v.clone() for k, v in ctx.buffers.items()}
    calibrate_batchnorm(ctx, x_batch(2))
    calibrate_batchnorm(ctx, x_batch())  # the previous batch leaves no trace
    assert torch.equal(state, torch.random.get_rng_state())  # dropout stayed in eval mode
    for k, v in first.items():
        assert torch.equal(ctx.buffers[k], v), k


def test_calibration_restores_attributes_on_error():
    model = make_model()
    model.eval()
    ctx = make_ctx(model)
    with pytest.raises(RuntimeError):
        calibrate_batchnorm(ctx, torch.randn(4, 3, 8, 8))  # wrong channel count
    assert not any(m.training for m in model.modules())
    assert model.bn1.momentum == 0.1 and model.bn2.momentum is None


def test_calibration_without_batchnorm_is_a_no_op():
    model = nn.Sequential(nn.Linear(4, 3))
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    ctx = make_ctx(model)
    assert calibrate_batchnorm(ctx, torch.randn(2, 4)) == 0
    assert calls == []


def test_calibration_names_missing_buffer():
    model = make_model()
    ctx = make_ctx(model)
    del ctx.buffers["bn2.running_var"]
    with pytest.raises(KeyError, match="bn2.running_var"):
        calibrate_batchnorm(ctx, x_batch())


def test_syncbatchnorm_calibrates_with_local_statistics(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.SyncBatchNorm(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    ctx = make_ctx(model)

    def no_sync(self, x):  # stands in for the cross-process path
        raise AssertionError("SyncBatchNorm.forward must not run during calibration")

    monkeypatch.setattr(nn.SyncBatchNorm, "forward", no_sync)
    x = x_batch()
    assert calibrate_batchnorm(ctx, x) == 1
    h = F.conv2d(x, ctx.params["0.weight"], ctx.params["0.bias"])
    torch.testing.assert_close(ctx.buffers["1.running_mean"], h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ctx.buffers["1.running_var"], h.var((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(model[1])  # the class's forward is back in charge
    with pytest.raises(AssertionError, match="must not run"):
        model[1](h)


# --------------------------------------------------------------------------- affine_batchnorm
def _stats_bn(cls, channels, affine=True):
    torch.manual_seed(0)
    bn = cls(channels, affine=affine).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.5, 3)
        if affine:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    return bn


@pytest.mark.parametrize(
    "cls,shape,affine",
    [
        (nn.BatchNorm1d, (5, 3), True),
        (nn.BatchNorm1d, (5, 3, 4), True),
        (nn.BatchNorm2d, (4, 3, 5, 5), True),
        (nn.BatchNorm2d, (4, 3, 5, 5), False),
        (nn.BatchNorm3d, (2, 3, 2, 3, 3), True),
        (nn.SyncBatchNorm, (4, 3, 5, 5), True),
    ],
)
def test_affine_batchnorm_values_gradients_and_hvp_match_hand_formula(cls, shape, affine):
    bn = _stats_bn(cls, 3, affine)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    leaves = [x] + ([bn.weight, bn.bias] if affine else [])

    def trace_grad(forward):
        """y, the gradient of <v, y * y> and the gradient of its squared norm (second order)."""
        y = forward()
        v = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        g = torch.autograd.grad((v * y * y).sum(), leaves, create_graph=True)
        h = torch.autograd.grad(sum((gi * gi).sum() for gi in g), leaves)
        return [y.detach()] + [gi.detach() for gi in g] + list(h)

    ref = trace_grad(lambda: reference_eval_batchnorm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps))
    with affine_batchnorm(bn):
        assert "forward" in vars(bn)
        got = trace_grad(lambda: bn(x))
    assert "forward" not in vars(bn)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_affine_batchnorm_forward_equals_stock_eval_kernel_in_float32():
    bn = _stats_bn(nn.BatchNorm2d, 6).float()
    x = torch.randn(8, 6, 7, 7, generator=torch.Generator().manual_seed(2))
    expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    with affine_batchnorm(bn):
        got = bn(x)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-6)


def test_affine_batchnorm_falls_back_in_train_mode_without_stats_and_for_mixed_dtypes():
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bn = _stats_bn(nn.BatchNorm2d, 3).train()
    mean_before = bn.running_mean.clone()
    with affine_batchnorm(bn):
        y = bn(x)  # train mode: batch statistics, running stats updated with momentum 0.1
    torch.testing.assert_close(y.mean((0, 2, 3)), bn.bias.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bn.running_mean, 0.9 * mean_before + 0.1 * x.mean((0, 2, 3)))

    no_stats = nn.BatchNorm2d(3, track_running_stats=False).double().eval()
    with affine_batchnorm(no_stats):
        y = no_stats(x)  # no running statistics: normalised with the batch's own
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-9)

    mixed = _stats_bn(nn.BatchNorm2d, 3)
    mixed.weight.data = mixed.weight.data.float()
    with affine_batchnorm(mixed), pytest.raises(RuntimeError):
        mixed(x)  # the stock kernel's own dtype error, not a silent promotion


def test_affine_batchnorm_is_reentrant_skips_custom_forwards_and_cleans_up_on_error():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 1

    model = nn.Sequential(nn.BatchNorm2d(2), MyBN(2)).eval()
    with affine_batchnorm(model):
        with affine_batchnorm(model):
            assert "forward" in vars(model[0]) and "forward" not in vars(model[1])
        assert "forward" in vars(model[0])  # the inner exit leaves the outer patch alone
    assert "forward" not in vars(model[0])
    with pytest.raises(ValueError), affine_batchnorm(model):
        raise ValueError("boom")
    assert "forward" not in vars(model[0])
    x = torch.zeros(1, 2, 1, 1)
    with affine_batchnorm(model):
        torch.testing.assert_close(model(x), torch.ones(1, 2, 1, 1), rtol=0, atol=1e-5)
