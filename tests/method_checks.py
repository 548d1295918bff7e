"""Properties every registered method must have, shared by the tests/test_method_*.py files:
exact K kept, same seed -> same masks, the caller's model and the global RNG untouched, resume
after a kill equals an uninterrupted run, and two gloo processes give the masks of one.

Only plain PyTorch and the public widetopo.prune entry point are used here.
"""
import datetime
import os
import tempfile

import torch
from torch import nn

import widetopo
from widetopo.engine import checkpoint as ckpt_mod

from gloo import spawn


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


def state_of(model):
    """Everything of a model that pruning must leave alone."""
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: b.detach().clone() for n, b in model.named_buffers()},
            [m.training for m in model.modules()],
            [dict(m._forward_hooks) for m in model.modules()],
            [getattr(m, "momentum", None) for m in model.modules()])


def assert_same_state(a, b):
    for da, db in zip(a[:2], b[:2]):
        assert list(da) == list(db)
        for k in da:
            assert torch.equal(da[k], db[k]), k
    assert a[2] == b[2], "module training flags changed"
    assert [list(h) for h in a[3]] == [list(h) for h in b[3]], "hooks left behind"
    assert a[4] == b[4], "BatchNorm momentum changed"


def check_basic_properties(method, make_model, data, density, **opts):
    """Exact K, same seed -> identical masks, model / RNG untouched; returns the masks."""
    model = make_model()
    model.train()
    if isinstance(model, nn.Sequential):
        model[1].eval()  # mixed training flags must come back as they were
    before = state_of(model)
    rng = torch.random.get_rng_state()
    masks = widetopo.prune(model, data, density, method=method, verbose=False, **opts)
    assert torch.equal(rng, torch.random.get_rng_state()), "global RNG state changed"
    assert_same_state(before, state_of(model))
    n = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == int(density * n + 0.5)
    again = widetopo.prune(make_model(), data, density, method=method, verbose=False, **opts)
    assert all(torch.equal(masks[k], again[k]) for k in masks)
    assert masks.meta["method"] == widetopo.methods.get_method(method).name
    return masks


class Killed(Exception):
    pass


def check_resume(tmp_path, monkeypatch, method, make_model, data, density, kill_after, **opts):
    """A run killed after `kill_after` checkpoint saves and resumed gives the masks of an
    uninterrupted run."""
    path = tmp_path / "run.ckpt"
    reference = widetopo.prune(make_model(), data, density, method=method, verbose=False, **opts)
    real_save = ckpt_mod.Checkpoint.save
    calls = []

    def save_then_die(self, state):
        real_save(self, state)
        calls.append(1)
        if len(calls) == kill_after:
            raise Killed

    monkeypatch.setattr(ckpt_mod.Checkpoint, "save", save_then_die)
    try:
        widetopo.prune(make_model(), data, density, method=method, verbose=False, checkpoint=path, **opts)
    except Killed:
        pass
    else:
        raise AssertionError("the run was not killed")
    monkeypatch.setattr(ckpt_mod.Checkpoint, "save", real_save)
    resumed = widetopo.prune(make_model(), data, density, method=method, verbose=False, checkpoint=path, **opts)
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


# ------------------------------------------------------------------------------- distributed
#: the two-process runs of every method checked here (one spawn serves all of them: starting
#: two interpreters costs far more than these tiny runs)
DIST_RUNS = {
    "iter-snip": dict(n_batches=4, density=0.2, rounds=2),
    "grasp": dict(n_batches=4, density=0.2),
    "ntk-sap": dict(n_batches=4, density=0.2, rounds=2),
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


def per_pixel_loss(logits, y):
    """Mean cross entropy over the pixels whose target is not 255, by an explicit loop."""
    total, count = 0.0, 0
    for n in range(y.shape[0]):
        for i in range(y.shape[1]):
            for j in range(y.shape[2]):
                if int(y[n, i, j]) != 255:
                    z = logits[n, :, i, j]
                    total = total + torch.logsumexp(z, 0) - z[int(y[n, i, j])]
                    count += 1
    return total / count
