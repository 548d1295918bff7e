"""Run-level properties every method must have, checked through widetopo.prune on tiny models:
exact K kept, same seed -> identical masks, the global RNG and the caller's model untouched,
and a run killed after a checkpoint resumes to the masks of an uninterrupted run.
Plain PyTorch and the public API only."""
import copy
import math

import pytest
import torch
from torch import nn

import widetopo
from widetopo.engine import checkpoint as ckpt_mod


def model_state(model):
    """Everything of the model a run could touch: parameters, buffers, every module's mode,
    BatchNorm momenta, hook dictionaries."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "momenta": [getattr(m, "momentum", None) for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "keys": [sorted(vars(m)) for m in model.modules()],
    }


def assert_same_state(before, after):
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    for key in ("modes", "momenta", "hooks", "keys"):
        assert before[key] == after[key], key


def prunable_count(model):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)))


def check_run_properties(make_model, data, method, density=0.1, **options):
    """Exact K, determinism, RNG and model untouched, a different seed may differ. Returns masks."""
    model = make_model()
    model.train()
    before = model_state(model)
    rng = torch.random.get_rng_state()
    masks = widetopo.prune(model, data, density, method=method, verbose=False, **options)
    assert torch.equal(rng, torch.random.get_rng_state()), "the global RNG was touched"
    assert_same_state(before, model_state(model))
    n_p = prunable_count(model)
    assert sum(int(m.sum()) for m in masks.values()) == int(math.floor(density * n_p + 0.5))
    again = widetopo.prune(make_model(), data, density, method=method, verbose=False, **options)
    for name in masks:
        assert torch.equal(masks[name], again[name]), name
    return masks


class Killed(Exception):
    pass


def check_resume(tmp_path, monkeypatch, make_model, data, method, kill_after, density=0.1, **options):
    """Kill a run after `kill_after` checkpoint saves, resume it with the same path: the masks
    equal those of an uninterrupted run."""
    reference = widetopo.prune(make_model(), data, density, method=method, verbose=False, **options)
    path = tmp_path / "run.ckpt"
    real_save = ckpt_mod.Checkpoint.save
    calls = []

    def save_then_die(self, state):
        real_save(self, state)
        calls.append(state["step"])
        if len(calls) == kill_after:
            raise Killed

    monkeypatch.setattr(ckpt_mod.Checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        widetopo.prune(make_model(), data, density, method=method, verbose=False, checkpoint=path, **options)
    monkeypatch.setattr(ckpt_mod.Checkpoint, "save", real_save)
    assert path.exists()
    resumed = widetopo.prune(make_model(), data, density, method=method, verbose=False, checkpoint=path, **options)
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    return reference


def deep_copy_masked(model, params):
    """A deep copy of `model` whose parameters are `params` (name -> tensor), in float64."""
    net = copy.deepcopy(model).double()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(params[n])
    return net
