"""The `widetopo` command line end to end with tiny settings; exit codes and messages."""
import json
import os
import subprocess
import sys

import pytest
import torch

from widetopo.cli import main
from widetopo.maskfile import load_masks, read_header

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

pytest.importorskip("sklearn", reason="the CLI tests use scikit-learn's bundled digits dataset")

TINY_PRUNE = ["--samples", "48", "--prune-batch-size", "24", "--rounds", "2", "--restorations", "1",
              "--restore-rounds", "1", "--restore-steps", "3", "--max-train-samples", "160"]
TINY_TRAIN = ["--epochs", "1", "--batch-size", "32", "--max-train-samples", "160", "--max-test-samples", "80"]


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "cnn.wtm"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["-q", "prune", "--density", "0.1", "--seed", "3", "-o", str(path)] + TINY_PRUNE) == 0
    finally:
        torch.set_num_threads(before)
    return path


def test_prune_writes_mask_file_with_metadata(mask_file, capsys):
    header = read_header(mask_file)
    meta = header["meta"]
    assert meta["model"] == "cnn" and meta["dataset"] == "digits" and meta["seed"] == 3
    assert meta["method"].startswith("widetopo") and meta["preset"] == "widetopo-s"
    assert meta["in_channels"] == 1 and meta["num_classes"] == 10 and meta["image_size"] == 8
    numel, kept = header["numel"], header["kept"]
    assert kept == round(0.1 * numel)  # exact-K counting
    torch.manual_seed(3)
    from widetopo.models import build_model
    masks = load_masks(mask_file, model=build_model("cnn", 1, 10, 8))
    assert masks.kept == kept


def test_prune_imagenet_preset_sets_schedule(tmp_path):
    # WideTopo's ImageNet configuration: T = T' = 5 (explicit --rounds would still win).
    path = tmp_path / "imagenet.wtm"
    argv = ["-q", "prune", "--density", "0.2", "--preset", "imagenet", "--samples", "24",
            "--prune-batch-size", "24", "--restorations", "1", "--restore-steps", "2",
            "--max-train-samples", "64", "-o", str(path)]
    assert main(argv) == 0
    meta = read_header(path)["meta"]
    assert (meta["rounds"], meta["restore_rounds"], meta["restorations"]) == (5, 5, 1)
    assert meta["preset"] == "widetopo-s/imagenet"


def test_train_under_mask_file(mask_file, tmp_path, capsys):
    results = tmp_path / "train.json"
    state = tmp_path / "model.pt"
    assert main(["-q", "train", str(mask_file), "--results", str(results), "--save-model", str(state)] + TINY_TRAIN) == 0
    out = capsys.readouterr().out
    assert "pruned cnn on digits" in out and "test accuracy" in out
    data = json.loads(results.read_text())
    assert data["epochs"] == 1 and 0.0 <= data["test_accuracy"] <= 1.0 and len(data["history"]) == 1
    sd = torch.load(state)
    masks = load_masks(mask_file)
    for name, m in masks.items():
        assert torch.all(sd[name][~m] == 0), f"pruned weights of {name} must be zero after training"
        assert torch.any(sd[name][m] != 0)


def test_train_dense_and_usage_errors(capsys):
    assert main(["-q", "train", "--dense"] + TINY_TRAIN) == 0
    assert "dense cnn on digits (density 1.0000)" in capsys.readouterr().out
    assert main(["-q", "train"] + TINY_TRAIN) == 1
    assert "give a mask file, or --dense" in capsys.readouterr().err


def test_report_table_json_plots(mask_file, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    plots = tmp_path / "plots"
    argv = ["report", str(mask_file), "--json", str(out_json)]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plots", str(plots)]
    except ImportError:
        pass
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "features.0.weight" in out and "classifier.weight" in out and "total" in out
    rep = json.loads(out_json.read_text())
    masks = load_masks(mask_file)
    assert [r["name"] for r in rep["layers"]] == list(masks)
    for r in rep["layers"]:
        m = masks[r["name"]]
        assert r["kept"] == int(m.sum()) and r["active_out"] == int(m.flatten(1).any(1).sum())
    assert rep["total"]["model_params"] > rep["total"]["numel"]
    if "--plots" in argv:
        assert sorted(os.listdir(plots)) == ["cnn_density.png", "cnn_units.png"]


def test_run_end_to_end_in_process(tmp_path, capsys):
    results = tmp_path / "run.json"
    out_masks = tmp_path / "run.wtm"
    assert main(["-q", "run", "--density", "0.2", "-o", str(out_masks), "--results", str(results)]
                + TINY_PRUNE + TINY_TRAIN[:4] + TINY_TRAIN[6:]) == 0
    out = capsys.readouterr().out
    assert "pruned" in out and "dense" in out and "test acc" in out
    data = json.loads(results.read_text())
    assert set(data) >= {"pruned", "dense", "density", "mask_meta"}
    assert data["density"] == pytest.approx(0.2, abs=1e-3)
    assert out_masks.exists()


@pytest.mark.parametrize("argv, message", [
    (["run", "--density", "1.5"], "density must be in (0, 1]"),
    (["run", "--density", "abc"], "density must be a number"),
    (["prune", "--model", "alexnet"], "invalid choice 'alexnet'"),
    (["prune", "--method", "magic"], "invalid choice 'magic'"),
    (["train", "--epochs", "-1"], "expected an integer >= 0"),
    (["frobnicate"], "invalid choice"),
    ([], "a command is required"),
    (["report"], "the following arguments are required: masks"),
])
def test_bad_arguments_exit_2_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "usage:" in err and "Traceback" not in err


def test_runtime_errors_exit_1_with_message(tmp_path, capsys):
    bad = tmp_path / "bad.wtm"
    bad.write_bytes(b"not a mask file at all")
    assert main(["report", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "widetopo report: error:" in err and "not a widetopo mask file" in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "missing.wtm")]) == 1
    assert "No such file" in capsys.readouterr().err
    assert main(["-q", "prune", "--dataset", "cifar10", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "cifar" in err.lower() and "Traceback" not in err


def test_bench_quick(capsys):
    assert main(["-q", "bench", "--repeat", "1", "--samples", "16", "--prune-batch-size", "8", "--ops-model", "cnn",
                 "--max-train-samples", "64"]) == 0
    out = capsys.readouterr().out
    for op in ("apply_masks_", "mask_stats", "global_threshold", "density_decay_", "masked_sq_norm"):
        assert op in out
    assert "one WideTopo scoring round" in out and "plain forward+backward" in out


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "prune" in capsys.readouterr().out


@pytest.mark.slow
def test_python_dash_m_subprocess(tmp_path):
    """The real entry point in a fresh interpreter: a tiny `run`, exit status 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out_masks = tmp_path / "sub.wtm"
    proc = subprocess.run([sys.executable, "-m", "widetopo", "-q", "run", "--density", "0.3", "-o", str(out_masks),
                           "--no-dense"] + TINY_PRUNE + TINY_TRAIN[:4] + TINY_TRAIN[6:],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pruned" in proc.stdout and "test acc" in proc.stdout and out_masks.exists()
    assert proc.stderr == "", "--quiet: nothing on stderr"
