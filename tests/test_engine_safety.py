"""No silent wrong answers: each case fails before any work with an error that says what to do,
or is handled correctly."""
import pytest
import torch
from torch import nn

import widetopo
from widetopo.engine.checkpoint import CheckpointMismatch
from widetopo.engine.rounds import ZeroScoresError
from widetopo.scores.base import Scorer

pytestmark = [pytest.mark.needs_kernel("global_threshold", "apply_masks_", "mask_stats", "density_decay_"),
              pytest.mark.usefixtures("one_thread")]


def bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def data(n=2, bs=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, generator=g), torch.randint(0, 2, (bs,), generator=g)) for _ in range(n)]


class Counting(Scorer):
    name = "counting"
    data_dependent = True

    def __init__(self):
        self.calls = 0

    def score(self, ctx, batches):
        self.calls += 1
        return [p.abs() * sum(float(b.x.abs().sum()) for b in batches) for p in ctx.prunable]


def test_checkpoint_of_other_data_with_the_same_shapes_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    widetopo.prune(bn_mlp(), data(seed=1), 0.3, method=Counting(), rounds=2, checkpoint=path, verbose=False)
    with pytest.raises(CheckpointMismatch, match="data_digest"):
        widetopo.prune(bn_mlp(), data(seed=2), 0.3, method=Counting(), rounds=2, checkpoint=path, verbose=False)


def test_snip_with_every_target_ignored_is_refused_not_arbitrary():
    batches = [(x, torch.full_like(y, -100)) for x, y in data()]
    with pytest.raises(ZeroScoresError, match="every kept weight scored 0 with 'snip'.*ignore_index"):
        widetopo.prune(bn_mlp(), batches, 0.3, method="snip", verbose=False)


def test_snip_ignores_the_ignored_targets():
    """Targets equal to ignore_index drop out of the loss: same scores as the batch without those
    samples (eval-mode BatchNorm, so that they do not enter batch statistics either)."""
    (x, y), = data(1, bs=6)
    y_ign = y.clone()
    y_ign[:2] = 7
    a = widetopo.saliency(bn_mlp().eval(), [(x, y_ign)], "snip", ignore_index=7, batchnorm="eval")
    model = bn_mlp().eval()
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in a}
    loss = nn.functional.cross_entropy(model(x)[2:], y[2:])
    grads = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in ref])
    for (n, p), g in zip([(n, dict(model.named_parameters())[n]) for n in ref], grads):
        torch.testing.assert_close(a[n], (g * p.detach()).abs(), rtol=1e-4, atol=1e-7)


def test_a_density_that_keeps_nothing_is_an_error_before_any_work():
    scorer = Counting()
    with pytest.raises(ValueError, match=r"density 0.001 keeps no weight of the 30 prunable ones"):
        widetopo.prune(bn_mlp(), data(), 0.001, method=scorer)
    assert scorer.calls == 0


def test_a_one_sample_batch_is_refused_before_round_one():
    batches = data(1, bs=4) + data(1, bs=1, seed=3)
    scorer = Counting()
    with pytest.raises(ValueError, match="BatchNorm calibration needs more than one value per channel.*drop_last"):
        widetopo.prune(bn_mlp(), batches, 0.3, method=scorer)
    assert scorer.calls == 0


def test_batches_of_different_shapes_name_the_batch():
    batches = data(1) + [(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"batch 1 has samples of shape \(5,\).*batch 0 has \(3,\)"):
        widetopo.prune(bn_mlp(), batches, 0.3, method=Counting())
    with pytest.raises(ValueError, match="batch 0 has 4 inputs but 3 targets"):
        widetopo.prune(bn_mlp(), [(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))], 0.3, method=Counting())


def test_checkpoint_in_a_missing_folder_fails_before_round_one(tmp_path):
    scorer = Counting()
    with pytest.raises(ValueError, match="folder .* does not exist"):
        widetopo.prune(bn_mlp(), data(), 0.3, method=scorer, checkpoint=tmp_path / "no" / "run.ckpt")
    assert scorer.calls == 0


def test_corrupt_checkpoint_error_gives_our_advice_not_torchs(tmp_path):
    path = tmp_path / "run.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError) as info:
        widetopo.prune(bn_mlp(), data(), 0.3, method=Counting(), checkpoint=path)
    assert "delete it to start over" in str(info.value) and "weights_only" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="device is 'cuda', but this torch has no usable CUDA device"):
        widetopo.prune(bn_mlp(), data(), 0.3, method="magnitude", device="cuda")


def test_data_device_cpu_gives_the_same_masks():
    a = widetopo.prune(bn_mlp(), data(), 0.3, method="widetopo-s", rounds=2, restorations=1, restore_steps=2,
                       verbose=False)
    b = widetopo.prune(bn_mlp(), data(), 0.3, method="widetopo-s", rounds=2, restorations=1, restore_steps=2,
                       data_device="cpu", verbose=False)
    assert all(torch.equal(a[n], b[n]) for n in a)


class MixingNet(nn.Module):
    """Eval-mode output of a sample depends on the other samples of its batch (batch mean)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.head(h - h.mean(0, keepdim=True))


def test_ita_separate_evaluation_for_models_that_mix_samples():
    """ita_batched=False evaluates x and x + eps*dx in separate forwards: for a model that mixes
    samples that differs from the batched evaluation, and equals a hand-written four-forward ITA."""
    batch = [torch.randn(5, 3, generator=torch.Generator().manual_seed(4))]
    sep = widetopo.saliency(MixingNet(), batch, "widetopo", mu1=0.0, ita_batched=False)
    cat = widetopo.saliency(MixingNet(), batch, "widetopo", mu1=0.0, ita_batched=True)
    assert any(not torch.allclose(sep[n], cat[n], rtol=1e-3) for n in sep)
    # reference: the ITA formula with four explicit forwards (same draws as ita_score)
    from widetopo.engine.rng import make_generator
    from widetopo.scores.ita import ITA_STREAM

    model = MixingNet()
    x = batch[0].double()
    eps = 5e-4
    gen = make_generator(0, 1, 0, "cpu", ITA_STREAM)
    dx = torch.randn(batch[0].shape, generator=gen).double()
    names = ["fc.weight", "head.weight"]
    params = dict(model.named_parameters())
    c = {n: params[n].detach().double() + eps * torch.randn(params[n].shape, generator=gen).double() for n in names}
    m = {n: torch.ones_like(params[n], dtype=torch.float64, requires_grad=True) for n in names}
    base = {n: p.detach().double() for n, p in params.items()}
    src = dict(base, **{n: base[n] * m[n] for n in names})
    tgt = dict(base, **{n: c[n] * m[n] for n in names})
    f = lambda p, inp: torch.func.functional_call(model.double(), p, (inp,))
    delta = (f(tgt, x + eps * dx) - f(tgt, x)) - (f(src, x + eps * dx) - f(src, x))
    a = delta.pow(2).sum() / (eps * eps)
    grads = torch.autograd.grad(a, [m[n] for n in names])
    for n, g in zip(names, grads):
        torch.testing.assert_close(sep[n].double(), g.abs(), rtol=2e-2, atol=1e-6)
