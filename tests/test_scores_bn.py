"""BatchNorm calibration against a deep copy run in train mode with momentum 1."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scoring_nets import calibrated_copy
from scoring_nets import make_ctx as _make_ctx
from widetopo.scores import calibrate_batchnorm
from widetopo.scores.bn import eval_mode


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
