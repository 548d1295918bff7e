"""Checkpoint and resume: a run killed after any round or restoration step and started again
with the same checkpoint path ends with the same masks as an uninterrupted run."""
import os

import pytest
import torch
from torch import nn

import widetopo
from method_checks import run_killed
from widetopo.engine.checkpoint import CheckpointMismatch
from widetopo.scores.base import Scorer

pytestmark = pytest.mark.needs_kernel("global_threshold", "density_decay_", "restoration_scores", "apply_masks_",
                                      "mask_stats")


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


DATA = [torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
# phases: 3 rounds | restoration 0: 2 steps | 2 rounds | restoration 1: 2 steps | 2 rounds  (11 saves)
OPTS = dict(rounds=3, restorations=2, restore_steps=2, restore_rounds=2, seed=4, verbose=False)


class Scored(Scorer):
    """Depends on theta (so a wrong theta after resume changes the result), the round's
    generator and the data."""

    name = "scored"
    data_dependent = True
    decay = True

    def __init__(self):
        self.rounds = []

    def score(self, ctx, batches):
        self.rounds.append(ctx.round)
        out = [torch.zeros(p.shape) for p in ctx.prunable]
        for b in batches:
            gen = ctx.generator(b.index)
            for o, p in zip(out, ctx.prunable):
                o += torch.rand(p.shape, generator=gen) * (p.abs() + 0.05) * b.x.abs().mean()
        return out


def uninterrupted():
    return widetopo.prune(make_model(), DATA, 0.1, method=Scored(), **OPTS)


@pytest.mark.parametrize("kill_after", [1, 3, 4, 5, 6, 8, 10])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, kill_after):
    path = tmp_path / "run.ckpt"
    reference = uninterrupted()
    first = Scored()
    run_killed(monkeypatch, kill_after, lambda: widetopo.prune(make_model(), DATA, 0.1, method=first,
                                                               checkpoint=path, **OPTS))
    assert path.exists()
    second = Scored()
    resumed = widetopo.prune(make_model(), DATA, 0.1, method=second, checkpoint=path, **OPTS)
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    # no scoring round was repeated or skipped
    assert first.rounds + second.rounds == list(range(1, 8))
    assert [f for f in os.listdir(tmp_path) if f != "run.ckpt"] == []  # no temporary files left


def test_finished_checkpoint_returns_result_without_scoring(tmp_path):
    path = tmp_path / "run.ckpt"
    a = widetopo.prune(make_model(), DATA, 0.1, method=Scored(), checkpoint=path, **OPTS)
    again = Scored()
    b = widetopo.prune(make_model(), DATA, 0.1, method=again, checkpoint=path, **OPTS)
    assert again.rounds == []
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    widetopo.prune(make_model(), DATA, 0.1, method=Scored(), checkpoint=path, **OPTS)
    before = path.read_bytes()
    with pytest.raises(CheckpointMismatch, match="differs in: density"):
        widetopo.prune(make_model(), DATA, 0.2, method=Scored(), checkpoint=path, **OPTS)
    with pytest.raises(CheckpointMismatch, match="seed"):
        widetopo.prune(make_model(), DATA, 0.1, method=Scored(), checkpoint=path, **{**OPTS, "seed": 5})
    other = make_model()
    with torch.no_grad():
        other[0].weight.mul_(2)
    with pytest.raises(CheckpointMismatch, match="model_digest"):
        widetopo.prune(other, DATA, 0.1, method=Scored(), checkpoint=path, **OPTS)
    assert path.read_bytes() == before


def test_corrupt_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "run.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        widetopo.prune(make_model(), DATA, 0.1, method=Scored(), checkpoint=path, **OPTS)
