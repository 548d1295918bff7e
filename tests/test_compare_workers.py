"""`widetopo compare --workers N` / `--executor ray` and the output directory's lock: rows equal to
one cell at a time, a killed worker costs only its cell (retried once), Ctrl-C stops every worker
(exit 130), a second run on a locked directory refuses and loses no row of the first."""
import csv
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import widetopo.experiments.compare as compare
from widetopo.cli import main
from widetopo.errors import OutputLockedError
from widetopo.experiments import executors
from widetopo.experiments.executors import KILL_ENV, KILL_ONCE_ENV
from widetopo.experiments.lock import OutputLock
from widetopo.sparsity.maskfile import load_masks

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("sklearn", reason="compare tests use scikit-learn's bundled digits dataset")

ROOT = Path(__file__).resolve().parents[1]
GRID = dict(methods=["random", "snip"], densities=[0.2, 0.05], seeds=[0])
SETTINGS = dict(epochs=1, samples=24, prune_batch_size=24, max_train_samples=48, max_test_samples=24, batch_size=24)
TINY = ["--methods", "random,snip", "--densities", "0.2,0.05", "--seeds", "0", "--epochs", "1", "--samples", "24",
        "--prune-batch-size", "24", "--max-train-samples", "48", "--max-test-samples", "24", "--batch-size", "24",
        "--no-plots", "--threads", "1"]
TIMING = {"prune_seconds", "train_seconds"}


def _csv(out):
    """results.csv keyed by cell, timing columns left out."""
    with open(Path(out) / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {(r["method"], float(r["density_target"]), int(r["seed"])): {k: v for k, v in r.items() if k not in TIMING}
            for r in rows}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _cli(out, *extra, epochs="1"):
    argv = [sys.executable, "-m", "widetopo", "compare", "-o", str(out)] + TINY + list(extra)
    argv[argv.index("--epochs") + 1] = epochs
    return argv


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The tiny grid run one cell at a time in this process: the reference of every other run."""
    out = tmp_path_factory.mktemp("seq")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = compare.run_grid(out_dir=out, **GRID, **SETTINGS)
    finally:
        torch.set_num_threads(before)
    assert result["ran"] == 5 and not result["failed"]
    return out


def _same_cells(out, reference):
    got, want = _csv(out), _csv(reference)
    assert list(got) and list(got) == list(want)  # the same cells, in the same (plan) order
    for key in want:
        assert got[key] == want[key], key  # every column but the timings, accuracy and sparsity included
        if key[0] != "dense":  # and the same masks, bit for bit
            a = load_masks(Path(out) / want[key]["mask_file"])
            b = load_masks(Path(reference) / want[key]["mask_file"])
            assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_two_workers_equal_one_cell_at_a_time(sequential, tmp_path, capsys):
    out = tmp_path / "w2"
    assert main(["compare", "-o", str(out), "--workers", "2", "--worker-threads", "1"] + TINY) == 0
    stdout = capsys.readouterr().out
    assert "2 worker processes at once, 1 CPU thread(s) each" in stdout
    _same_cells(out, sequential)
    assert not (out / ".lock").exists()
    assert not [p for p in (out / "masks").iterdir() if ".tmp" in p.name]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_killed_worker_costs_only_its_cell(sequential, tmp_path, monkeypatch):
    log = logging.getLogger("widetopo.experiments.compare")
    lines = _Lines()
    monkeypatch.setattr(log, "handlers", [lines])
    monkeypatch.setattr(log, "level", logging.INFO)
    monkeypatch.setattr(log, "propagate", False)
    grid = dict(GRID, methods=["random"])
    want = _csv(sequential)
    # killed on every attempt: retried once, then journaled as failed; killed on its first attempt
    # only: the retry succeeds, with the row of the sequential run; the other cell is unharmed
    monkeypatch.setenv(KILL_ENV, "random d=0.2 s0")
    monkeypatch.setenv(KILL_ONCE_ENV, "random d=0.05 s0")
    out = tmp_path / "killed"
    result = compare.run_grid(out_dir=out, workers=2, threads_per_worker=1, quiet=False, **grid, **SETTINGS)
    (failed,) = result["failed"]
    assert (failed["method"], failed["density_target"]) == ("random", 0.2)
    assert "WorkerDied" in failed["error"] and "SIGKILL" in failed["error"]
    journal = json.loads((out / "results.json").read_text())
    assert [(f["method"], f["density_target"]) for f in journal["failed"]] == [("random", 0.2)]
    assert sorted((r["method"], r["density_target"]) for r in journal["rows"]) == [("dense", 1.0), ("random", 0.05)]
    retries = sorted(line.split(":")[0] for line in lines.lines if "running it once more" in line)
    assert retries == ["random d=0.05 s0", "random d=0.2 s0"]  # one retry each, no more
    # off a terminal: a line per finished cell with the counts done/total, running, failed
    assert [line for line in lines.lines if re.fullmatch(r"\[[123]/3, [01] running, 1 failed\] random d=0\.2 s0 "
                                                          r"failed: WorkerDied: .*SIGKILL\)", line)]
    counts = [line.split("]")[0] + "]" for line in lines.lines if line.startswith("[")]
    assert [c.split(",")[0] for c in counts] == ["[1/3", "[2/3", "[3/3"] and counts[-1].endswith(" 1 failed]")
    got = _csv(out)
    assert sorted(got) == [("dense", 1.0, 0), ("random", 0.05, 0)] and all(got[k] == want[k] for k in got)
    assert not list((out / "masks").glob("*.tmp*"))


def _children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            # the pool's workers: forked (Linux) or spawned children, not multiprocessing's resource tracker
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"resource_tracker" not in cmd:
                kids.append(int(entry))
    return kids


def _gone(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def test_ctrl_c_stops_every_worker_and_exits_130(tmp_path):
    out = tmp_path / "int"
    proc = subprocess.Popen(_cli(out, "--workers", "2", epochs="200"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        workers = []
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.5)
            workers = _children(proc.pid)
        assert len(workers) == 2, "the two workers never started"
        time.sleep(3)  # let them load the data and take a cell
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    deadline = time.time() + 10
    while time.time() < deadline and not all(_gone(p) for p in workers):
        time.sleep(0.2)
    assert all(_gone(p) for p in workers)
    assert not (out / ".lock").exists()


def test_second_run_refuses_and_no_row_is_lost(sequential, tmp_path, capsys):
    out = tmp_path / "shared"
    first = subprocess.Popen(_cli(out, epochs="20"), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / ".lock").exists() and first.poll() is None:
            time.sleep(0.1)
        assert (out / ".lock").exists(), first.communicate()[1]
        started = time.time()
        assert main(["-q", "compare", "-o", str(out)] + TINY) == 1  # the second run refuses at once
        assert time.time() - started < 20
        err = capsys.readouterr().err
        assert f"pid {first.pid} on host {socket.gethostname()}, started " in err and "in use by another run" in err
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, first_err
    journal = json.loads((out / "results.json").read_text())
    assert sorted((r["method"], r["density_target"]) for r in journal["rows"]) == [
        ("dense", 1.0), ("random", 0.05), ("random", 0.2), ("snip", 0.05), ("snip", 0.2)]
    assert len(list((out / "masks").glob("*.wtm"))) == 4 and not (out / ".lock").exists()


def test_lock_holder_stale_lock_and_other_host(tmp_path, caplog, monkeypatch):
    with OutputLock(tmp_path):
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()} on host ") as info:
            OutputLock(tmp_path).acquire()  # a second holder, even in the same process
        assert info.value.holder["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is gone
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 1.0}))
    caplog.set_level(logging.WARNING, logger="widetopo.experiments.lock")
    monkeypatch.setattr(logging.getLogger("widetopo"), "propagate", True)
    with OutputLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and f"pid {dead.pid}" in caplog.text

    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": 1.0}))
    with pytest.raises(OutputLockedError, match="host elsewhere.example"):
        OutputLock(tmp_path).acquire()
    assert (tmp_path / ".lock").exists()  # not ours to remove


def test_bad_executor_arguments_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    for kwargs, message in ((dict(workers=0), "workers must be an integer >= 1"),
                            (dict(executor="dask"), "executor must be one of 'local', 'ray'"),
                            (dict(address="auto"), "address .* needs executor='ray'"),
                            (dict(workers=2, threads_per_worker=0), "threads_per_worker must be")):
        with pytest.raises(ValueError, match=message):
            compare.run_grid(out_dir=out, **kwargs, **GRID, **SETTINGS)
    assert not out.exists()
    assert main(["compare", "-o", str(out), "--address", "auto"] + TINY) == 2
    assert "--address is the address of a Ray cluster: it needs --executor ray" in capsys.readouterr().err
    assert main(["compare", "-o", str(out), "--workers", "0"] + TINY) == 2
    assert not out.exists()


def test_ray_tasks_equal_the_local_pool(sequential, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray executor is the optional extra widetopo[ray]")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": _env()["PYTHONPATH"],
                                       KILL_ENV: "magnitude d=0.2 s0", KILL_ONCE_ENV: "magnitude d=0.05 s0"}})
    try:
        out = tmp_path / "ray"
        result = compare.run_grid(out_dir=out, workers=2, executor="ray", **GRID, **SETTINGS)
        assert result["ran"] == 5 and not result["failed"]
        _same_cells(out, sequential)
        # resume and failure rules are the same: nothing left to do; a task whose worker dies runs
        # once more, and is journaled as failed when that dies too
        grid = dict(GRID, methods=["random", "snip", "magnitude"])
        again = compare.run_grid(out_dir=out, workers=2, executor="ray", **grid, **SETTINGS)
        assert again["ran"] == 2 and again["skipped"] == 5
        (failed,) = again["failed"]
        assert (failed["method"], failed["density_target"]) == ("magnitude", 0.2) and "WorkerDied" in failed["error"]
        rows = json.loads((out / "results.json").read_text())["rows"]
        assert sorted((r["method"], r["density_target"]) for r in rows)[:3] == [
            ("dense", 1.0), ("magnitude", 0.05), ("random", 0.05)]
    finally:
        ray.shutdown()


def test_worker_devices_and_threads(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert executors.worker_devices("cuda", 5) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert executors.worker_devices("cuda:1", 3) == ["cuda:1"] * 3  # an explicit device is kept
    assert executors.worker_devices("cpu", 2) == ["cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert executors.worker_devices("cuda", 2) == ["cuda", "cuda"]
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert [executors.default_threads(n) for n in (1, 3, 16, 40)] == [16, 5, 1, 1]


def test_an_error_in_a_worker_stops_the_run(tmp_path):
    """Not a method's refusal (here: the dataset's files are missing, found by the workers, which
    load the data themselves): raised in the caller as without workers; lock released."""
    from widetopo.errors import DatasetNotFoundError

    out = tmp_path / "err"
    with pytest.raises(DatasetNotFoundError, match="cifar10"):
        compare.run_grid(["random"], [0.1], [0], out, workers=2, model="mlp", dataset="cifar10",
                         data_dir=str(tmp_path / "no-data"), epochs=0)
    assert not (out / ".lock").exists() and not (out / "results.json").exists()
