"""End to end: WideTopo-S (the colleague's scorer on this engine) on a small BN CNN at density
0.01 keeps exactly round(0.01 N_P) weights, leaves no layer without kept weights, and is
reproducible."""
import math

import pytest
import torch
from torch import nn

import widetopo

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.needs_kernel(
        "global_threshold", "density_decay_", "restoration_scores", "accumulate_score_", "masked_sq_norm",
        "apply_masks_", "mask_stats",
    ),
]


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # prunable: 432 + 4608 + 9216 + 320 = 14576 weights


def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))]


def test_widetopo_s_at_one_percent_keeps_every_layer():
    pytest.importorskip("widetopo.scores", reason="the WideTopo scorer (widetopo.scores) is not available")
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = widetopo.prune(model, data(), 0.01, method="widetopo-s", seed=0, verbose=False)
    stats = masks.stats()
    assert [s.name for s in stats] == ["0.weight", "3.weight", "6.weight", "11.weight"]
    assert sum(s.kept for s in stats) == int(math.floor(0.01 * 14576 + 0.5))
    collapsed = [s.name for s in stats if s.kept == 0]
    assert collapsed == [], f"layers with no kept weights: {collapsed}"
    assert all(s.active_out > 0 and s.active_in > 0 for s in stats)
    assert masks.meta["preset"] == "widetopo-s" and masks.meta["rounds"] == 10
    assert masks.meta["restorations"] == 2 and masks.meta["restore_rounds"] == 10
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    again = widetopo.prune(model, data(), 0.01, method="widetopo-s", seed=0, verbose=False)
    assert all(torch.equal(masks[n], again[n]) for n in masks)
