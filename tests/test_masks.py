"""Masks: mapping behaviour, density and per-layer statistics on hand-counted masks, apply_,
to(), save/load through widetopo.sparsity.maskfile."""
import pytest
import torch
from torch import nn

from widetopo.sparsity.masks import LayerStats, Masks

pytestmark = pytest.mark.needs_kernel("mask_stats", "apply_masks_")


def hand_masks():
    conv = torch.zeros(3, 2, 2, dtype=torch.bool)  # O=3, I=2, K=2
    conv[0, 0, 1] = conv[0, 1, 0] = conv[2, 1, 1] = True  # out units 0, 2 active; in units 0, 1
    lin = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)  # out 0, 1; in 0, 3
    bias = torch.tensor([True, False, True])
    return Masks({"conv.weight": conv, "fc.weight": lin, "fc.bias": bias}, {"method": "hand", "seed": 3})


def test_mapping_and_density():
    m = hand_masks()
    assert list(m) == ["conv.weight", "fc.weight", "fc.bias"]
    assert len(m) == 3 and "fc.bias" in m
    assert m.numel == 12 + 8 + 3
    assert m.kept == 3 + 3 + 2
    assert m.density == pytest.approx(8 / 23)
    assert m.meta == {"method": "hand", "seed": 3}
    assert "density=0.347826" in repr(m)


def test_stats_by_hand():
    stats = hand_masks().stats()
    assert stats[0] == LayerStats("conv.weight", (3, 2, 2), 12, 3, 0.25, 3, 2, 2, 2)
    assert stats[1] == LayerStats("fc.weight", (2, 4), 8, 3, 3 / 8, 2, 4, 2, 2)
    assert stats[2] == LayerStats("fc.bias", (3,), 3, 2, 2 / 3, 3, 3, 2, 2)
    assert Masks({}).stats() == []


def test_rejects_non_bool():
    with pytest.raises(TypeError, match="mask 'w' must be a torch.bool tensor"):
        Masks({"w": torch.ones(2, 2)})
    with pytest.raises(TypeError, match="mask names must be strings"):
        Masks({1: torch.ones(2, dtype=torch.bool)})


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 2)
        self.fc = nn.Linear(4, 2)


def test_apply_zeroes_pruned_weights_only():
    torch.manual_seed(0)
    net = Net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    m = Masks({"conv.weight": hand_masks()["conv.weight"], "fc.weight": hand_masks()["fc.weight"]})
    assert m.apply_(net) is net
    assert torch.equal(net.conv.weight, before["conv.weight"] * m["conv.weight"])
    assert torch.equal(net.fc.weight, before["fc.weight"] * m["fc.weight"])
    assert torch.equal(net.conv.bias, before["conv.bias"]) and torch.equal(net.fc.bias, before["fc.bias"])
    assert net.fc.weight.requires_grad


def test_apply_mismatch_is_an_error_and_changes_nothing():
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    bad = Masks({"fc.weight": torch.zeros(2, 4, dtype=torch.bool), "conv.weight": torch.zeros(3, 2, dtype=torch.bool),
                 "nothere.weight": torch.zeros(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"missing parameters \['nothere.weight'\].*shape mismatch.*conv.weight"):
        bad.apply_(net)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_to_keeps_meta_and_values():
    m = hand_masks()
    n = m.to("cpu")
    assert n is not m and n.meta == m.meta
    assert all(torch.equal(n[k], m[k]) for k in m)


def test_save_load_round_trip(tmp_path):
    m = hand_masks()
    path = tmp_path / "masks.wtm"
    m.save(path)
    back = Masks.load(path)
    assert isinstance(back, Masks)
    assert list(back) == list(m)
    assert all(torch.equal(back[k], m[k]) for k in m)
    assert back.meta.get("method") == "hand" and back.meta.get("seed") == 3
