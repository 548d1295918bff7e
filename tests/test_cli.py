"""The `widetopo` command line end to end with tiny settings; exit codes and messages."""
import json
import os
import subprocess
import sys

import pytest
import torch

from widetopo.cli import main
from widetopo.sparsity.maskfile import load_masks, read_header

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
    assert main(["-q", "train"] + TINY_TRAIN) == 2  # a usage error (#18): neither a mask file nor --dense
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
    err = capsys.readouterr().err
    assert err.endswith(f"widetopo report: error: mask file {str(tmp_path / 'missing.wtm')!r} does not exist\n")
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


# ------------------------------------------------------------------------------ issue 10: flags, outputs, --init

@pytest.mark.parametrize("argv", [["-q", "report", "x.wtm"], ["report", "x.wtm", "-q"], ["report", "-q", "x.wtm"]])
def test_global_flags_before_or_after_the_command(argv):
    from widetopo.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.verbose is False and args.threads == "auto"


def test_threads_after_the_command_and_conflicting_flags(capsys):
    from widetopo.cli import build_parser

    args = build_parser().parse_args(["--threads", "3", "run", "--threads", "1"])
    assert args.threads == 1
    assert build_parser().parse_args(["--threads", "2", "run"]).threads == 2
    assert main(["-q", "report", "x.wtm", "-v"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_outputs_checked_before_any_work(tmp_path, monkeypatch, capsys):
    from widetopo.experiments import recipe

    def no_work(*a, **k):
        raise AssertionError("pruning or training started although an output cannot be written")

    monkeypatch.setattr(recipe, "prune", no_work)
    monkeypatch.setattr(recipe, "train", no_work)
    missing = tmp_path / "nodir" / "m.wtm"
    assert main(["-q", "prune", "-o", str(missing)] + TINY_PRUNE) == 1
    err = capsys.readouterr().err
    assert f"cannot write -o/--output {str(missing)!r}" in err and "does not exist" in err
    assert main(["-q", "run", "--results", str(tmp_path)] + TINY_PRUNE) == 1
    assert f"cannot write --results {str(tmp_path)!r}: it is a directory" in capsys.readouterr().err
    assert main(["-q", "train", "--dense", "--save-model", str(missing)] + TINY_TRAIN) == 1
    assert "--save-model" in capsys.readouterr().err
    blocker = tmp_path / "plain"
    blocker.write_text("x")
    assert main(["report", "whatever.wtm", "--plots", str(blocker / "plots")]) == 1
    assert "--plots" in capsys.readouterr().err
    assert not any(p.name.startswith(".") or "tmp" in p.name for p in tmp_path.iterdir())  # no probe files left


def _cnn(seed):
    from widetopo.models import build_model

    torch.manual_seed(seed)
    return build_model("cnn", 1, 10, 8)


def test_init_file_prune_train_and_changed_file(tmp_path, capsys):
    import hashlib

    init = tmp_path / "init.pt"
    src = _cnn(123)
    torch.save({"model_state_dict": src.state_dict(), "epoch": 0}, init)
    masks_path = tmp_path / "m.wtm"
    assert main(["-q", "prune", "--method", "magnitude", "--density", "0.1", "--init", str(init), "-o", str(masks_path)]
                + TINY_PRUNE) == 0
    meta = read_header(masks_path)["meta"]
    assert meta["init_file"] == str(init.resolve())
    assert meta["init_sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()
    # magnitude pruning of the file's weights (not of seed 0's): global top-k of |theta|, by hand
    masks = load_masks(masks_path)
    params = dict(src.named_parameters())
    values = torch.cat([params[n].detach().abs().flatten() for n in masks])
    k = masks.kept
    threshold = values.sort(descending=True).values[k - 1]
    for name, m in masks.items():
        assert torch.equal(m, params[name].detach().abs() >= threshold), name

    # train MASKFILE reloads the init file: with 0 epochs the saved weights are the file's, masked
    saved = tmp_path / "trained.pt"
    assert main(["-q", "train", str(masks_path), "--epochs", "0", "--save-model", str(saved)] + TINY_TRAIN[2:]) == 0
    sd = torch.load(saved)
    for name, value in src.state_dict().items():
        expected = value * masks[name] if name in masks else value
        assert torch.equal(sd[name], expected), name
    capsys.readouterr()

    # a changed init file is refused, a missing one too
    torch.save(_cnn(7).state_dict(), init)
    assert main(["-q", "train", str(masks_path), "--epochs", "0"] + TINY_TRAIN[2:]) == 1
    assert "changed since the masks were computed" in capsys.readouterr().err
    init.unlink()
    assert main(["-q", "train", str(masks_path), "--epochs", "0"] + TINY_TRAIN[2:]) == 1
    assert "does not exist any more" in capsys.readouterr().err


def test_init_file_that_does_not_fit_is_a_clear_error(tmp_path, capsys):
    from widetopo.models import build_model

    bad = tmp_path / "mlp.pt"
    torch.save(build_model("mlp", 1, 10, 8).state_dict(), bad)
    assert main(["-q", "prune", "--init", str(bad), "-o", str(tmp_path / "x.wtm")] + TINY_PRUNE) == 1
    err = capsys.readouterr().err
    assert "does not fit SmallCNN" in err and "missing keys" in err and "unexpected keys" in err
    assert not (tmp_path / "x.wtm").exists()


def test_report_shows_effective_sparsity(mask_file, capsys):
    assert main(["report", str(mask_file)]) == 0
    out = capsys.readouterr().out
    assert "effective" in out.splitlines()[1] and "eff. nodes" in out
    assert "node ratio" in out


def test_segmentation_run_end_to_end_and_task_mismatch(tmp_path, capsys):
    """unet on the synthesised shapes set: SNIP with the per-pixel loss, pixel accuracy; a
    classifier on a segmentation set is refused before any work."""
    import widetopo.cli as cli

    out = tmp_path / "seg.wtm"
    rc = cli.main(["-q", "run", "--model", "unet", "--dataset", "shapes", "--method", "snip", "--density", "0.2",
                   "--samples", "16", "--epochs", "1", "--max-train-samples", "32", "--max-test-samples", "16",
                   "--no-dense", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    import widetopo

    assert widetopo.load_masks(out).meta["ignore_index"] == -100
    assert cli.main(["-q", "prune", "--model", "cnn", "--dataset", "shapes", "-o", str(tmp_path / "x.wtm")]) == 1
    assert "is a classification network, but dataset 'shapes' is a segmentation dataset" in capsys.readouterr().err


def test_engine_flags_come_from_engine_options(capsys):
    """--rounds & co. are generated from EngineOptions: its help text, its type and its check."""
    import dataclasses

    from widetopo.cli import build_parser
    from widetopo.engine.options import EngineOptions

    fields = {f.name: f for f in dataclasses.fields(EngineOptions)}
    prune_parser = build_parser()._subparsers._group_actions[0].choices["prune"]
    flags = {a.dest: a for a in prune_parser._actions}
    for name in ("rounds", "restorations", "restore_rounds", "restore_steps", "count"):
        assert fields[name].metadata["help"] in flags[name].help
    args = build_parser().parse_args(["prune", "--rounds", "3", "--restore-rounds", "none", "--count", "OFFICIAL"])
    assert (args.rounds, args.restore_rounds, args.count) == (3, None, "official")
    for argv, message in ((["prune", "--rounds", "0"], "rounds must be an integer >= 1, got 0"),
                          (["run", "--restorations", "x"], "option restorations: cannot read 'x' as int"),
                          (["compare", "--count", "some"], "count must be one of 'exact', 'official'")):
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_a_closed_pipe_ends_the_listing_quietly():
    """`widetopo methods | head -1`: no 'Broken pipe' error once the reader has gone (status 141)."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left before the first line: every write fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "widetopo", "methods"], stdout=write_end,
                              stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)
    err = done.stderr.decode()
    assert done.returncode == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err, err
