"""Unit topology: grouped, depthwise and transposed convolutions against hand-built dense
equivalents; layouts read from models; restoration with layouts."""
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

import widetopo_ext
from widetopo_ext import reference as ref
from widetopo.sparsity import topology
from widetopo.engine.restoration import restore_masks, restoration_noise
from widetopo.sparsity.topology import DENSE, UnitLayout, unit_counts, unit_layouts

from references import reference_group_restoration_scores

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# dense equivalents, built by hand


def dense_of_grouped(w, groups, fill=0.0):
    """(O, I/g, k...) grouped weight -> (O, I, k...) block-diagonal dense weight."""
    o, ig = w.shape[0], w.shape[1]
    og = o // groups
    dense = torch.full((o, ig * groups) + tuple(w.shape[2:]), fill, dtype=w.dtype)
    for b in range(groups):
        for oo in range(b * og, (b + 1) * og):
            for ii in range(ig):
                dense[oo, b * ig + ii] = w[oo, ii]
    return dense


def grouped_of_dense(dense, groups, ig):
    o = dense.shape[0]
    og = o // groups
    return torch.stack([dense[oo, (oo // og) * ig:(oo // og + 1) * ig] for oo in range(o)])


def dense_of_transposed(w, groups):
    """(I, O/g, k...) transposed-conv weight -> (O, I, k...) dense weight of the equivalent
    (out, in) map: dense[b*Og + o', b*Ig + i'] = w[b*Ig + i', o']."""
    i, og = w.shape[0], w.shape[1]
    ig = i // groups
    dense = torch.zeros((og * groups, i) + tuple(w.shape[2:]), dtype=w.dtype)
    for b in range(groups):
        for ii in range(ig):
            for oo in range(og):
                dense[b * og + oo, b * ig + ii] = w[b * ig + ii, oo]
    return dense


def transposed_of_dense(dense, groups, i):
    og = dense.shape[0] // groups
    ig = i // groups
    out = torch.zeros((i, og) + tuple(dense.shape[2:]), dtype=dense.dtype)
    for b in range(groups):
        for ii in range(ig):
            for oo in range(og):
                out[b * ig + ii, oo] = dense[b * og + oo, b * ig + ii]
    return out


def test_dense_equivalents_compute_the_same_convolutions(gen):
    """The hand-built equivalents are the true unit graphs: same outputs as the modules."""
    x = torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64)
    conv = nn.Conv2d(4, 6, 3, groups=2, bias=False).double()
    torch.testing.assert_close(conv(x), F.conv2d(x, dense_of_grouped(conv.weight.detach(), 2)))
    tconv = nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False).double()
    dense = dense_of_transposed(tconv.weight.detach(), 2)  # (out, in, k, k)
    # a transposed conv with weight (in, out, k, k) is conv_transpose2d; its dense form is the
    # same map with the (out, in) roles written out
    torch.testing.assert_close(tconv(x), F.conv_transpose2d(x, dense.transpose(0, 1)))


CASES = {
    # name: (stored shape, layout, to dense, from dense)
    "grouped": ((6, 2, 3, 3), UnitLayout(groups=2), lambda w: dense_of_grouped(w, 2), lambda d: grouped_of_dense(d, 2, 2)),
    "depthwise": ((5, 1, 3, 3), UnitLayout(groups=5), lambda w: dense_of_grouped(w, 5), lambda d: grouped_of_dense(d, 5, 1)),
    "depthwise-multiplier": ((6, 1, 2), UnitLayout(groups=3), lambda w: dense_of_grouped(w, 3), lambda d: grouped_of_dense(d, 3, 1)),
    "transposed": ((4, 6, 3, 3), UnitLayout(transposed=True), lambda w: dense_of_transposed(w, 1), lambda d: transposed_of_dense(d, 1, 4)),
    "transposed-grouped": ((4, 3, 2, 2), UnitLayout(groups=2, transposed=True), lambda w: dense_of_transposed(w, 2),
                           lambda d: transposed_of_dense(d, 2, 4)),
}


def _random(shape, gen, density=0.5):
    mask = torch.rand(shape, generator=gen) < density
    scores = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1
    return scores, mask


@pytest.mark.parametrize("case", list(CASES))
def test_decay_equals_dense_equivalent(case, gen):
    shape, layout, to_dense, from_dense = CASES[case]
    scores, mask = _random(shape, gen)
    dense_s, dense_m = to_dense(scores), to_dense(mask.double()).bool()  # off-block entries pruned
    ref.density_decay_([dense_s], [dense_m], 0.7)
    got = scores.clone()
    topology.density_decay_([got, torch.ones(3, dtype=torch.float64)], [mask, torch.ones(3, dtype=torch.bool)],
                            [layout, DENSE], 0.7)
    torch.testing.assert_close(got, from_dense(dense_s))
    naive = scores.clone()
    widetopo_ext.density_decay_([naive], [mask], 0.7)
    if layout.groups > 1:  # the plain (O, I, K) reading of a grouped weight is wrong
        assert not torch.allclose(naive, got)
    else:  # decay is symmetric in out/in units: a transposed weight reads the same
        torch.testing.assert_close(naive, got)


@pytest.mark.parametrize("case", list(CASES))
def test_mask_stats_equal_dense_equivalent(case, gen):
    shape, layout, to_dense, _ = CASES[case]
    _, mask = _random(shape, gen, density=0.3)
    dense_m = to_dense(mask.double()).bool()
    want = ref.mask_stats([dense_m])[0]
    got = topology.mask_stats([mask], [layout])
    assert got.dtype == torch.int64 and got.shape == (1, 3)
    assert got[0].tolist() == want.tolist()
    assert unit_counts(shape, layout) == (dense_m.shape[0], dense_m.shape[1])


@pytest.mark.parametrize("case", list(CASES))
def test_restoration_scores_match_the_group_formula(case, gen):
    shape, layout, to_dense, from_dense = CASES[case]
    _, mask = _random(shape, gen, density=0.4)
    noise = torch.randn(shape[:2], generator=gen)
    scale = 0.01
    g = layout.groups
    if layout.transposed:
        og, ig = shape[1], shape[0] // g
        dense_noise = dense_of_transposed(noise, g)
    else:
        og, ig = shape[0] // g, shape[1]
        dense_noise = dense_of_grouped(noise, g)
    group_of_out = [o // og for o in range(og * g)]
    group_of_in = [i // ig for i in range(ig * g)]
    want = reference_group_restoration_scores(to_dense(mask.double()).bool(), dense_noise, group_of_out, group_of_in, scale)
    got = topology.restoration_scores([mask], [noise], scale, [layout])[0]
    assert got.dtype == torch.float32 and got.shape == mask.shape
    torch.testing.assert_close(got.double(), from_dense(want), rtol=1e-6, atol=1e-6)


def test_elementwise_tokens_and_rank1_are_their_own_units(gen):
    tok = torch.rand(1, 3, 4, generator=gen) < 0.5
    bias = torch.rand(5, generator=gen) < 0.5
    lay = [UnitLayout(elementwise=True), DENSE]
    s = torch.rand(1, 3, 4, generator=gen, dtype=torch.float64)
    before = s.clone()
    topology.density_decay_([s, torch.ones(5, dtype=torch.float64)], [tok, bias], lay, 0.9)
    assert torch.equal(s, before)  # no decay: tokens connect no units
    r = topology.restoration_scores([tok, bias], [None, None], 1e-5, lay)
    assert torch.equal(r[0], torch.where(tok, 2.0, 1.0)) and torch.equal(r[1], torch.where(bias, 2.0, 1.0))
    k0, k1 = int(tok.sum()), int(bias.sum())
    assert topology.mask_stats([tok, bias], lay).tolist() == [[k0, k0, k0], [k1, k1, k1]]
    assert unit_counts((1, 3, 4), lay[0]) == (12, 12)


def test_layout_errors():
    with pytest.raises(ValueError, match=r"layouts\[0\] has groups=4, which must divide dim 0"):
        topology.mask_stats([torch.ones(6, 2, dtype=torch.bool)], [UnitLayout(groups=4)])
    with pytest.raises(ValueError, match="one UnitLayout per mask"):
        topology.mask_stats([torch.ones(6, 2, dtype=torch.bool)], [])
    with pytest.raises(ValueError, match="groups must be an integer >= 1"):
        UnitLayout(groups=0)
    with pytest.raises(ValueError, match=r"noise\[0\] must be a float32 tensor of shape \(6, 2\)"):
        topology.restoration_scores([torch.ones(6, 2, dtype=torch.bool)], [torch.zeros(2, 6)], 1e-5, [UnitLayout(groups=2)])


# ---------------------------------------------------------------------------------------------
# layouts from models


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.table = nn.Parameter(torch.zeros(3, 8))
        self.stem = nn.Conv2d(3, 8, 3)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.grp = nn.Conv1d(8, 4, 1, groups=2)
        self.up = nn.ConvTranspose2d(8, 6, 2, groups=2)
        self.attn = nn.MultiheadAttention(8, 2)
        self.lstm = nn.LSTM(8, 4)
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10)
        self.head.weight = self.emb.weight


def test_unit_layouts_from_a_model():
    model = Mixed()
    names = ["cls_token", "pos_embed", "table", "stem.weight", "dw.weight", "grp.weight", "up.weight",
             "attn.in_proj_weight", "attn.out_proj.weight", "lstm.weight_ih_l0", "emb.weight", "stem.bias"]
    assert unit_layouts(model, names) == [
        UnitLayout(elementwise=True), UnitLayout(elementwise=True), DENSE, DENSE,
        UnitLayout(groups=8), UnitLayout(groups=2), UnitLayout(groups=2, transposed=True),
        DENSE, DENSE, DENSE, UnitLayout(transposed=True), DENSE,
    ]
    assert unit_counts(model.up.weight.shape, UnitLayout(groups=2, transposed=True)) == (6, 8)
    assert unit_counts(model.dw.weight.shape, UnitLayout(groups=8)) == (8, 8)
    assert unit_counts(model.attn.in_proj_weight.shape, DENSE) == (24, 8)
    with pytest.raises(ValueError, match="'nope' is not a parameter"):
        unit_layouts(model, ["nope"])


def test_unit_layouts_under_nn_utils_prune():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    torch.nn.utils.prune.identity(model[0], "weight")
    assert unit_layouts(model, ["0.weight_orig"]) == [UnitLayout(groups=4)]


# ---------------------------------------------------------------------------------------------
# restoration with layouts


def test_restore_masks_layouts_none_and_dense_agree(gen):
    masks = [torch.rand(6, 4, 3, generator=gen) < 0.2, torch.rand(5, generator=gen) < 0.2]
    a = [m.clone() for m in masks]
    b = [m.clone() for m in masks]
    restore_masks(a, 0.2, 0, 3, seed=1)
    restore_masks(b, 0.2, 0, 3, seed=1, layouts=[DENSE, DENSE])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_restore_masks_grouped_regrows_within_groups_exact_k(gen):
    """A depthwise conv whose channel 0 lost every weight: with its layout, channel 0's pruned
    entries score (1 - 0)(1 - 0) = 1 and are regrown first; exact K at every step."""
    dw = torch.ones(4, 1, 3, 3, dtype=torch.bool)
    dw[0] = False
    dw[1, 0, 0, 0] = False
    lin = torch.ones(4, 36, dtype=torch.bool)
    masks = [dw, lin]
    n = dw.numel() + lin.numel()
    target = (dw.sum() + lin.sum()).item() / n
    path = restore_masks(masks, target, 0, 1, seed=0, layouts=[UnitLayout(groups=4), DENSE])
    keep = round(path[-1] * n)
    assert int(dw.sum() + lin.sum()) == keep
    grown = keep - round(target * n)
    assert grown >= 1 and int(dw[0].sum()) == min(grown, 9)


def test_restoration_noise_skips_elementwise_only(gen):
    masks = [torch.ones(1, 2, 3, dtype=torch.bool), torch.ones(4, 2, dtype=torch.bool)]
    plain = restoration_noise(masks, 0, 0, 1)
    lay = restoration_noise(masks, 0, 0, 1, [UnitLayout(elementwise=True), UnitLayout(groups=2)])
    assert plain[0].shape == (1, 2) and lay[0].numel() == 0
    assert lay[1].shape == (4, 2)
