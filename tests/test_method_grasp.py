"""GraSP (docs/design.md §5.3): Hg against a central finite difference of the gradient in float64, the
kept set against a hand-written double backward (also when sum theta * Hg < 0), the prepass
sum over two processes, and the generic method properties."""
import pytest
import torch
from torch import nn

import widetopo
from method_checks import (bn_net, check_resume, check_run_properties, check_two_processes, labelled,
                           segmentation_pairs)
from references import grad_at, per_pixel_loss, reference_grasp
from scoring_nets import make_ctx
from widetopo.methods import get_method
from widetopo.scores import Batch
from widetopo.scores.grasp import GraSPScorer

pytestmark = [pytest.mark.needs_kernel("accumulate_score_", "global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]


class SmoothNet(nn.Module):
    """Conv -> BatchNorm -> tanh -> Linear: smooth, so a finite difference has no kinks to cross."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def smooth_net():
    torch.manual_seed(7)
    net = SmoothNet().double()
    with torch.no_grad():
        net.fc.weight.mul_(8.0)  # a loss that is not flat at T = 200
    return net


def batches_of(pairs):
    return [Batch(i, x, y) for i, (x, y) in enumerate(pairs)]


def test_registry_entry():
    m = get_method("grasp")
    assert m.schedule.rounds == 1 and m.schedule.restorations == 0
    assert m.defaults() == {"temperature": 200.0, "ignore_index": -100, "hessian": "prunable"}
    s = m.make_scorer(temperature=1.0)
    assert isinstance(s, GraSPScorer) and s.needs_double_backward and s.needs_targets and s.data_dependent
    with pytest.raises(ValueError, match="temperature"):
        m.make_options(temperature=0.0)


def test_hg_against_central_finite_difference_of_the_gradient():
    model = smooth_net()
    ctx = make_ctx(model, keep=0.8)  # masked: g and Hg live on the kept entries
    pairs = labelled(2, batch=4)
    bs = batches_of(pairs)
    scorer = GraSPScorer()
    ctx.prepass = scorer.prepass(ctx, bs)
    got = scorer.score(ctx, bs)

    w = [ctx.params[n] for n in ctx.names]
    leaves = [t.clone().requires_grad_(True) for t in w]
    g = [a * m for a, m in zip(grad_at(model, leaves, ctx.names, pairs, 200.0), ctx.masks)]
    for a, b in zip(ctx.prepass, g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-16)
    norm_w = torch.sqrt(sum((t ** 2).sum() for t in w))
    norm_g = torch.sqrt(sum((t ** 2).sum() for t in g))
    h = float(1e-5 * norm_w / norm_g)
    plus = grad_at(model, [(t + h * d).requires_grad_(True) for t, d in zip(w, g)], ctx.names, pairs, 200.0)
    minus = grad_at(model, [(t - h * d).requires_grad_(True) for t, d in zip(w, g)], ctx.names, pairs, 200.0)
    fd = [(p - q) / (2 * h) * m for p, q, m in zip(plus, minus, ctx.masks)]
    for n, s, t, d, m in zip(ctx.names, got, w, fd, ctx.masks):
        torch.testing.assert_close(s, t * d, rtol=1e-6, atol=1e-6 * float((t * d).abs().max()), msg=n)
        assert torch.all(s[~m] == 0)
    assert any(bool((s < 0).any()) for s in got) and any(bool((s > 0).any()) for s in got)


def test_score_without_prepass_is_an_error():
    model = smooth_net()
    ctx = make_ctx(model)
    with pytest.raises(RuntimeError, match="prepass"):
        GraSPScorer().score(ctx, batches_of(labelled(1)))


def _top_k(scores, k):
    flat = torch.cat([s.flatten() for s in scores])
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[flat.topk(k).indices] = True
    return out


def test_kept_set_is_the_top_of_theta_hg_also_when_its_sum_is_negative():
    model = bn_net()
    pairs = labelled(3, seed=10)
    names = [n for n, p in model.named_parameters() if p.dim() > 1]
    w = [dict(model.named_parameters())[n].detach() for n in names]
    ref, _ = reference_grasp(model, w, [torch.ones_like(t) for t in w], names, pairs)
    total = float(sum(r.sum() for r in ref))
    assert total < 0  # the case a division by the signed sum gets wrong
    keep = int(0.3 * sum(t.numel() for t in w) + 0.5)
    masks = widetopo.prune(model, pairs, 0.3, method="grasp", verbose=False)
    got = torch.cat([masks[n].flatten() for n in names])
    assert torch.equal(got, _top_k(ref, keep))
    # the lowest theta * Hg are pruned: the kept set is not the top of -theta * Hg, nor of the
    # scores divided by their (negative) sum
    assert not torch.equal(got, _top_k([-r for r in ref], keep))
    assert not torch.equal(got, _top_k([r / total for r in ref], keep))
    raw = widetopo.saliency(model, pairs, "grasp")
    for n, r in zip(names, ref):
        torch.testing.assert_close(raw[n], r, rtol=1e-9, atol=1e-15 + 1e-9 * float(r.abs().max()), msg=n)


@pytest.mark.parametrize("hessian", ["prunable", "all"])
def test_hessian_block_against_float64_reference(hessian):
    """hessian='all': g and Hg over every parameter (conv and linear biases, BatchNorm gamma and
    beta too); the scores are theta * Hg on the prunable weights. The reference takes the double
    backward over the parameters it is given: all of them, or the prunable ones."""
    model = bn_net()
    pairs = labelled(2, seed=4)
    named = dict(model.named_parameters())
    prunable = [n for n, p in named.items() if p.dim() > 1]
    names = list(named) if hessian == "all" else prunable
    assert len(names) > len(prunable) or hessian == "prunable"
    w = [named[n].detach() for n in names]
    ref, _ = reference_grasp(model, w, [torch.ones_like(t) for t in w], names, pairs)
    ref = dict(zip(names, ref))
    got = widetopo.saliency(model, pairs, "grasp", hessian=hessian)
    other = widetopo.saliency(model, pairs, "grasp", hessian="prunable" if hessian == "all" else "all")
    for n in prunable:
        r = ref[n]
        torch.testing.assert_close(got[n], r, rtol=1e-9, atol=1e-15 + 1e-9 * float(r.abs().max()), msg=n)
    assert any(not torch.allclose(got[n], other[n], rtol=1e-6, atol=0) for n in prunable)


def test_temperature_option():
    model = bn_net()
    pairs = labelled(2)
    names = [n for n, p in model.named_parameters() if p.dim() > 1]
    w = [dict(model.named_parameters())[n].detach() for n in names]
    ones = [torch.ones_like(t) for t in w]
    raw = widetopo.saliency(model, pairs, "grasp", temperature=1.0)
    ref, _ = reference_grasp(model, w, ones, names, pairs, temperature=1.0)
    for n, r in zip(names, ref):
        torch.testing.assert_close(raw[n], r, rtol=1e-9, atol=1e-12 * float(r.abs().max()), msg=n)


def test_segmentation_ignore_index_against_per_pixel_loop():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Conv2d(3, 4, 1)).double()
    pairs = segmentation_pairs()

    names = [n for n, p in net.named_parameters() if p.dim() > 1]
    w = [dict(net.named_parameters())[n].detach() for n in names]
    ref, _ = reference_grasp(net, w, [torch.ones_like(t) for t in w], names, pairs, temperature=2.0,
                             loss_fn=per_pixel_loss)
    got = widetopo.saliency(net, pairs, "grasp", ignore_index=255, temperature=2.0)
    for n, r in zip(names, ref):
        torch.testing.assert_close(got[n], r, rtol=1e-9, atol=1e-12 * float(r.abs().max()), msg=n)


def test_basic_properties():
    check_run_properties("grasp", bn_net, labelled(3), 0.2)


@pytest.mark.parametrize("kill_after", [1, 2])
def test_resume_after_kill(tmp_path, monkeypatch, kill_after):
    check_resume(tmp_path, monkeypatch, "grasp", bn_net, labelled(2), 0.1, kill_after, rounds=3)


def test_two_processes_equal_one():
    """Exercises the prepass: g must be the sum over both processes' batches before Hg."""
    check_two_processes("grasp")
