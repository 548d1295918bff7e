"""`widetopo compare` end to end on a tiny setting: journal, resume after an interrupted cell,
option-change detection, CSV/JSON contents, summary and plots."""
import csv
import re
import json
import statistics

import pytest
import torch

import widetopo.experiments.compare as compare
from widetopo.cli import main
from widetopo.sparsity.maskfile import load_masks, read_header

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("sklearn", reason="compare tests use scikit-learn's bundled digits dataset")

TINY = ["--methods", "random,snip", "--densities", "0.2,0.05", "--seeds", "0", "--epochs", "1",
        "--samples", "48", "--prune-batch-size", "24", "--max-train-samples", "96", "--max-test-samples", "48",
        "--batch-size", "32"]


def test_plan_order():
    cells = compare.plan(["a", "b"], [0.1, 0.01], [0, 1])
    assert [c.key for c in cells[:5]] == [("dense", 1.0, 0), ("a", 0.1, 0), ("a", 0.01, 0), ("b", 0.1, 0), ("b", 0.01, 0)]
    assert len(cells) == 2 * (1 + 4) and cells[5].key == ("dense", 1.0, 1)


def test_aggregate_against_statistics():
    rows = [{"method": "m", "density_target": 0.1, "seed": s, "test_accuracy": a, "kept_fraction": 0.1,
             "effective_density": e, "node_ratio": n, "prune_seconds": 1.0, "train_seconds": 2.0}
            for s, a, e, n in [(0, 0.5, 0.08, 0.9), (1, 0.7, 0.09, 0.8), (2, 0.9, 0.07, 0.7)]]
    (agg,) = compare.aggregate(rows)
    assert agg["n"] == 3
    assert agg["test_accuracy"] == pytest.approx(statistics.mean([0.5, 0.7, 0.9]))
    assert agg["test_accuracy_std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]))
    assert agg["node_ratio_std"] == pytest.approx(statistics.stdev([0.9, 0.8, 0.7]))


def test_compare_end_to_end_resume_and_option_change(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    calls = []
    real = compare.run_cell

    def interrupted(recipe, cell, *rest):
        calls.append(cell.key)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while the third cell is in flight
        return real(recipe, cell, *rest)

    monkeypatch.setattr(compare, "run_cell", interrupted)
    assert main(["-q", "compare", "-o", str(out)] + TINY) == 130
    journal = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["density_target"]) for r in journal["rows"]] == [("dense", 1.0), ("random", 0.2)]
    capsys.readouterr()

    calls.clear()
    monkeypatch.setattr(compare, "run_cell", lambda *a: (calls.append(a[1].key), real(*a))[1])
    assert main(["compare", "-q", "-o", str(out)] + TINY) == 0  # -q after the command as well
    assert calls == [("random", 0.05, 0), ("snip", 0.2, 0), ("snip", 0.05, 0)]  # only the unfinished cells
    stdout = capsys.readouterr().out
    assert "2 already in the journal" in stdout

    # the summary table on stdout: mean ± std per method and density
    lines = [line for line in stdout.splitlines() if line.startswith(("dense", "random", "snip"))]
    assert [line.split()[:2] for line in lines] == [["dense", "1"], ["random", "0.2"], ["random", "0.05"],
                                                     ["snip", "0.2"], ["snip", "0.05"]]
    assert all("±" in line for line in lines)

    # results.json and results.csv: one row per cell, the listed columns
    journal = json.loads((out / "results.json").read_text())
    rows = journal["rows"]
    assert len(rows) == 5 and journal["options"]["epochs"] == 1
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5
    for column in ("method", "density_target", "kept_fraction", "effective_density", "node_ratio", "test_accuracy",
                   "prune_seconds", "train_seconds", "seed", "widetopo_version", "torch_version", "options"):
        assert column in table[0]
    assert json.loads(table[0]["options"]) == journal["options"]
    dense = rows[0]
    assert dense["method"] == "dense" and dense["kept_fraction"] == 1.0 and dense["node_ratio"] == 1.0
    assert dense["effective_density"] == 1.0 and dense["mask_file"] is None
    for row, line in zip(rows, table):
        assert float(line["test_accuracy"]) == pytest.approx(row["test_accuracy"])
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["train_seconds"] > 0
        if row["method"] == "dense":
            continue
        masks = load_masks(out / row["mask_file"])
        assert row["kept_fraction"] == pytest.approx(masks.density)
        assert masks.kept == round(row["density_target"] * masks.numel)  # exact-K
        assert row["collapsed"] == "; ".join(n for n, m in masks.items() if not m.any())  # a cnn: no attention blocks
        assert row["effective"] <= row["kept"] == masks.kept
        assert 0.0 < row["node_ratio"] <= 1.0 and row["nodes"] == dense["nodes"]
        meta = read_header(out / row["mask_file"])["meta"]
        assert meta["seed"] == row["seed"] and meta["model"] == "cnn"
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "node_ratio.png").exists()

    # a third run has nothing left to do
    calls.clear()
    assert main(["-q", "compare", "-o", str(out)] + TINY) == 0
    assert calls == []
    capsys.readouterr()

    # a result-affecting option changed: refused, the journal is left as it was
    before = (out / "results.json").read_bytes()
    argv = ["-q", "compare", "-o", str(out)] + TINY
    argv[argv.index("--epochs") + 1] = "2"
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "other options" in err and "epochs: 1 -> 2" in err and err.endswith("\n")
    assert calls == [] and (out / "results.json").read_bytes() == before

    # more densities only add cells
    argv = ["-q", "compare", "-o", str(out), "--no-plots"] + TINY
    argv[argv.index("--densities") + 1] = "0.2,0.05,0.1"
    argv[argv.index("--methods") + 1] = "random"
    assert main(argv) == 0
    assert calls == [("random", 0.1, 0)]


def _rows():
    rows = []
    for method, accs in (("random", [0.5, 0.3]), ("snip", [0.6, 0.4]), ("synflow", [0.62, 0.45])):
        for density, acc in zip((0.1, 0.01), accs):
            for seed, delta in ((0, 0.0), (1, 0.02)):
                rows.append({"method": method, "density_target": density, "seed": seed, "test_accuracy": acc + delta,
                             "kept_fraction": density, "effective_density": density * 0.9, "node_ratio": 0.8 - delta,
                             "prune_seconds": 0.1, "train_seconds": 1.0, "model": "cnn", "dataset": "digits", "epochs": 1})
    rows += [{"method": "dense", "density_target": 1.0, "seed": s, "test_accuracy": 0.9 + s * 0.01, "kept_fraction": 1.0,
              "effective_density": 1.0, "node_ratio": 1.0, "prune_seconds": 0.0, "train_seconds": 1.0,
              "model": "cnn", "dataset": "digits", "epochs": 1} for s in (0, 1)]
    return rows


def test_plots_have_one_line_per_method_and_a_dense_line(tmp_path):
    pytest.importorskip("matplotlib")
    fig = compare.accuracy_figure(_rows())
    (ax,) = fig.axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["random", "snip", "synflow", "dense (0.905)"]
    assert ax.get_xscale() == "log"
    snip = ax.get_lines()[1]
    assert list(snip.get_xdata()) == [0.01, 0.1] and list(snip.get_ydata()) == pytest.approx([0.41, 0.61])
    assert len(ax.collections) >= 3  # a ± std band per method
    assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
    fig = compare.node_ratio_figure(_rows())
    assert [line.get_label() for line in fig.axes[0].get_lines()][:3] == ["random", "snip", "synflow"]
    paths = compare.save_plots(_rows(), tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["accuracy.png", "node_ratio.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "node_ratio.png"]


def test_compare_usage_errors(tmp_path, capsys):
    assert main(["compare", "--methods", "random,magic"]) == 2
    assert "invalid method(s) magic" in capsys.readouterr().err
    assert main(["compare", "--densities", "0.1,2"]) == 2
    assert "density must be in (0, 1]" in capsys.readouterr().err
    assert main(["compare", "--seeds", "0,0"]) == 2
    assert "distinct" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["-q", "compare", "-o", str(blocker / "sub")] + TINY) == 1
    err = capsys.readouterr().err
    assert str(blocker) in err and "is a file" in err


def test_every_registered_method_is_accepted():
    from widetopo.cli import build_parser
    from widetopo.methods import all_methods

    names = [m.name for m in all_methods()]
    assert len(names) >= 6
    assert build_parser().parse_args(["compare", "--methods", "all"]).methods == names
    assert build_parser().parse_args(["compare", "--methods", ",".join(reversed(names))]).methods == names[::-1]
    aliased = [m for m in all_methods() if m.aliases]
    for m in aliased:  # an alias names its method
        assert build_parser().parse_args(["compare", "--methods", m.aliases[0]]).methods == [m.name]


def test_compare_with_init_file_records_its_checksum(tmp_path, capsys):
    import hashlib

    from widetopo.models import build_model

    torch.manual_seed(42)
    init = tmp_path / "init.pt"
    torch.save({"state_dict": build_model("cnn", 1, 10, 8).state_dict()}, init)
    out = tmp_path / "cmp"
    argv = ["-q", "compare", "-o", str(out), "--init", str(init), "--no-plots", "--methods", "magnitude",
            "--densities", "0.1", "--seeds", "0,1", "--epochs", "0"] + TINY[TINY.index("--samples"):]
    assert main(argv) == 0
    journal = json.loads((out / "results.json").read_text())
    assert journal["options"]["init_sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()
    # the same initial weights for both seeds: magnitude masks are identical
    m0, m1 = (load_masks(out / "masks" / f"magnitude-d0.1-s{s}.wtm") for s in (0, 1))
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    assert read_header(out / "masks" / "magnitude-d0.1-s0.wtm")["meta"]["init_file"] == str(init.resolve())
    capsys.readouterr()
    torch.save({"state_dict": build_model("cnn", 1, 10, 8).state_dict()}, init)  # another file, same name
    assert main(argv) == 1
    assert "init_sha256" in capsys.readouterr().err


def test_a_failing_cell_is_recorded_and_the_others_run(tmp_path, monkeypatch, capsys):
    """A method that refuses a cell (here: every score 0) does not abort the experiment: the
    other cells run, the failure is journaled and reported, the exit status is 1, and a rerun
    tries the failed cell again."""
    import json

    import widetopo.cli as cli
    from widetopo.scores.baselines import MagnitudeScorer

    monkeypatch.setattr(MagnitudeScorer, "score", lambda self, ctx, batches: [p * 0 for p in ctx.prunable])
    out = tmp_path / "cmp"
    argv = ["-q", "compare", "--methods", "magnitude,snip", "--densities", "0.2", "--seeds", "0", "--epochs", "1",
            "--samples", "64", "--max-train-samples", "128", "--max-test-samples", "64", "--no-plots", "-o", str(out)]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "failed: magnitude d=0.2 s0: ZeroScoresError" in captured.out
    journal = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in journal["rows"]] == ["dense", "snip"]
    assert [f["method"] for f in journal["failed"]] == ["magnitude"]
    other = [a if a != "magnitude,snip" else "snip" for a in argv]  # a run without that cell keeps its record
    assert cli.main(other) == 0
    assert [f["method"] for f in json.loads((out / "results.json").read_text())["failed"]] == ["magnitude"]
    monkeypatch.undo()
    assert cli.main(argv) == 0  # the rerun runs only the failed cell, which now works
    journal = json.loads((out / "results.json").read_text())
    assert sorted(r["method"] for r in journal["rows"]) == ["dense", "magnitude", "snip"] and journal["failed"] == []


def test_method_variants_with_options_are_their_own_cells(tmp_path, capsys):
    import json

    import widetopo.cli as cli
    from widetopo.sparsity.masks import Masks

    out = tmp_path / "cmp"
    argv = ["-q", "compare", "--methods", "random,random:distribution=normal", "--densities", "0.3", "--seeds", "0",
            "--epochs", "0", "--samples", "32", "--max-train-samples", "64", "--max-test-samples", "32",
            "--no-plots", "-o", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "random", "random:distribution=normal"]
    normal = Masks.load(out / rows[2]["mask_file"])
    uniform = Masks.load(out / rows[1]["mask_file"])
    assert normal.meta["distribution"] == "normal" and uniform.meta["distribution"] == "uniform"
    assert any(not (normal[n] == uniform[n]).all() for n in normal)
    assert cli.main(argv[:3] + ["random:nope=1"] + argv[4:]) == 2
    assert "unknown option 'nope'" in capsys.readouterr().err


def test_run_grid_from_python_and_the_cli_resumes_it(tmp_path, capsys):
    """compare.run_grid with explicit settings: the rows, a mask file equal to a global top-k of
    |theta| of the seed's initialization computed here, and a journal the CLI accepts as its own
    (same settings -> nothing left to run)."""
    from widetopo.models import build_model

    out = tmp_path / "grid"
    settings = dict(epochs=1, samples=48, prune_batch_size=24, max_train_samples=96, max_test_samples=48, batch_size=32)
    result = compare.run_grid(["magnitude"], [0.2], [1], out, **settings)
    assert result["ran"] == 2 and result["skipped"] == 0 and result["failed"] == []
    rows = result["grid_rows"]
    assert [(r["method"], r["density_target"], r["seed"]) for r in rows] == [("dense", 1.0, 1), ("magnitude", 0.2, 1)]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["epochs"] == 1 for r in rows)
    masks = load_masks(out / rows[1]["mask_file"])
    torch.manual_seed(1)
    params = dict(build_model("cnn", 1, 10, 8).named_parameters())
    values = torch.cat([params[n].detach().abs().flatten() for n in masks])
    k = round(0.2 * values.numel())
    threshold = values.sort(descending=True).values[k - 1]
    for name, m in masks.items():
        assert torch.equal(m, params[name].detach().abs() >= threshold), name
    argv = ["-q", "compare", "-o", str(out), "--no-plots", "--methods", "magnitude", "--densities", "0.2", "--seeds", "1",
            "--epochs", "1", "--samples", "48", "--prune-batch-size", "24", "--max-train-samples", "96",
            "--max-test-samples", "48", "--batch-size", "32"]
    assert main(argv) == 0
    assert "ran 0 cell(s)" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, message", [
    (dict(methods="snip"), "methods must be a non-empty list"),
    (dict(methods=["snip", "magic"]), "unknown method 'magic'"),
    (dict(methods=["random:nope=1"]), "unknown option 'nope'"),
    (dict(densities=[0.1, 1.5]), "densities must be numbers in (0, 1]"),
    (dict(seeds=[0, 0]), "seeds must be distinct integers"),
    (dict(epochs_typo=1), "unknown setting(s) epochs_typo"),
])
def test_run_grid_bad_arguments_are_refused_before_any_work(tmp_path, kwargs, message):
    args = {"methods": ["snip"], "densities": [0.1], "seeds": [0], "out_dir": tmp_path / "x", **kwargs}
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        compare.run_grid(**args)
    assert not (tmp_path / "x").exists()
