"""ProsPr (docs/design.md §5.7): the meta-gradient through M SGD steps against a plain float64
functional reference (Linear -> BatchNorm in train mode -> ReLU -> Linear, every parameter
stepping), against central finite differences of c -> L(theta_M(c)), the first-order mode's
closed form |theta * dL(theta_M)/dtheta_M|, M = 0 equal to SNIP, masked rounds, and the run
properties (exact K, determinism, model and RNG untouched, resume)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import widetopo
from method_checks import check_two_processes, check_resume, check_run_properties
from widetopo.methods import get_method
from widetopo.scores.prospr import ProsPrScorer

pytestmark = [pytest.mark.needs_kernel("accumulate_score_", "global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]


def bn_mlp():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.3, 0.3)
    return net


def plain_mlp():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(n=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def reference_loss_after_steps(net, c1, c2, x, y, steps, lr):
    """L(x; theta_M) written out: W1*c1, W2*c2 the prunable weights, BatchNorm by its formula
    with the batch's mean and biased variance, M SGD steps on (W1, b1, gamma, beta, W2, b2)."""
    p = [net[0].weight.detach() * c1, net[0].bias.detach().requires_grad_(), net[1].weight.detach().requires_grad_(),
         net[1].bias.detach().requires_grad_(), net[3].weight.detach() * c2, net[3].bias.detach().requires_grad_()]

    def loss_of(w1, b1, gamma, beta, w2, b2):
        h = x @ w1.T + b1
        mean, var = h.mean(0), h.var(0, unbiased=False)
        h = torch.relu((h - mean) / torch.sqrt(var + 1e-5) * gamma + beta)
        return F.cross_entropy(h @ w2.T + b2, y)

    for _ in range(steps):
        grads = torch.autograd.grad(loss_of(*p), p, create_graph=True)
        p = [a - lr * g for a, g in zip(p, grads)]
    return loss_of(*p), p


def reference_scores(net, x, y, steps, lr):
    c1 = torch.ones_like(net[0].weight, requires_grad=True)
    c2 = torch.ones_like(net[3].weight, requires_grad=True)
    loss, _ = reference_loss_after_steps(net, c1, c2, x, y, steps, lr)
    return [g.abs() for g in torch.autograd.grad(loss, [c1, c2])]


@pytest.mark.parametrize("steps, lr", [(1, 0.1), (3, 0.1), (2, 0.5)])
def test_meta_gradient_matches_a_plain_float64_reference(steps, lr):
    net = bn_mlp()
    x, y = batch()
    got = widetopo.saliency(net, [(x, y)], "prospr", steps=steps, lr=lr)
    ref = reference_scores(net, x, y, steps, lr)
    for g, r in zip(got.values(), ref):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-12)


def test_meta_gradient_matches_finite_differences():
    net = bn_mlp()
    x, y = batch()
    got = widetopo.saliency(net, [(x, y)], "prospr", steps=3, lr=0.2)
    h = 1e-6
    for layer, (o, i) in ((0, (2, 1)), (0, (5, 3)), (1, (1, 4))):
        vals = []
        for sign in (1, -1):
            c = [torch.ones_like(net[0].weight), torch.ones_like(net[3].weight)]
            c[layer][o, i] += sign * h
            c = [t.requires_grad_() for t in c]  # (the inner steps differentiate through W * c)
            with torch.enable_grad():
                loss, _ = reference_loss_after_steps(net, c[0], c[1], x, y, 3, 0.2)
            vals.append(float(loss.detach()))
        fd = abs(vals[0] - vals[1]) / (2 * h)
        name = ["0.weight", "3.weight"][layer]
        assert float(got[name][o, i]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_first_order_is_theta_times_the_gradient_after_the_steps():
    net = bn_mlp()
    x, y = batch()
    got = widetopo.saliency(net, [(x, y)], "prospr", steps=2, lr=0.3, first_order=True)
    ones = [torch.ones_like(net[0].weight, requires_grad=True), torch.ones_like(net[3].weight, requires_grad=True)]
    _, p = reference_loss_after_steps(net, *ones, x, y, 2, 0.3)
    w_m = [p[0].detach().requires_grad_(), p[4].detach().requires_grad_()]
    rest = [t.detach() for t in p]

    def loss_at(w1, w2):
        h = x @ w1.T + rest[1]
        h = torch.relu((h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * rest[2] + rest[3])
        return F.cross_entropy(h @ w2.T + rest[5], y)

    g = torch.autograd.grad(loss_at(*w_m), w_m)
    for s, theta, gi in zip(got.values(), (net[0].weight, net[3].weight), g):
        torch.testing.assert_close(s, (theta.detach() * gi).abs(), rtol=1e-7, atol=1e-12)
    # and the full second order differs from it
    full = widetopo.saliency(net, [(x, y)], "prospr", steps=2, lr=0.3)
    assert not torch.allclose(full["0.weight"], got["0.weight"], rtol=1e-3)


def test_zero_steps_is_snip():
    net = plain_mlp()
    data = [batch(6, seed=s) for s in (1, 2)]
    snip = widetopo.saliency(net, data, "snip")
    for first_order in (False, True):
        got = widetopo.saliency(net, data, "prospr", steps=0, first_order=first_order)
        for n in snip:
            torch.testing.assert_close(got[n], snip[n], rtol=1e-9, atol=1e-13)
    a = widetopo.prune(net, data, 0.3, method="prospr", steps=0, verbose=False)
    b = widetopo.prune(net, data, 0.3, method="snip", verbose=False)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_scores_sum_over_batches_each_with_its_own_trajectory():
    net = bn_mlp()
    data = [batch(6, seed=s) for s in (1, 2)]
    got = widetopo.saliency(net, data, "prospr", steps=2)
    signed = [torch.zeros_like(net[0].weight), torch.zeros_like(net[3].weight)]
    for x, y in data:
        c = [torch.ones_like(net[0].weight, requires_grad=True), torch.ones_like(net[3].weight, requires_grad=True)]
        loss, _ = reference_loss_after_steps(net, *c, x, y, 2, 0.1)
        for s, g in zip(signed, torch.autograd.grad(loss, c)):
            s += g
    for g, s in zip(got.values(), signed):
        torch.testing.assert_close(g, s.abs(), rtol=1e-7, atol=1e-12)


def test_pruned_weights_stay_at_zero_through_the_steps():
    net = bn_mlp()
    x, y = batch()
    g = torch.Generator().manual_seed(0)
    masks = {"0.weight": torch.rand(6, 4, generator=g) < 0.6, "3.weight": torch.rand(3, 6, generator=g) < 0.6}
    got = widetopo.saliency(net, [(x, y)], "prospr", masks=masks)
    masked = bn_mlp()
    with torch.no_grad():
        masked[0].weight.mul_(masks["0.weight"])
        masked[3].weight.mul_(masks["3.weight"])
    # reference: the masked net whose pruned entries are held at 0 by c-masking every step
    c1 = masks["0.weight"].double().requires_grad_()
    c2 = masks["3.weight"].double().requires_grad_()
    p = [masked[0].weight.detach() * c1, masked[0].bias.detach().requires_grad_(),
         masked[1].weight.detach().requires_grad_(), masked[1].bias.detach().requires_grad_(),
         masked[3].weight.detach() * c2, masked[3].bias.detach().requires_grad_()]

    def loss_of(w1, b1, gamma, beta, w2, b2):
        h = x @ w1.T + b1
        h = torch.relu((h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * gamma + beta)
        return F.cross_entropy(h @ w2.T + b2, y)

    for _ in range(3):
        grads = torch.autograd.grad(loss_of(*p), p, create_graph=True)
        p = [a - 0.1 * gr for a, gr in zip(p, grads)]
        p[0] = p[0] * masks["0.weight"]
        p[4] = p[4] * masks["3.weight"]
    ref = [gr.abs() * m for gr, m in zip(torch.autograd.grad(loss_of(*p), [c1, c2]), masks.values())]
    for s, r, m in zip(got.values(), ref, masks.values()):
        assert bool((s[~m] == 0).all())
        torch.testing.assert_close(s, r, rtol=1e-7, atol=1e-12)


def test_registry_entry_and_options():
    m = get_method("prospr")
    assert m.scorer is ProsPrScorer and m.schedule.rounds == 1
    assert m.defaults() == {"steps": 3, "lr": 0.1, "first_order": False, "ignore_index": -100}
    assert m.make_scorer().needs_double_backward and not m.make_scorer(first_order=True).needs_double_backward
    assert not m.make_scorer(steps=0).needs_double_backward
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        m.make_options(steps=-1)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        m.make_options(lr=0.0)
    with pytest.raises(ValueError, match="needs targets"):
        widetopo.prune(bn_mlp(), [batch()[0]], 0.5, method="prospr", verbose=False)


def test_run_properties(tmp_path, monkeypatch):
    data = [batch(6, seed=s) for s in (1, 2)]
    check_run_properties("prospr", bn_mlp, data, 0.3)
    check_resume(tmp_path, monkeypatch, "prospr", bn_mlp, data, 0.3, 1, rounds=2)


def test_two_processes_give_the_masks_of_one():
    check_two_processes("prospr")
