"""The properties every registered method must have, checked through the public widetopo.prune
on tiny models (shared by the tests/test_method_*.py files): exact K kept, same seed -> identical
masks, the caller's model and the global RNG untouched, a run killed after a checkpoint resumes to
the masks of an uninterrupted run, and two gloo processes give the masks of one.

Only plain PyTorch and the public widetopo.prune entry point are used here (the float64 reference
implementations live in tests/references.py).
"""
import datetime
import math
import os
import tempfile

import pytest
import scipy.stats
import torch
from torch import nn

import widetopo
from widetopo.engine import checkpoint as ckpt_mod

from gloo import spawn


# ------------------------------------------------------------------------------- models and data
def bn_net(classes=3):
    """Conv -> BatchNorm -> ReLU -> Linear in float64, seeded, with non-trivial BN state."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, classes)).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.2, 0.2)
    return net


def labelled(n, batch=3, classes=3, seed=2):
    """n float64 (input, target) batches for bn_net."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 2, 4, 4, generator=g, dtype=torch.float64),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


# ------------------------------------------------------------------------------- run properties
def model_state(model):
    """Everything of a model a run could touch: parameters and buffers (state dict), every
    module's mode, BatchNorm momenta, hook dictionaries, attribute names."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "momenta": [getattr(m, "momentum", None) for m in model.modules()],
        "hooks": [[list(getattr(m, d)) for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                  "_backward_pre_hooks")] for m in model.modules()],
        "keys": [sorted(vars(m)) for m in model.modules()],
    }


def assert_same_state(before, after):
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    for key in ("modes", "momenta", "hooks", "keys"):
        assert before[key] == after[key], key


def prunable_count(model):
    """N_P of the default prunable set: the weights of the convolutions and linear layers."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)))


def check_run_properties(method, make_model, data, density, **opts):
    """Exact K = round(d * N_P), same seed -> identical masks, the model (with mixed training
    flags) and the global RNG untouched, the registry name in the metadata. Returns the masks."""
    model = make_model()
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        bns[0].eval()  # mixed training flags must come back as they were
    before = model_state(model)
    rng = torch.random.get_rng_state()
    masks = widetopo.prune(model, data, density, method=method, verbose=False, **opts)
    assert torch.equal(rng, torch.random.get_rng_state()), "the global RNG was touched"
    assert_same_state(before, model_state(model))
    n_p = prunable_count(model)
    assert sum(m.numel() for m in masks.values()) == n_p
    assert sum(int(m.sum()) for m in masks.values()) == int(math.floor(density * n_p + 0.5))
    again = widetopo.prune(make_model(), data, density, method=method, verbose=False, **opts)
    assert list(again) == list(masks)
    for name in masks:
        assert torch.equal(masks[name], again[name]), name
    assert masks.meta["method"] == widetopo.methods.get_method(method).name
    return masks


def check_seeded(method, make_model, data, density, seed, other_seed, **opts):
    """For methods that draw at random (no exact-K check: some keep whole kernels): the model and
    the global RNG untouched, the same seed gives the same masks and another seed other masks."""
    model = make_model()
    before = model_state(model)
    rng = torch.random.get_rng_state()
    a = widetopo.prune(model, data, density, method=method, seed=seed, verbose=False, **opts)
    assert torch.equal(rng, torch.random.get_rng_state()), "the global RNG was touched"
    assert_same_state(before, model_state(model))
    b = widetopo.prune(make_model(), data, density, method=method, seed=seed, verbose=False, **opts)
    c = widetopo.prune(make_model(), data, density, method=method, seed=other_seed, verbose=False, **opts)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


# ------------------------------------------------------------------------------- random subsets
#: significance level of the uniformity checks: a correct sampler fails one with probability 1e-6
#: (over the choice of the fixed seed set), so a failure means a biased sampler
ALPHA = 1e-6


def uniform_keep_pvalue(runs, groups):
    """p-value of "every run keeps a uniformly random subset of each group's entries", from the
    number of runs c_i that kept entry i.

    runs: mask dicts of N runs (different seeds); groups: lists of names whose entries are pooled
    (all prunable tensors for a global selection, one layer for a layerwise one); each run must
    keep the same number k of a group's n entries. For uniform k-subsets, c_i has mean N p
    (p = k/n) and covariance N p (1 - p) n/(n - 1) (I - 11^T/n), so
        X^2 = (n - 1) / (n N p (1 - p)) * sum_i (c_i - N p)^2  ~  chi^2(n - 1)
    (asymptotically); independent groups add their X^2 and degrees of freedom. A group kept
    whole (or not at all) carries no information and must be kept whole in every run.
    """
    n_runs = len(runs)
    stat, dof = 0.0, 0
    for names in groups:
        counts = torch.cat([sum(run[name].double() for run in runs).flatten() for name in names])
        kept = {sum(int(run[name].sum()) for name in names) for run in runs}
        assert len(kept) == 1, f"the runs keep different numbers of entries of {names}: {sorted(kept)}"
        k, n = kept.pop(), counts.numel()
        if k in (0, n):
            assert bool((counts == (n_runs if k else 0)).all())
            continue
        p = k / n
        stat += float((n - 1) / (n * n_runs * p * (1 - p)) * ((counts - n_runs * p) ** 2).sum())
        dof += n - 1
    assert dof > 0, "no group with a random choice"
    return float(scipy.stats.chi2.sf(stat, dof))


# ------------------------------------------------------------------------------- kill and resume
class Killed(Exception):
    """Stands in for the process dying right after a checkpoint was written."""


def run_killed(monkeypatch, kill_after, run):
    """Call run() with Checkpoint.save patched to die (raise Killed) right after its
    `kill_after`-th save was written, and assert that it died there. Returns the (phase, step)
    of every save made; Checkpoint.save is restored afterwards."""
    real_save = ckpt_mod.Checkpoint.save
    saves = []

    def save_then_die(self, state):
        real_save(self, state)
        saves.append((state["phase"], state["step"]))
        if len(saves) == kill_after:
            raise Killed

    monkeypatch.setattr(ckpt_mod.Checkpoint, "save", save_then_die)
    try:
        with pytest.raises(Killed):
            run()
    finally:
        monkeypatch.setattr(ckpt_mod.Checkpoint, "save", real_save)
    assert len(saves) == kill_after
    return saves


def check_resume(tmp_path, monkeypatch, method, make_model, data, density, kill_after, **opts):
    """A run killed after `kill_after` checkpoint saves and started again with the same path ends
    with the masks of an uninterrupted run. Returns those masks."""
    reference = widetopo.prune(make_model(), data, density, method=method, verbose=False, **opts)
    path = tmp_path / "run.ckpt"
    run_killed(monkeypatch, kill_after, lambda: widetopo.prune(make_model(), data, density, method=method,
                                                               verbose=False, checkpoint=path, **opts))
    assert path.exists()
    resumed = widetopo.prune(make_model(), data, density, method=method, verbose=False, checkpoint=path, **opts)
    assert list(resumed) == list(reference)
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    return reference


# ------------------------------------------------------------------------------- distributed
#: the two-process runs of every method checked here (one spawn serves all of them: starting
#: two interpreters costs far more than these tiny runs)
DIST_RUNS = {
    "iter-snip": dict(n_batches=4, density=0.2, rounds=2),
    "grasp": dict(n_batches=4, density=0.2),
    "ntk-sap": dict(n_batches=4, density=0.2, rounds=2),
    "prospr": dict(n_batches=4, density=0.2),
    "rreg": dict(n_batches=2, density=0.2),
    "phew": dict(n_batches=2, density=0.2),
    "pags": dict(n_batches=2, density=0.2, population=3, min_kept=0),
    "npb": dict(n_batches=1, density=0.2, rounds=2),
}
_DIST_RESULTS = {}


def _worker(rank, world, port, outdir, runs):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        out = {}
        for method, run in runs.items():
            run = dict(run)
            data = labelled(run.pop("n_batches"))
            out[method] = dict(widetopo.prune(bn_net(), data, run.pop("density"), method=method, verbose=False,
                                              **run))
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _spawn_two(runs, timeout=120):
    """{method: (rank 0's masks, rank 1's masks)} of bn_net pruned by 2 gloo processes."""
    with tempfile.TemporaryDirectory() as outdir:
        spawn(_worker, 2, outdir, runs, timeout=timeout)
        ranks = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=True) for r in (0, 1)]
    return {m: (ranks[0][m], ranks[1][m]) for m in runs}


def check_two_processes(method):
    """Both ranks of a 2-process gloo run derive the masks of one process over all batches."""
    if method not in _DIST_RESULTS:
        _DIST_RESULTS.update(_spawn_two(DIST_RUNS))
    r0, r1 = _DIST_RESULTS[method]
    run = dict(DIST_RUNS[method])
    data = labelled(run.pop("n_batches"))
    single = widetopo.prune(bn_net(), data, run.pop("density"), method=method, verbose=False, **run)
    assert list(r0) == list(single)
    for name in single:
        assert torch.equal(r0[name], r1[name]), name
        assert torch.equal(r0[name], single[name]), name


# ------------------------------------------------------------------------------- segmentation
def segmentation_pairs():
    """Two float64 (x, y) batches of 2 images 2x3x3 with 4-class per-pixel targets, ~30 % of
    the pixels ignored (255)."""
    g = torch.Generator().manual_seed(4)
    pairs = []
    for _ in range(2):
        x = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (2, 3, 3), generator=g)
        y[torch.rand(y.shape, generator=g) < 0.3] = 255
        pairs.append((x, y))
    return pairs
