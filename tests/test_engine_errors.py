"""Every error path of prune(): clear message, raised before anything changes; and the caller's
model (parameters, buffers, train/eval mode, module attributes, hooks) is unchanged after a
successful and after a failed run."""
import math

import pytest
import torch
from torch import nn

import widetopo
from widetopo.engine.pruner import NonFiniteScoresError, Pruner
from widetopo.scores.base import Scorer

pytestmark = pytest.mark.needs_kernel("global_threshold", "apply_masks_", "mask_stats")


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


def data(n=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 2, 4, 4, generator=g), torch.randint(0, 3, (3,), generator=g)) for _ in range(n)]


class Mag(Scorer):
    name = "mag"
    data_dependent = False

    def score(self, ctx, batches):
        return [p.abs() for p in ctx.prunable]


class Meddler(Scorer):
    """Changes everything a careless scorer could change on the model, then (optionally) fails."""

    name = "meddler"
    data_dependent = True

    def __init__(self, fail_round=None, nan_round=None):
        self.fail_round, self.nan_round = fail_round, nan_round

    def score(self, ctx, batches):
        model = ctx.model
        model.train()
        bn = model[1]
        bn.momentum = 1.0
        bn.extra_attribute = "added"
        model.register_forward_hook(lambda m, i, o: None)
        with torch.no_grad():
            ctx.forward(ctx.params, batches[0].x)  # train-mode BN writes ctx.buffers only
            ctx.params["0.bias"].add_(1.0)  # the engine's private copy, not the caller's
        if ctx.round == self.fail_round:
            raise RuntimeError("scorer failed on purpose")
        scores = [p.abs() + 0.01 for p in ctx.prunable]
        if ctx.round == self.nan_round:
            scores[1][0, 0] = math.nan
        return scores


def snapshot(model):
    return dict(
        state={k: v.clone() for k, v in model.state_dict().items()},
        training={n: m.training for n, m in model.named_modules()},
        momentum=model[1].momentum,
        hooks=sum(len(m._forward_hooks) for m in model.modules()),
        attrs={n: set(vars(m)) for n, m in model.named_modules()},
        params=[(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
        ids=[id(p) for p in model.parameters()],
    )


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["state"].keys() == snap["state"].keys()
    for k in snap["state"]:
        assert torch.equal(now["state"][k], snap["state"][k]), k
    for key in ("training", "momentum", "hooks", "attrs", "ids"):
        assert now[key] == snap[key], key
    assert [(n, r) for n, r, _ in now["params"]] == [(n, r) for n, r, _ in snap["params"]]
    assert all(g is None for _, _, g in now["params"])


def mixed_mode_model():
    model = tiny_cnn()
    model.eval()
    model[4].train()  # a mixed train/eval state must come back exactly
    return model


def test_model_unchanged_after_success():
    model = mixed_mode_model()
    snap = snapshot(model)
    masks = widetopo.prune(model, data(), 0.3, method=Meddler(), rounds=3, restorations=1, restore_steps=2,
                           verbose=False)
    assert_unchanged(model, snap)
    assert masks.density == pytest.approx(round(0.3 * 264) / 264)


def test_model_unchanged_after_failure_mid_run():
    model = mixed_mode_model()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="failed on purpose"):
        widetopo.prune(model, data(), 0.3, method=Meddler(fail_round=2), rounds=3, verbose=False)
    assert_unchanged(model, snap)


def test_non_finite_scores_name_layer_and_round():
    model = mixed_mode_model()
    snap = snapshot(model)
    with pytest.raises(NonFiniteScoresError, match=r"layer '4\.weight' in round 2"):
        widetopo.prune(model, data(), 0.3, method=Meddler(nan_round=2), rounds=3, verbose=False)
    assert_unchanged(model, snap)


class ReturnsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return {"scores": self.fc(x)}  # no "logits" entry


class BadScorer(Scorer):
    name = "bad"
    data_dependent = False

    def __init__(self, out):
        self.out = out

    def score(self, ctx, batches):
        return self.out(ctx)


@pytest.mark.parametrize(
    "make_call, exc, match",
    [
        (lambda m: widetopo.prune(m, data(), 0.0, method=Mag()), ValueError, r"density must be in \(0, 1\], got 0.0"),
        (lambda m: widetopo.prune(m, data(), -0.1, method=Mag()), ValueError, r"density must be in \(0, 1\]"),
        (lambda m: widetopo.prune(m, data(), 1.5, method=Mag()), ValueError, r"density must be in \(0, 1\]"),
        (lambda m: widetopo.prune(m, data(), math.nan, method=Mag()), ValueError, r"density must be in \(0, 1\]"),
        (lambda m: widetopo.prune(m, data(), "0.5", method=Mag()), TypeError, r"density must be a number in \(0, 1\]"),
        (lambda m: widetopo.prune(m, data(), True, method=Mag()), TypeError, r"density must be a number"),
        (lambda m: widetopo.prune(m, [], 0.5, method=Mag()), ValueError, "data is empty"),
        (lambda m: widetopo.prune(m, iter([]), 0.5, method=Mag()), ValueError, "data is empty"),
        (lambda m: widetopo.prune(m, torch.randn(3, 2, 4, 4), 0.5, method=Mag()), TypeError, "not one tensor"),
        (lambda m: widetopo.prune(m, [{"x": 1}], 0.5, method=Mag()), TypeError, "dict batch 0 holds no input tensor"),
        (lambda m: widetopo.prune(m, [{"x": torch.randn(3, 2, 4, 4), "labels": torch.zeros(3), "y": torch.zeros(3)}], 0.5,
                                  method=Mag()), ValueError, "several keys"),
        (lambda m: widetopo.prune(m, ["batch"], 0.5, method=Mag()), TypeError, "batch 0 is a str"),
        (lambda m: widetopo.prune(m, [torch.randn(0, 2, 4, 4)], 0.5, method=Mag()), ValueError, "no samples"),
        (lambda m: widetopo.prune(m, data(), 0.5, method="prune-it"), ValueError,
         r"unknown method 'prune-it'; allowed: widetopo, widetopo-s"),
        (lambda m: widetopo.prune(m, data(), 0.5, method="widetopo", bogus=1), ValueError,
         r"unknown option\(s\) \['bogus'\].*allowed: \[.*'mu1'.*'rounds'"),
        (lambda m: widetopo.prune(m, data(), 0.5, method="snip", mu1=0.1), ValueError, r"unknown option\(s\) \['mu1'\]"),
        (lambda m: widetopo.prune(m, data(), 0.5, method=Mag(), pattern="^nothing$"), ValueError,
         "no prunable parameters selected"),
        (lambda m: widetopo.prune(m, data(), 0.5, method=Mag(), names=["0.weight", "9.weight"]), ValueError,
         r"unknown parameter name\(s\) \['9.weight'\]"),
        (lambda m: widetopo.prune(m, data(), 0.5, method=Mag(), rounds=0), ValueError, "rounds must be an integer >= 1"),
        (lambda m: widetopo.prune(m, data(), 0.5, method=Mag(), restorations=-1), ValueError,
         "restorations must be an integer >= 0"),
        (lambda m: widetopo.prune(m, data(), 0.5, method=Mag(), schedule="step"), ValueError, "schedule must be one of"),
        (lambda m: widetopo.prune(m, data(), 0.5, method=Mag(), count="approx"), ValueError, "count must be one of"),
        (lambda m: widetopo.prune(m, data(), 0.5, method=Mag(), compression_factor=0), ValueError,
         r"compression_factor must be in \[0.1, 1e\+06\]"),
        (lambda m: widetopo.prune(m, data(), 0.5, method=Mag(), seed=1.5), ValueError, "seed must be an integer"),
        (lambda m: widetopo.prune(m, data(), 0.5, method=Mag(), verbose="yes"), TypeError, "verbose must be True"),
        (lambda m: widetopo.prune(m, data(), 0.5, method=Mag(), device="nodevice"), ValueError, "device must be"),
        (lambda m: widetopo.prune(m, [torch.randn(3, 2, 4, 4)], 0.5, method="snip"), ValueError, "needs targets"),
        (lambda m: widetopo.prune(m, data(), 0.5, method=BadScorer(lambda c: c.prunable[:1])), TypeError,
         r"must return from score\(\) a list of 2 score tensors"),
        (lambda m: widetopo.prune(m, data(), 0.5, method=BadScorer(lambda c: [p.long() for p in c.prunable])),
         TypeError, r"score of '0.weight' must be a floating tensor of shape \(4, 2, 3, 3\)"),
        (lambda m: widetopo.prune("model", data(), 0.5, method=Mag()), TypeError, "model must be a torch.nn.Module"),
    ],
)
def test_errors_leave_model_unchanged(make_call, exc, match):
    model = mixed_mode_model()
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        make_call(model)
    assert_unchanged(model, snap)


def test_model_without_prunable_layers():
    model = nn.Sequential(nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="no prunable parameters selected"):
        widetopo.prune(model, [torch.randn(3, 4)], 0.5, method=Mag())


def test_output_not_a_tensor():
    model = ReturnsDict()
    snap = [p.clone() for p in model.parameters()]
    with pytest.raises(widetopo.UnsupportedInputsError, match="model must return a logits tensor.*got dict; pass forward_fn"):
        widetopo.prune(model, [torch.randn(3, 4)], 0.5, method=Mag())
    assert all(torch.equal(a, b) for a, b in zip(snap, model.parameters()))


def test_pruner_rejects_non_scorer():
    with pytest.raises(TypeError, match="scorer must be a widetopo.scores.Scorer"):
        Pruner(tiny_cnn(), object(), 0.5)


@pytest.mark.parametrize("method,option", [("widetopo", "mu2=0"), ("widetopo-s", "mu2=0"), ("synflow", "input_shape"),
                                           ("synflow-l2", "input_shape"), ("px", "does not perturb"),
                                           ("ntk-sap", "noise_input=False"), ("npb", "input_shape")])
def test_input_perturbing_methods_refuse_token_ids_without_an_embedding(method, option):
    """docs/design.md §2.5: integer inputs and no nn.Embedding: refused before any work, naming
    the option that avoids perturbing the input."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    snap = [p.clone() for p in model.parameters()]
    data = [torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(widetopo.UnsupportedInputsError, match=option):
        widetopo.prune(model, data, 0.5, method=method, verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(snap, model.parameters()))


def test_dict_batches_with_other_keys_name_the_difference():
    """A dict batch whose non-tensor entries differ from batch 0's is refused, and the message
    shows the entry (not two identical tensor shapes)."""
    net = nn.Sequential(nn.Linear(4, 3))

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, flag=True):
            return self.net(x)

    y = torch.tensor([0, 1, 2])
    data = [{"x": torch.randn(3, 4), "flag": False, "labels": y}, {"x": torch.randn(3, 4), "labels": y}]
    with pytest.raises(ValueError, match=r"batch 1 has samples of shape \{x: \(4,\) \(torch.float32\)\}, but batch 0 "
                                         r"has \{x: \(4,\) \(torch.float32\), flag: bool\}.*under the same keys"):
        widetopo.prune(Keyword(), data, 0.5, method="snip", verbose=False)
