"""Issue #18 items 1-4: extreme option values, the decay's underflow, input_shape parsing and
overlapping op arguments are refused before any work, naming what to change."""
import pytest
import torch
from torch import nn

import widetopo
import widetopo_ext
from widetopo.engine.rounds import ZeroScoresError
from widetopo.options import format_shape, format_value, parse_assignment, parse_shape
from widetopo.scores.base import Scorer
from widetopo.scores.baselines import SynFlowOptions

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.needs_kernel("global_threshold", "apply_masks_", "mask_stats", "density_decay_")]


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def data(n=1):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 1, 4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ 1. decay underflow

class Tiny(Scorer):
    """Scores of 1e-30 that go through the density-aware decay, like WideTopo's."""

    name = "tiny"
    data_dependent = False
    decay = True

    def score(self, ctx, batches):
        return [torch.full_like(p, 1e-35, dtype=torch.float32) * (1 + torch.arange(p.numel()).view_as(p) / p.numel())
                for p in ctx.prunable]


def test_decay_underflow_is_refused_naming_compression_factor():
    # Round 2 of 2 at density 0.1 decays with exponent c/gamma = 0.5/0.1 = 5 (c = -log10 0.316);
    # out_deg * in_deg ~ 20 * 5 on the wide layer, so the factor ~ 1e-10 takes scores of 1e-35 below
    # float32's smallest denormal (1.4e-45): every kept score is 0 and the cut would be the tie rule.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3))
    before = state(model)
    with pytest.raises(ZeroScoresError, match="compression_factor"):
        widetopo.prune(model, data(), 0.1, method=Tiny(), rounds=2, compression_factor=0.1, verbose=False)
    assert_same(model, before)
    # the published gamma = 5 (exponent 0.1) keeps every score far above float32's smallest
    masks = widetopo.prune(model, data(), 0.1, method=Tiny(), rounds=2, verbose=False)
    assert masks.kept == round(0.1 * (16 * 64 + 64 * 3))


@pytest.mark.parametrize("gamma", [0.01, 0.0, -1.0, float("inf")])
def test_compression_factor_below_its_working_range_is_refused(gamma):
    with pytest.raises(ValueError, match=r"compression_factor must be (in \[0\.1, |a finite number)"):
        widetopo.prune(tiny_mlp(), data(), 0.5, method="widetopo-s", compression_factor=gamma, verbose=False)


# ------------------------------------------------------------------ 2. option ranges

@pytest.mark.parametrize("method, option, value, expected", [
    ("erk-random", "power_scale", 1000, r"power_scale must be in \[0, 10\]"),
    ("snip", "ignore_index", 2 ** 70, r"ignore_index must be an integer in \[-2\*\*63, 2\*\*63 - 1\]"),
    ("widetopo-s", "mu1", 10 ** 400, r"mu1 must be a finite number, got .*beyond float range"),
    ("widetopo-s", "mu2", 1e300, r"mu2 must be in \[0, 1e\+06\]"),
    ("widetopo-s", "noise_scale", 1e300, r"noise_scale must be in \[0, 0\.01\]"),
    ("widetopo-s", "eps", 1e300, r"eps must be in \[1e-07, 1\]"),
    ("magnitude", "device", "meta", r"device must be 'cpu' or a CUDA device"),
    ("magnitude", "seed", 2 ** 64, r"seed must be an integer in \[-2\*\*63"),
])
def test_extreme_option_values_are_refused_naming_the_option_and_range(method, option, value, expected):
    model = tiny_mlp()
    before = state(model)
    with pytest.raises(ValueError, match=expected):
        widetopo.prune(model, data(), 0.5, method=method, verbose=False, **{option: value})
    assert_same(model, before)


def test_error_message_of_a_huge_int_stays_short():
    with pytest.raises(ValueError) as info:
        widetopo.prune(tiny_mlp(), data(), 0.5, method="widetopo-s", mu1=10 ** 4000, verbose=False)
    assert len(str(info.value)) < 200


# ------------------------------------------------------------------ 3. input_shape

@pytest.mark.parametrize("text, shape", [("66", (66,)), ("1x8x8", (1, 8, 8)), ("3,32,32", (3, 32, 32)),
                                         (" 2 X 4 ", (2, 4)), ((1, 8, 8), (1, 8, 8)), ([5], (5,))])
def test_input_shape_parses(text, shape):
    assert parse_shape("input_shape", text) == shape
    assert SynFlowOptions(input_shape=text).input_shape == shape


@pytest.mark.parametrize("bad", [(6.9,), (6.0,), (True, 2), (), "", "x", "1x-8", "1.5x2", "0x3", (0, 3), 66, b"66"])
def test_bad_input_shape_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="input_shape"):
        SynFlowOptions(input_shape=bad)


@pytest.mark.parametrize("shape", [(1, 8, 8), (66,), (3, 224, 224)])
def test_printed_shape_parses_back(shape):
    assert format_shape(shape) == "x".join(map(str, shape))
    assert parse_assignment([SynFlowOptions], "input_shape=" + format_value(shape)) == ("input_shape", shape)
    assert parse_assignment([SynFlowOptions], "input_shape=" + format_value(None)) == ("input_shape", None)


def test_synflow_with_a_wrong_input_shape_names_it():
    model = tiny_mlp()
    before = state(model)
    with pytest.raises(ValueError, match=r"input_shape=1x8x8"):
        widetopo.prune(model, data(), 0.5, method="synflow", input_shape=(1, 8, 8), verbose=False)
    assert_same(model, before)


# ------------------------------------------------------------------ 4. overlapping op arguments

def test_partially_overlapping_output_and_input_of_one_entry_are_refused():
    x = torch.arange(1.0, 9.0)
    before = x.clone()
    with pytest.raises(RuntimeError, match="overlap"):
        widetopo_ext.accumulate_score_([x[1:]], [x[:-1]])
    assert torch.equal(x, before)  # nothing written
    sq = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="overlap"):
        widetopo_ext.accumulate_score_([sq], [sq.t()])
    with pytest.raises(RuntimeError, match="overlap"):
        widetopo_ext.accumulate_score_([x[:4]], [x[2:6]], [x[4:]])  # output meets the input a


def test_the_same_view_as_output_and_input_is_still_accepted():
    # reads and writes each element at the same position: s <- s + |s * s|, elementwise
    s = torch.tensor([1.0, -2.0, 3.0])
    widetopo_ext.accumulate_score_([s], [s], [s])
    torch.testing.assert_close(s, torch.tensor([1.0 + 1.0, -2.0 + 4.0, 3.0 + 9.0]))
    m = torch.tensor([True, False, True])
    p = torch.tensor([1.0, 2.0, 3.0])
    widetopo_ext.apply_masks_([p], [m])
    assert p.tolist() == [1.0, 0.0, 3.0]


# ------------------------------------------------------------------ 7. --init files with code

class _RunsCode:
    def __reduce__(self):
        import os
        return (os.getcwd, ())


@pytest.mark.parametrize("payload, names", [({"w": _RunsCode()}, "posix.getcwd"),
                                            ({"w": __import__("numpy").zeros(3)}, "numpy")])
def test_init_file_with_python_objects_gets_our_own_message(tmp_path, payload, names):
    from widetopo.experiments.pretrained import read_state_dict

    path = tmp_path / "init.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError) as info:
        read_state_dict(path)
    text = str(info.value)
    assert "weights_only=False" not in text and "\x1b[" not in text  # no advice to run the file's code, no ANSI
    assert str(path) in text and names in text and "torch.save(model.state_dict(), path)" in text


# ------------------------------------------------------------------ 8. masks already applied, save(meta=)

def test_prune_refuses_a_model_in_apply_masks_form_naming_remove_masks():
    model = tiny_mlp()
    masks = widetopo.prune(model, data(), 0.5, method="magnitude", verbose=False)
    widetopo.apply_masks(model, masks)
    before = state(model)
    with pytest.raises(ValueError, match=r"1\.weight_orig.*widetopo\.remove_masks\(model\)"):
        widetopo.prune(model, data(), 0.25, method="magnitude", verbose=False)
    assert_same(model, before)
    widetopo.remove_masks(model)
    again = widetopo.prune(model, data(), 0.25, method="magnitude", verbose=False)
    assert sorted(again) == ["1.weight", "3.weight"]


def test_masks_save_takes_meta(tmp_path):
    masks = widetopo.prune(tiny_mlp(), data(), 0.5, method="magnitude", verbose=False)
    path = tmp_path / "m.wtm"
    masks.save(path, meta={"note": "trial 3", "method": "renamed"})
    back = widetopo.load_masks(path)
    assert back.meta["note"] == "trial 3" and back.meta["method"] == "renamed"
    assert masks.meta["method"] == "magnitude" and "note" not in masks.meta  # the object is unchanged
    assert all(torch.equal(back[k], masks[k]) for k in masks)


# ------------------------------------------------------------------ 6. a full disk

class _FullDisk:
    """A file whose writes fail after a few bytes, as on a full disk."""

    def __init__(self, path, mode, **kwargs):
        self.f = open(path, mode, **kwargs)

    def write(self, data):
        import errno
        self.f.write(data[:7] if isinstance(data, str) else bytes(data[:7]))
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        return False

    def __getattr__(self, name):  # flush, fileno, ...
        return getattr(self.f, name)


def test_checkpoint_on_a_full_disk_names_the_path_and_errno_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    from widetopo import files

    path = tmp_path / "run.ckpt"
    monkeypatch.setattr(files, "open", _FullDisk, raising=False)
    with pytest.raises(OSError) as info:
        widetopo.prune(tiny_mlp(), data(), 0.25, method="magnitude", rounds=2, checkpoint=path, verbose=False)
    assert info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value) and "errno 28" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # neither a checkpoint nor a temporary


# ------------------------------------------------------------------ 9. progress off a terminal, plots

def test_progress_logs_lines_when_stderr_is_not_a_terminal(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="widetopo.progress"):
        widetopo.prune(tiny_mlp(), data(), 0.1, method="magnitude", rounds=20, verbose=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "widetopo.progress"]
    assert len(lines) == 10  # one line per 10 %
    assert [line.split(" (")[1].split("%")[0] for line in lines] == [str(p) for p in range(10, 101, 10)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="widetopo.progress"):
        widetopo.prune(tiny_mlp(), data(), 0.1, method="magnitude", rounds=20, verbose=False)
    assert not [r for r in caplog.records if r.name == "widetopo.progress"]


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_report_plots_in_each_format_with_labelled_axes(tmp_path, fmt, monkeypatch):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install matplotlib)")
    from matplotlib.axes import Axes

    from widetopo.sparsity.report import mask_report, plot_report

    labels = []
    real = Axes.set_ylabel
    monkeypatch.setattr(Axes, "set_ylabel", lambda self, text, *a, **k: (labels.append(text), real(self, text, *a, **k))[1])
    masks = widetopo.prune(tiny_mlp(), data(), 0.5, method="magnitude", verbose=False)
    paths = plot_report(mask_report(masks), tmp_path, fmt=fmt, dpi=50)
    assert [p.rsplit(".", 1)[1] for p in paths] == [fmt, fmt]
    head = open(paths[0], "rb").read(5)
    assert head == {"png": b"\x89PNG\r", "pdf": b"%PDF-", "svg": b"<?xml"}[fmt]
    assert len(labels) == 3 and all(labels)  # density axis and both unit axes
    with pytest.raises(ValueError, match="plot format must be one of png, pdf, svg"):
        plot_report(mask_report(masks), tmp_path, fmt="jpg")
    with pytest.raises(ValueError, match=r"dpi must be a number in \[10, 1200\]"):
        plot_report(mask_report(masks), tmp_path, dpi=0)


# ------------------------------------------------------------------ (#15 item 5) checkpoints by content

@pytest.mark.parametrize("change", ["bias", "sign", "buffer"])
def test_checkpoint_of_a_model_differing_in_any_value_is_refused(tmp_path, change):
    from widetopo.engine.checkpoint import CheckpointMismatch

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    path = tmp_path / "run.ckpt"
    first = widetopo.prune(model(), data(), 0.25, method="magnitude", rounds=2, checkpoint=path, verbose=False)
    other = model()
    with torch.no_grad():
        if change == "bias":
            other[1].bias.add_(0.5)  # not prunable, not in any score of magnitude
        elif change == "sign":
            other[1].weight.neg_()  # same |theta|: magnitude scores and masks are identical
        else:
            other[2].running_var.fill_(2.0)
    with pytest.raises(CheckpointMismatch, match="model_digest"):
        widetopo.prune(other, data(), 0.25, method="magnitude", rounds=2, checkpoint=path, verbose=False)
    again = widetopo.prune(model(), data(), 0.25, method="magnitude", rounds=2, checkpoint=path, verbose=False)
    assert all(torch.equal(again[k], first[k]) for k in first)  # the same model resumes


# ------------------------------------------------------------------ 3, 5, 6, 8, 9: compare and the CLI

GRID = dict(epochs=0, samples=24, prune_batch_size=24, max_train_samples=48, max_test_samples=24, batch_size=24)


@pytest.fixture(scope="module")
def journal(tmp_path_factory):
    """A finished 2-cell grid (dense + a synflow variant with input_shape set), made once."""
    from widetopo.experiments import compare

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("grid")
        result = compare.run_grid(["synflow:input_shape=1x8x8"], [0.2], [0], out, quiet=True, **GRID)
    finally:
        torch.set_num_threads(before)
    return out, result


def test_compare_variant_with_input_shape_is_stored_in_a_form_that_reads_back(journal):
    from widetopo.experiments import compare

    out, result = journal
    assert result["failed"] == [] and [r["method"] for r in result["grid_rows"]] == ["dense", "synflow:input_shape=1x8x8"]
    name, options = compare.parse_variant(result["grid_rows"][1]["method"])
    assert (name, options) == ("synflow", {"input_shape": (1, 8, 8)})
    again = compare.run_grid(["synflow:input_shape=1x8x8"], [0.2], [0], out, quiet=True, **GRID)
    assert again["ran"] == 0 and again["skipped"] == 2  # the stored cell is recognised, not rerun


def _edited(journal, tmp_path, edit):
    import json
    import shutil

    src, _ = journal
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    data = json.loads((out / "results.json").read_text())
    edit(data)
    (out / "results.json").write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["rows"][1].pop("seed"), r"row 1 has no field 'seed'"),
    (lambda d: d["rows"][0].__setitem__("density_target", [1.0]), r"row 0, field 'density_target' must be a number"),
    (lambda d: d["rows"].__setitem__(1, 7), r"row 1 must be an object"),
    (lambda d: d["rows"][1].__setitem__("test_accuracy", None), r"row 1, field 'test_accuracy' must be a number, got None"),
    (lambda d: d["rows"][1].__setitem__("seed", True), r"row 1, field 'seed' must be an integer"),
    (lambda d: d["rows"].append(dict(d["rows"][1])), r"rows 1 and 2 are the same cell \(method synflow"),
    (lambda d: d["failed"].append({"method": "snip", "seed": 0}), r"failed cell 0 has no field 'density_target'"),
])
def test_damaged_journal_rows_are_named_by_row_and_field(journal, tmp_path, edit, message):
    from widetopo.experiments import compare

    out = _edited(journal, tmp_path, edit)
    with pytest.raises(compare.CompareError, match=message):
        compare.run_grid(["synflow:input_shape=1x8x8"], [0.2], [0], out, quiet=True, **GRID)


def test_journal_on_a_full_disk_names_the_path_and_errno_and_leaves_no_temporary(journal, tmp_path, monkeypatch):
    import errno

    from widetopo.experiments import compare

    out = _edited(journal, tmp_path, lambda d: None)
    before = (out / "results.json").read_text()
    from widetopo import files

    monkeypatch.setattr(files, "open", _FullDisk, raising=False)
    with pytest.raises(OSError) as info:
        compare.write_journal(out, {}, [])
    assert info.value.errno == errno.ENOSPC and str(out / "results.json") in str(info.value)
    assert "errno 28" in str(info.value)
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert (out / "results.json").read_text() == before  # the previous journal is intact


def test_cli_usage_and_quiet_listing(capsys, monkeypatch):
    import os

    from widetopo.cli import main

    assert main(["-q", "train", "--epochs", "1"]) == 2  # neither a mask file nor --dense: a usage error
    assert "give a mask file, or --dense" in capsys.readouterr().err
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))  # a busy machine
    assert main(["methods"]) == 0
    listing = capsys.readouterr()
    assert "machine busy" not in listing.err
    # every option line of a method has its type column at the same position
    lines = [ln for ln in listing.out.splitlines() if ln.startswith("    --option ")]
    by_method, current = {}, None
    for ln in listing.out.splitlines():
        if not ln.startswith("    "):
            current = ln.split(" ")[0]
        elif ln.startswith("    --option "):
            by_method.setdefault(current, []).append(ln)
    assert lines and len(by_method) >= 10
    for method, opts in by_method.items():
        starts = {len(ln) - len(ln[len("    --option "):].split("  ", 1)[1].lstrip()) for ln in opts}
        assert len(starts) == 1, (method, opts)


def test_cli_report_plot_format_and_dpi(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install matplotlib)")
    from widetopo.cli import main

    masks = widetopo.prune(tiny_mlp(), data(), 0.5, method="magnitude", verbose=False)
    masks.save(tmp_path / "m.wtm")
    assert main(["-q", "report", str(tmp_path / "m.wtm"), "--plots", str(tmp_path / "p"), "--plot-format", "svg",
                 "--dpi", "72"]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["m_density.svg", "m_units.svg"]
    assert main(["-q", "report", str(tmp_path / "m.wtm"), "--plots", str(tmp_path / "p"), "--dpi", "5"]) == 2
    assert "--dpi" in capsys.readouterr().err
