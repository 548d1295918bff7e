"""mask_report against hand-computed counts; JSON, table and PNG outputs."""
import json
import sys

import pytest
import torch
from torch import nn

from widetopo.sparsity.masks import Masks
from widetopo.sparsity.report import format_table, mask_report, plot_report, write_json

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def hand_masks():
    # conv 3 out x 2 in x 2x2 kernel: keep out 0 <- in 1 (2 entries) and out 2 <- in 1 (1 entry)
    conv = torch.zeros(3, 2, 2, 2, dtype=torch.bool)
    conv[0, 1, 0, 0] = conv[0, 1, 1, 1] = conv[2, 1, 0, 1] = True
    lin = torch.zeros(4, 3, dtype=torch.bool)  # collapsed
    bias = torch.tensor([True, False, True, True, False])
    return Masks({"conv.weight": conv, "fc.weight": lin, "b": bias}, meta={"method": "snip", "seed": 2})


def test_counts_match_hand_computation():
    rep = mask_report(hand_masks())
    conv, fc, b = rep["layers"]
    assert conv == {"name": "conv.weight", "shape": [3, 2, 2, 2], "numel": 24, "kept": 3, "density": 3 / 24,
                    "out_units": 3, "in_units": 2, "active_out": 2, "active_in": 1, "collapsed": None}
    assert fc["kept"] == 0 and fc["active_out"] == 0 and fc["active_in"] == 0 and fc["collapsed"] == "no kept weights"
    assert (b["kept"], b["out_units"], b["active_out"], b["active_in"], b["collapsed"]) == (3, 5, 3, 3, None)
    assert rep["collapsed"] == ["fc.weight"]
    assert rep["total"] == {"numel": 41, "kept": 6, "density": 6 / 41, "layers": 3}
    assert rep["meta"] == {"method": "snip", "seed": 2}


def test_random_masks_against_pure_pytorch_counts():
    gen = torch.Generator().manual_seed(0)
    m = torch.rand(7, 5, 3, generator=gen) < 0.08
    rep = mask_report({"w": m})
    row = rep["layers"][0]
    assert row["kept"] == int(m.sum())
    assert row["active_out"] == int(m.flatten(1).any(1).sum())
    assert row["active_in"] == int(m.any(2).any(0).sum())


def test_with_model_totals_and_checks():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = {"0.weight": torch.ones(4, 3, dtype=torch.bool), "2.weight": torch.zeros(2, 4, dtype=torch.bool)}
    rep = mask_report(masks, model)
    assert [r["module"] for r in rep["layers"]] == ["Linear", "Linear"]
    total = 12 + 4 + 8 + 2
    assert rep["total"]["model_params"] == total
    assert rep["total"]["model_density"] == pytest.approx((total - 8) / total)
    with pytest.raises(ValueError, match="shape"):
        mask_report({"0.weight": torch.ones(3, 3, dtype=torch.bool)}, model)
    with pytest.raises(ValueError, match="not a parameter"):
        mask_report({"9.weight": torch.ones(3, 3, dtype=torch.bool)}, model)
    with pytest.raises(TypeError, match="bool"):
        mask_report({"0.weight": torch.ones(4, 3)})


def test_json_and_table(tmp_path):
    rep = mask_report(hand_masks())
    path = write_json(rep, tmp_path / "r.json")
    assert json.loads(open(path).read()) == rep
    text = format_table(rep)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["layer", "shape", "kept"]
    conv_line = next(line for line in lines if line.startswith("conv.weight"))
    assert conv_line.split() == ["conv.weight", "3x2x2x2", "3", "24", "0.1250", "2/3", "1/2"]
    assert "COLLAPSED: no kept weights" in next(line for line in lines if line.startswith("fc.weight"))
    assert "1 collapsed layer(s): fc.weight" in text


def test_png_plots(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed; plots are optional")
    paths = plot_report(mask_report(hand_masks()), tmp_path / "plots", prefix="x")
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["x_density.png", "x_units.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_report(mask_report(hand_masks()), tmp_path)


def test_effective_sparsity_in_report_table_and_plots(tmp_path):
    # 4 -> 3 -> 2 MLP: hidden unit 0 keeps no input, so the output weights reading it are kept
    # but not effective; by hand: layer 1 keeps 3 (all effective), layer 2 keeps 4 of which the
    # 2 reading unit 0 are dead.
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    m1 = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    m2 = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    masks = Masks({"1.weight": m1, "3.weight": m2}, {"in_channels": 4, "image_size": 1})
    rep = mask_report(masks, model)
    l1, l2 = rep["layers"]
    assert (l1["effective"], l1["effective_nodes"], l1["units"]) == (3, 2, 3)
    assert (l2["effective"], l2["effective_nodes"], l2["units"]) == (2, 2, 2)
    assert l2["effective_density"] == pytest.approx(2 / 6)
    t = rep["total"]
    assert (t["kept"], t["effective"], t["nodes"], t["effective_nodes"]) == (7, 5, 5, 4)
    assert t["effective_density"] == pytest.approx(5 / 18) and t["node_ratio"] == pytest.approx(4 / 5)
    assert rep["input_shape"] == [4, 1, 1]
    text = format_table(rep)
    line = next(x for x in text.splitlines() if x.startswith("3.weight"))
    assert line.split() == ["3.weight", "2x3", "4", "6", "0.6667", "2", "0.3333", "2/2", "3/3", "2/2"]
    assert "node ratio 0.8000" in text
    # without an input shape (no metadata, none given) the effective columns are left out
    plain = mask_report(dict(masks), model)
    assert "effective" not in plain["total"] and "effective" not in format_table(plain).splitlines()[0]
    assert mask_report(dict(masks), model, input_shape=(4,))["total"]["effective"] == 5
    pytest.importorskip("matplotlib")
    assert len(plot_report(rep, tmp_path, prefix="e")) == 2


def test_report_units_follow_the_conv_topology():
    """A depthwise conv (C, 1, k, k) has C input units; a transposed conv (in, out, k, k) is read
    with out = dim 1 (hand counts)."""
    from torch import nn

    from widetopo.sparsity.report import mask_report

    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ConvTranspose2d(4, 6, 2))
    masks = {"0.weight": torch.ones(4, 1, 3, 3, dtype=torch.bool), "1.weight": torch.zeros(4, 6, 2, 2, dtype=torch.bool)}
    masks["1.weight"][0, :3] = True  # input channel 0 feeds output channels 0..2
    rows = {r["name"]: r for r in mask_report(masks, model)["layers"]}
    assert (rows["0.weight"]["out_units"], rows["0.weight"]["in_units"]) == (4, 4)
    assert (rows["0.weight"]["active_out"], rows["0.weight"]["active_in"]) == (4, 4)
    assert (rows["1.weight"]["out_units"], rows["1.weight"]["in_units"]) == (6, 4)
    assert (rows["1.weight"]["active_out"], rows["1.weight"]["active_in"]) == (3, 1)
