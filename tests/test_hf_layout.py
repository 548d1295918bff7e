"""(in, out) layers (transformers' Conv1D of GPT-2, and one written here) are selected by default
and read with dim 0 = input units; Masks.stats and the report agree; Masks.rename.

References are hand-computed units/degrees or float64 formulas written here; GPT-2 is built from
a tiny config (never downloaded)."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import widetopo
from widetopo.sparsity import selection, topology
from widetopo.sparsity.effective import effective_sparsity
from widetopo.sparsity.masks import Masks
from widetopo.sparsity.report import mask_report
from widetopo.sparsity.selection import select_prunable

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture
def transformers():
    """transformers (a test dependency: pyproject's `test` extra); models come from configs."""
    return pytest.importorskip("transformers", reason="transformers is in the `test` extra: pip install '.[test]'")

E, V, P = 8, 11, 6  # embedding width, vocabulary, positions of the tiny GPT-2


def tiny_gpt2(transformers, layers: int = 1):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=E, n_layer=layers, n_head=2, vocab_size=V, n_positions=P,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


class InOut(nn.Module):
    """y = x @ W + b with W stored (in, out), like transformers' Conv1D."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x):
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y


@pytest.fixture
def in_out_registered(monkeypatch):
    monkeypatch.setattr(selection, "IN_OUT_LAYERS", list(selection.IN_OUT_LAYERS))
    selection.register_in_out_layer(InOut)
    yield


GPT2_WEIGHTS = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]


# ------------------------------------------------------------------------------ selection
def test_gpt2_default_selection_has_every_conv1d_weight(transformers):
    assert select_prunable(tiny_gpt2(transformers)) == GPT2_WEIGHTS


def test_include_tokens_does_not_pull_in_conv1d(transformers):
    model = tiny_gpt2(transformers)
    assert select_prunable(model, include=(nn.Embedding,), include_tokens=True) == [
        "transformer.wte.weight", "transformer.wpe.weight"]
    # default types + tokens: the Conv1D weights once, plus the position embedding
    assert select_prunable(model, include_tokens=True) == GPT2_WEIGHTS[:1] + ["transformer.wpe.weight"] + GPT2_WEIGHTS[1:]


def test_explicit_include_replaces_the_default_in_out_layers(transformers):
    with pytest.raises(ValueError, match="no prunable parameters selected"):
        select_prunable(nn.Sequential(transformers.pytorch_utils.Conv1D(4, 3)), include=(nn.Conv2d,))
    assert select_prunable(nn.Sequential(transformers.pytorch_utils.Conv1D(4, 3))) == ["0.weight"]


def test_own_in_out_layer_selected_once_registered(in_out_registered):
    model = nn.Sequential(InOut(4, 6), nn.ReLU(), InOut(6, 3))
    assert select_prunable(model) == ["0.weight", "2.weight"]
    assert topology.unit_layouts(model, ["0.weight"]) == [topology.UnitLayout(transposed=True)]


def test_register_in_out_layer_refuses_a_non_module():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        selection.register_in_out_layer(int)


# ------------------------------------------------------------------------------ units
def _c_attn_mask():
    """c_attn (E in, 3E out): input units 0, 1, 2 all feed output unit 5 only."""
    m = torch.zeros(E, 3 * E, dtype=torch.bool)
    m[0, 5] = m[1, 5] = m[2, 5] = True
    return m


def test_conv1d_units_stats_report_and_file_agree(transformers, tmp_path):
    model = tiny_gpt2(transformers)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n in GPT2_WEIGHTS}
    masks["transformer.h.0.attn.c_attn.weight"] = _c_attn_mask()
    layouts = topology.unit_layouts(model, list(masks))
    carried = Masks(masks, {"method": "hand"}, layouts)
    # hand: (out_units, in_units, active_out, active_in, kept)
    want = {
        "transformer.wte.weight": (E, V, E, V, V * E),            # tokens are inputs, features outputs
        "transformer.h.0.attn.c_attn.weight": (3 * E, E, 1, 3, 3),
        "transformer.h.0.attn.c_proj.weight": (E, E, E, E, E * E),
        "transformer.h.0.mlp.c_fc.weight": (4 * E, E, 4 * E, E, 4 * E * E),
        "transformer.h.0.mlp.c_proj.weight": (E, 4 * E, E, 4 * E, 4 * E * E),
    }
    path = tmp_path / "gpt2.wtm"
    carried.save(path)
    from_file = Masks.load(path)  # no model: the units come from the file
    sources = {
        "stats()": {s.name: (s.out_units, s.in_units, s.active_out, s.active_in, s.kept) for s in carried.stats()},
        "report(model)": {r["name"]: (r["out_units"], r["in_units"], r["active_out"], r["active_in"], r["kept"])
                          for r in mask_report(Masks(masks), model)["layers"]},
        "report(file)": {r["name"]: (r["out_units"], r["in_units"], r["active_out"], r["active_in"], r["kept"])
                         for r in mask_report(from_file)["layers"]},
        "file stats()": {s.name: (s.out_units, s.in_units, s.active_out, s.active_in, s.kept) for s in from_file.stats()},
    }
    for label, got in sources.items():
        assert got == want, label


class LastTokenLogits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(input_ids=x).logits[:, -1]


def test_pruned_gpt2_stats_and_report_of_its_file_agree(transformers, tmp_path):
    """A real run through a wrapper: stats() of the returned masks and the report of the saved
    file (no model) give the same units, the tied embedding's (E outputs, V tokens) included;
    re-keyed onto the bare GPT-2 the masks apply there."""
    gpt2 = tiny_gpt2(transformers)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, V, (4, P), generator=g), torch.randint(0, V, (4,), generator=g)
    masks = widetopo.prune(LastTokenLogits(gpt2), [(x, y)], 0.2, method="snip", seed=0)
    assert list(masks) == [f"model.{n}" for n in GPT2_WEIGHTS]
    stats = {s.name: (s.out_units, s.in_units, s.active_out, s.active_in, s.kept) for s in masks.stats()}
    assert stats["model.transformer.wte.weight"][:2] == (E, V)
    assert stats["model.transformer.h.0.attn.c_attn.weight"][:2] == (3 * E, E)
    masks.save(tmp_path / "m.wtm")
    rows = mask_report(Masks.load(tmp_path / "m.wtm"))["layers"]
    assert {r["name"]: (r["out_units"], r["in_units"], r["active_out"], r["active_in"], r["kept"]) for r in rows} == stats
    bare = masks.rename(strip_prefix="model.")
    before = {n: p.detach().clone() for n, p in gpt2.named_parameters()}
    bare.apply_(gpt2)
    for n in GPT2_WEIGHTS:
        assert torch.equal(dict(gpt2.named_parameters())[n].detach(), before[n] * bare[n]), n


def test_own_in_out_layer_units(in_out_registered):
    model = nn.Sequential(InOut(4, 6), nn.ReLU(), InOut(6, 3))
    m0 = torch.zeros(4, 6, dtype=torch.bool)
    m0[0, 1] = m0[0, 2] = m0[3, 2] = True  # inputs {0, 3}, outputs {1, 2}
    m2 = torch.zeros(6, 3, dtype=torch.bool)
    m2[5, 0] = True
    rep = mask_report(Masks({"0.weight": m0, "2.weight": m2}), model)
    got = [(r["out_units"], r["in_units"], r["active_out"], r["active_in"]) for r in rep["layers"]]
    assert got == [(6, 4, 2, 2), (3, 6, 1, 1)]


# ------------------------------------------------------------------------------ decay and restoration
def _reference_decay(s, m, exponent):
    """float64: S * (m / max(d_out[o] d_in[i], 1))^e on a (out, in) matrix."""
    s, mf = s.double(), m.double()
    dout, din = mf.sum(1), mf.sum(0)
    denom = (dout[:, None] * din[None, :]).clamp(min=1)
    return torch.where(m, s * denom ** -exponent, torch.zeros_like(s))


def _layouts_of_conv1d_and_linear(transformers):
    """The unit layouts the engine reads for a Conv1D(nf=7, nx=5) (weight (5, 7)) and for the
    nn.Linear(5, 7) (weight (7, 5)) computing the same map."""
    conv = nn.Sequential(transformers.pytorch_utils.Conv1D(7, 5))
    lin = nn.Sequential(nn.Linear(5, 7))
    assert tuple(conv[0].weight.shape) == (5, 7)
    return topology.unit_layouts(conv, ["0.weight"])[0], topology.unit_layouts(lin, ["0.weight"])[0]


def test_decay_on_conv1d_equals_the_transposed_linear(transformers):
    g = torch.Generator().manual_seed(1)
    s_io = torch.rand(5, 7, generator=g)                     # (in, out), as Conv1D stores it
    m_io = torch.rand(5, 7, generator=g) < 0.4
    in_out, dense = _layouts_of_conv1d_and_linear(transformers)
    a, b = s_io.clone(), s_io.t().contiguous()
    topology.density_decay_([a], [m_io], [in_out], 0.7)
    topology.density_decay_([b], [m_io.t().contiguous()], [dense], 0.7)
    torch.testing.assert_close(a, b.t())
    torch.testing.assert_close(a.double(), _reference_decay(s_io.t(), m_io.t(), 0.7).t(), rtol=1e-5, atol=1e-7)


def test_restoration_on_conv1d_equals_the_transposed_linear(transformers):
    g = torch.Generator().manual_seed(2)
    m_io = torch.rand(5, 7, generator=g) < 0.4
    n_io = torch.randn(5, 7, generator=g)
    scale = 0.1
    in_out, dense = _layouts_of_conv1d_and_linear(transformers)
    a = topology.restoration_scores([m_io], [n_io], scale, [in_out])[0]
    b = topology.restoration_scores([m_io.t().contiguous()], [n_io.t().contiguous()], scale, [dense])[0]
    torch.testing.assert_close(a, b.t())
    # hand formula on the (in, out) storage: out density of column o, in density of row i
    mf = m_io.double()
    out_d = mf.sum(0) / 5  # output unit o: kept / its fan-in (5 inputs)
    in_d = mf.sum(1) / 7   # input unit i: kept / its fan-out (7 outputs)
    want = torch.where(m_io, torch.full_like(mf, 2.0), (1 - in_d)[:, None] * (1 - out_d)[None, :] + scale * n_io.double())
    torch.testing.assert_close(a.double(), want, rtol=1e-5, atol=1e-6)


def test_effective_sparsity_of_in_out_layers_by_hand(in_out_registered):
    """in 2 -> 3 -> out 2: layer 1 keeps (0->0), (1->1); layer 2 keeps (1->0), (2->1). Only
    1 -> 1 -> 0 is an input-output path: one effective weight and one effective node each."""
    torch.manual_seed(0)
    model = nn.Sequential(InOut(2, 3, bias=False), nn.ReLU(), InOut(3, 2, bias=False))
    m0 = torch.zeros(2, 3, dtype=torch.bool)
    m0[0, 0] = m0[1, 1] = True
    m2 = torch.zeros(3, 2, dtype=torch.bool)
    m2[1, 0] = m2[2, 1] = True
    eff = effective_sparsity(model, {"0.weight": m0, "2.weight": m2}, (2,))["layers"]
    assert eff["0.weight"] == {"kept": 2, "effective": 1, "units": 3, "effective_nodes": 1}
    assert eff["2.weight"] == {"kept": 2, "effective": 1, "units": 2, "effective_nodes": 1}
    # the same through nn.Linear holding W^T and the masks transposed
    lin = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    eff_lin = effective_sparsity(lin, {"0.weight": m0.t().contiguous(), "2.weight": m2.t().contiguous()}, (2,))["layers"]
    assert eff_lin == eff


def test_prune_in_out_model_equals_the_transposed_linear_model(in_out_registered):
    """WideTopo-S rounds (scores, density decay, threshold) on InOut layers give the transposed
    masks of the same network written with nn.Linear (restorations off: their noise is drawn
    per stored (dim 0, dim 1) pair, a different draw)."""
    torch.manual_seed(0)
    a = nn.Sequential(InOut(6, 8), nn.ReLU(), InOut(8, 3))
    b = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for k in (0, 2):
            b[k].weight.copy_(a[k].weight.t())
            b[k].bias.copy_(a[k].bias)
    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(3)), torch.arange(8) % 3
    opts = dict(method="widetopo-s", seed=0, rounds=3, restorations=0)
    ma = widetopo.prune(a, [(x, y)], 0.3, **opts)
    mb = widetopo.prune(b, [(x, y)], 0.3, **opts)
    assert list(ma) == list(mb) == ["0.weight", "2.weight"]
    for n in ma:
        assert torch.equal(ma[n], mb[n].t()), n


# ------------------------------------------------------------------------------ rename
class Wrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_rename_masks_of_a_wrapper_onto_the_bare_model():
    bare = _net()
    wrapped = Wrapper(bare)
    g = torch.Generator().manual_seed(0)
    masks = Masks({n: torch.rand(p.shape, generator=g) < 0.5 for n, p in wrapped.named_parameters() if n.endswith("weight")},
                  {"method": "hand", "seed": 3}, [topology.DENSE, topology.DENSE])
    renamed = masks.rename(strip_prefix="model.")
    assert list(renamed) == ["0.weight", "2.weight"]
    assert renamed.meta == masks.meta and renamed.layouts == masks.layouts
    target = _net()
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    renamed.apply_(target)
    for n, p in target.named_parameters():
        want = before[n] * masks[f"model.{n}"] if n.endswith("weight") else before[n]
        assert torch.equal(p.detach(), want), n
    back = renamed.rename(add_prefix="model.")
    assert list(back) == list(masks) and all(torch.equal(back[n], masks[n]) for n in masks)
    assert list(masks) == ["model.0.weight", "model.2.weight"]  # the original is untouched


def test_rename_with_a_mapping_and_a_callable():
    masks = Masks({"a.weight": torch.ones(2, 2, dtype=torch.bool), "b.weight": torch.zeros(3, dtype=torch.bool)})
    assert list(masks.rename({"a.weight": "x.weight"})) == ["x.weight", "b.weight"]
    assert list(masks.rename(str.upper)) == ["A.WEIGHT", "B.WEIGHT"]
    assert list(masks.rename(lambda n: "enc." + n, strip_prefix="enc.")) == ["a.weight", "b.weight"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(strip_prefix="model."), "do not start with it"),
    (dict(mapping={"a.weight": "b.weight"}), "share a name"),
    (dict(mapping={"zzz": "q"}), "not masks"),
    (dict(mapping=lambda n: ""), "non-empty strings"),
    (dict(), "pass mapping"),
    (dict(add_prefix=""), "add_prefix must be a non-empty string"),
])
def test_rename_refuses(kwargs, match):
    masks = Masks({"a.weight": torch.ones(2, 2, dtype=torch.bool), "b.weight": torch.zeros(3, dtype=torch.bool)},
                  {"method": "hand"})
    with pytest.raises(ValueError, match=match):
        masks.rename(**kwargs)
    assert list(masks) == ["a.weight", "b.weight"] and masks.meta == {"method": "hand"}


def test_rename_refuses_a_bad_mapping_type():
    with pytest.raises(TypeError, match="mapping must be"):
        Masks({"a": torch.ones(1, dtype=torch.bool)}).rename(3)
