"""The engine's rounding-noise guard (widetopo.engine.rounds.NoiseScoresError): a round is refused
when a prunable tensor's score total is within NOISE_MARGIN times the rounding error the scorer
reports for it. Checked on the trap that motivated it (PX with train-mode BatchNorm, whose h-net
no longer depends on the weights), on hand-made networks whose output is constant in their
weights, and on the guard itself with a scorer whose scores and floors are set by hand."""
import pytest
import torch
from torch import nn

import widetopo
from widetopo.engine.rounds import NOISE_MARGIN, NoiseScoresError, ZeroScoresError
from widetopo.models import build_model
from widetopo.scores.base import Scorer

pytestmark = [pytest.mark.needs_kernel("accumulate_score_", "global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]


def images(n=4, c=3, hw=8, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, c, hw, hw, generator=g), torch.randint(0, classes, (n,), generator=g))]


def resnet20():
    torch.manual_seed(0)
    return build_model("resnet20", 3, 10, image_size=8)


def test_px_train_mode_batchnorm_on_resnet20_is_refused():
    """Train-mode BatchNorm in the h-net: every BatchNorm is followed (through the residual sums)
    by the global pool, so the output is the shifts beta whatever the conv weights."""
    model = resnet20()
    with pytest.raises(NoiseScoresError, match=r"'px' scores of '.*' in round 1 are rounding noise.*"
                                               r"use batchnorm='running'"):
        widetopo.prune(model, images(), 0.5, method="px", rounds=2, batchnorm="train", verbose=False)


def test_px_default_on_resnet20_runs():
    model = resnet20()
    masks = widetopo.prune(model, images(), 0.5, method="px", rounds=2, verbose=False)
    n = sum(p.numel() for n_, p in model.named_parameters() if n_ in masks)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * n)


class PoolAfterBN(nn.Module):
    """conv -> BatchNorm2d -> ReLU -> global average pool -> linear. On identical samples, a
    train-mode BatchNorm's spatial mean is its shift: the pooled features do not depend on the conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class ZeroTimes(nn.Module):
    """The logits are 0 * f(x): constant in every weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 4)

    def forward(self, x):
        return 0.0 * self.fc(torch.relu(self.conv(x)).flatten(1))


class PoolRightAfterBN(nn.Module):
    """conv -> BatchNorm2d -> global average pool -> ReLU -> linear: on a batch of one sample (or
    of identical samples), train-mode BatchNorm makes the pooled features its shift beta."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.bn.bias.uniform_(0.5, 1.0)  # beta > 0: the ReLU passes it, the fc scores are healthy

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x)).mean((2, 3))))


@pytest.mark.parametrize("method,options", [("px", {"batchnorm": "train"}), ("snip", {}), ("iter-snip", {}),
                                            ("grasp", {}), ("grasp", {"hessian": "all"})])
def test_output_constant_in_the_conv_weights_is_refused(method, options):
    """Batches of one sample: the loss-based methods' train-mode BatchNorm gives the conv weights
    rounding-noise gradients; the fc weights score normally (the check is per tensor)."""
    torch.manual_seed(6)
    data = [(x[:1], y[:1]) for x, y in images(classes=4)] * 2
    with pytest.raises(NoiseScoresError, match=rf"{method!r} scores of 'conv.weight' in round 1"):
        widetopo.prune(PoolRightAfterBN(), data, 0.5, method=method, rounds=2, verbose=False, **options)
    # batches of several distinct samples (and PX's default) depend on the conv weights: no error
    many = images(classes=4)
    got = widetopo.saliency(PoolRightAfterBN(), many if method != "px" else [x for x, _ in many], method,
                            **{k: v for k, v in options.items() if k != "batchnorm"})
    assert float(got["conv.weight"].abs().sum()) > 0


def test_px_train_mode_pool_after_batchnorm_is_refused():
    torch.manual_seed(2)
    with pytest.raises(NoiseScoresError, match=r"'conv.weight' in round 1"):
        widetopo.saliency(PoolAfterBN(), [x for x, _ in images(classes=4)], "px", batchnorm="train")
    got = widetopo.saliency(PoolAfterBN(), [x for x, _ in images(classes=4)], "px")  # default: fine
    assert float(got["conv.weight"].min()) > 0


@pytest.mark.parametrize("method", ["px", "snip", "iter-snip", "grasp", "synflow-l2", "ntk-sap"])
def test_output_zero_times_the_weights_is_refused(method):
    """A zero multiply makes every gradient exactly 0: refused by the all-zero check (of which
    NoiseScoresError is the rounding-noise case)."""
    torch.manual_seed(3)
    with pytest.raises(ZeroScoresError, match=rf"{method!r}.* round 1"):
        widetopo.prune(ZeroTimes(), images(classes=4), 0.5, method=method, rounds=1, verbose=False)


# ------------------------------------------------------------------ the guard itself
class HandScorer(Scorer):
    """Scores and noise floors set by hand: layer l scores `totals[l] / numel` everywhere."""

    name = "hand"
    data_dependent = True
    reports_noise_floor = True

    def __init__(self, totals, floors):
        super().__init__()
        self.totals, self.floors = totals, floors

    def score(self, ctx, batches):
        ctx.noise_floor = list(self.floors)
        return [torch.full_like(p, t / p.numel()) for p, t in zip(ctx.prunable, self.totals)]

    def noise_advice(self):
        return "set hand=off"


def mlp():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(5, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False))


def run(scorer, reports=True):
    scorer.reports_noise_floor = reports
    x = [torch.randn(4, 5, generator=torch.Generator().manual_seed(5))]
    return widetopo.prune(mlp(), x, 0.5, method=scorer, rounds=1, verbose=False)


def test_guard_names_the_layer_the_round_and_the_advice():
    with pytest.raises(NoiseScoresError, match=r"'hand' scores of '2.weight' in round 1 .*set hand=off"):
        run(HandScorer([1.0, 0.5 * NOISE_MARGIN * 1e-12], [1e-16, 1e-12]))


def test_guard_passes_totals_above_the_floor_zero_totals_and_silent_scorers():
    run(HandScorer([1.0, 2.0 * NOISE_MARGIN * 1e-12], [1e-16, 1e-12]))  # above: fine
    run(HandScorer([1.0, 0.0], [1e-16, 1e-12]))  # a layer scoring exactly 0 is no rounding noise
    run(HandScorer([1.0, 1e-12], [1e-16, 1e-12]), reports=False)  # not reporting: not checked
