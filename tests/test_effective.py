"""Effective sparsity on hand-built masks whose answer is known, and against an explicit
path-counting reference (boolean reachability layer by layer) on a random MLP."""
import copy

import pytest
import torch
from torch import nn

from references import reference_effective_mlp
from widetopo.sparsity.effective import effective_sparsity, input_shape_from_meta
from widetopo.sparsity.masks import Masks

pytestmark = pytest.mark.usefixtures("one_thread")


def ones_masks(model):
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.dim() >= 2}


def mlp(widths=(4, 3, 3, 2), bias=True):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    return nn.Sequential(nn.Flatten(), *layers[:-1])


def test_mlp_by_hand():
    # 4 -> 3 -> 3 -> 2. Hidden unit 0 of layer 1 keeps no input: its outgoing weights are
    # ineffective. Hidden unit 2 of layer 2 keeps inputs but feeds no output.
    torch.manual_seed(0)
    net = mlp()
    m1 = torch.tensor([[0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    m2 = torch.tensor([[1, 1, 0], [0, 0, 1], [0, 1, 1]], dtype=torch.bool)  # out 0 <- h0 (dead), h1
    m3 = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool)            # h2' feeds nothing
    masks = {"1.weight": m1, "3.weight": m2, "5.weight": m3}
    res = effective_sparsity(net, masks, (4,))
    L = res["layers"]
    # layer 1: all 3 kept weights reach outputs? h1 feeds h'0 and h'2; h'2 feeds nothing but
    # h'0 does, so h1's inputs are effective; h2 feeds only h'1 -> h'1 feeds output 1.
    assert L["1.weight"] == {"kept": 3, "effective": 3, "units": 3, "effective_nodes": 2}
    # layer 2: (0,0) from dead h0 -> ineffective; (0,1) ok; (1,2) ok; (2,1),(2,2) into h'2 which
    # feeds nothing -> ineffective
    assert L["3.weight"] == {"kept": 5, "effective": 2, "units": 3, "effective_nodes": 2}
    assert L["5.weight"] == {"kept": 3, "effective": 3, "units": 2, "effective_nodes": 2}
    t = res["total"]
    assert (t["kept"], t["effective"], t["numel"]) == (11, 8, 12 + 9 + 6)
    assert t["effective_density"] == pytest.approx(8 / 27)
    assert (t["nodes"], t["effective_nodes"]) == (8, 6)
    assert t["node_ratio"] == pytest.approx(6 / 8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_mlp_against_explicit_path_counting(seed):
    gen = torch.Generator().manual_seed(seed)
    widths = (12, 10, 9, 8, 5)
    net = mlp(widths)
    names = [f"{2 * k + 1}.weight" for k in range(len(widths) - 1)]
    ms = [torch.rand(b, a, generator=gen) < 0.25 for a, b in zip(widths[:-1], widths[1:])]
    res = effective_sparsity(net, dict(zip(names, ms)), (12,))
    eff, nodes = reference_effective_mlp(ms)
    assert [res["layers"][n]["effective"] for n in names] == eff
    assert [res["layers"][n]["effective_nodes"] for n in names] == nodes
    # magnitudes give the same zero pattern
    res_mag = effective_sparsity(net, dict(zip(names, ms)), (12,), magnitudes=True)
    assert res_mag["layers"] == res["layers"]


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class ResNetlet(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1, bias=False)
        self.block = Block(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_residual_branch_pruned_to_nothing_leaves_skip_path_effective():
    torch.manual_seed(0)
    net = ResNetlet()
    masks = ones_masks(net)
    masks["block.conv2.weight"] = torch.zeros_like(masks["block.conv2.weight"])
    res = effective_sparsity(net, masks, (2, 6, 6))
    L = res["layers"]
    assert L["stem.weight"]["effective"] == L["stem.weight"]["kept"] == 4 * 2 * 9
    assert L["fc.weight"]["effective"] == 12 and L["fc.weight"]["effective_nodes"] == 3
    # the branch's first conv feeds only into the pruned conv2: reached but feeds nothing
    assert L["block.conv1.weight"]["kept"] == 144 and L["block.conv1.weight"]["effective"] == 0
    assert L["block.conv1.weight"]["effective_nodes"] == 0
    assert L["block.conv2.weight"] == {"kept": 0, "effective": 0, "units": 4, "effective_nodes": 0}
    t = res["total"]
    assert t["effective"] == 72 + 12
    assert t["nodes"] == 4 + 4 + 4 + 3 and t["effective_nodes"] == 4 + 3


def test_dense_nets_are_fully_effective():
    from widetopo.models import build_model

    for name, shape in [("cnn", (1, 8, 8)), ("resnet20", (3, 8, 8)), ("lenet5", (1, 12, 12))]:
        torch.manual_seed(0)
        net = build_model(name, in_channels=shape[0], num_classes=10, image_size=shape[1])
        masks = ones_masks(net)
        res = effective_sparsity(net, masks, shape)
        t = res["total"]
        assert t["effective"] == t["kept"] == t["numel"], name
        assert t["node_ratio"] == 1.0, name


def test_conv_unit_whose_inputs_are_all_pruned_makes_outgoing_weights_ineffective():
    # stem out-channel 1 keeps no input weight: every weight of block.conv1 reading channel 1
    # is kept but ineffective... except that the skip path is an identity, so channel 1 of the
    # block input stays zero too. Count the conv1 weights reading input channel 1.
    torch.manual_seed(0)
    net = ResNetlet()
    masks = ones_masks(net)
    masks["stem.weight"][1] = False
    res = effective_sparsity(net, masks, (2, 6, 6))
    L = res["layers"]
    assert L["block.conv1.weight"]["effective"] == 144 - 4 * 9
    assert L["stem.weight"]["effective_nodes"] == 3
    assert L["block.conv2.weight"]["effective"] == 144  # conv1's outputs are all reached


class Attn(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.norm(self.embed(x))
        a, _ = self.attn(h, h, h)
        return self.head((a + h).mean(1))


def test_attention_model_layernorm_as_identity():
    torch.manual_seed(0)
    net = Attn()
    masks = ones_masks(net)
    res = effective_sparsity(net, masks, (5, 3))
    assert res["total"]["effective"] == res["total"]["numel"]  # dense: 100 %
    masks["embed.weight"][2] = False  # feature 2 of the embedding keeps no input
    res = effective_sparsity(net, masks, (5, 3))
    assert res["layers"]["embed.weight"]["effective_nodes"] == 5
    # the head's weights reading feature 2 see only the residual (zero) and the attention mix,
    # which spreads every feature: they stay effective; embed's row 2 holds no kept weight
    assert res["layers"]["embed.weight"]["effective"] == 15
    assert res["layers"]["head.weight"]["effective"] == 12


def test_caller_model_untouched_and_mode_kept():
    torch.manual_seed(0)
    net = ResNetlet().train()
    before = copy.deepcopy(net.state_dict())
    masks = ones_masks(net)
    effective_sparsity(net, masks, (2, 6, 6))
    assert net.training and all(m.training for m in net.modules())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(len(m._forward_hooks) == 0 for m in net.modules())


def test_bad_arguments():
    net = mlp()
    with pytest.raises(ValueError, match="not a parameter"):
        effective_sparsity(net, {"9.weight": torch.ones(2, 2, dtype=torch.bool)}, (4,))
    with pytest.raises(ValueError, match="shape"):
        effective_sparsity(net, {"1.weight": torch.ones(2, 2, dtype=torch.bool)}, (4,))
    with pytest.raises(ValueError, match="input_shape"):
        effective_sparsity(net, {}, (0,))
    with pytest.raises(TypeError, match="mapping"):
        effective_sparsity(net, [1], (4,))


def test_masks_stats_with_model():
    torch.manual_seed(0)
    net = mlp()
    m1 = torch.tensor([[0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    masks = Masks({"1.weight": m1, "3.weight": torch.ones(3, 3, dtype=torch.bool)}, {"in_channels": 4, "image_size": 1})
    plain = masks.stats()
    assert plain[0].effective is None and plain[0].effective_nodes is None
    st = masks.stats(net, input_shape=(4,))
    assert (st[0].kept, st[0].effective, st[0].effective_nodes) == (3, 3, 2)
    assert (st[1].kept, st[1].effective, st[1].effective_nodes) == (9, 6, 3)  # column 0 reads dead h0
    # input shape from the metadata: (4, 1, 1) flattens to 4 features
    assert masks.stats(net) == st
    with pytest.raises(ValueError, match="input_shape"):
        Masks({"1.weight": m1}).stats(net)


def test_input_shape_from_meta():
    assert input_shape_from_meta({"in_channels": 3, "image_size": 32}) == (3, 32, 32)
    assert input_shape_from_meta({"in_channels": 1, "image_size": [8, 6]}) == (1, 8, 6)
    assert input_shape_from_meta({}) is None


def test_deep_chain_neither_overflows_nor_loses_a_weak_path():
    # 120 layers 64 -> 64: unit 0 of every layer reads only unit 0 of the layer below, the others
    # read everything. Unscaled ones would reach 64^120 ~ 1e216 (and more with wider layers);
    # after the per-tensor rescale unit 0's path is 64x weaker than its neighbours per layer
    # (~1e-217 at the top) and must still count as reached.
    depth, width = 120, 64
    net = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
    masks = {}
    for k in range(depth):
        m = torch.ones(width, width, dtype=torch.bool)
        m[0] = False
        m[0, 0] = True
        masks[f"{k}.weight"] = m
    res = effective_sparsity(net, masks, (width,))
    t = res["total"]
    assert t["effective"] == t["kept"] == depth * (width * (width - 1) + 1)
    assert t["node_ratio"] == 1.0
