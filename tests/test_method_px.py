"""PX (docs/design.md §5.1) against closed forms on bias-free ReLU MLPs, a straightforward deep-copy
reference on a CNN with BatchNorm and biases, and the run-level properties of every method."""
import copy
import datetime
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import widetopo
from gloo import spawn
from method_checks import check_resume, check_run_properties
from references import px_closed_form, reference_px, reference_px_R
from scoring_nets import TinyCNN, make_ctx, make_model
from widetopo.engine.rounds import NoiseScoresError
from widetopo.scores.base import Batch, ScoreContext
from widetopo.scores.px import PXScorer
from widetopo.scores.synflow_l2 import SynFlowL2Scorer

pytestmark = [pytest.mark.needs_kernel("accumulate_score_", "global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]

ACTIVATIONS = {
    "F.relu": lambda self, z: F.relu(z),
    "torch.relu": lambda self, z: torch.relu(z),
    "Tensor.relu": lambda self, z: z.relu(),
    "nn.ReLU": lambda self, z: self.relu(z),
    "nn.ReLU(inplace)": lambda self, z: self.relu_inplace(z),
    "torch.relu_": lambda self, z: torch.relu_(z),
    "F.relu(inplace)": lambda self, z: F.relu(z, inplace=True),
}


class TwoLayer(nn.Module):
    """x -> W1 -> act -> W2, bias-free; `style` picks how the activation is written."""

    def __init__(self, n_in=5, hidden=7, n_out=3, style="F.relu", act=None, depth=2):
        super().__init__()
        widths = [n_in] + [hidden] * (depth - 1) + [n_out]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:]))
        self.relu, self.relu_inplace = nn.ReLU(), nn.ReLU(inplace=True)
        self.style, self.act_fn = style, act

    def act(self, z):
        return self.act_fn(z) if self.act_fn is not None else ACTIVATIONS[self.style](self, z)

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


def mlp_ctx(model, keep=0.7, seed=1):
    g = torch.Generator().manual_seed(seed)
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = [torch.rand(params[n].shape, generator=g) < keep for n in names]
    for n, m in zip(names, masks):
        params[n] = params[n] * m
    return ScoreContext(model=model, names=names, params=params, buffers={}, masks=masks)


def data(n=6, d=5, seed=2):
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return [Batch(0, x[: n // 2]), Batch(1, x[n // 2:])], x


def px(ctx, batches, **options):
    scorer = PXScorer(**options)
    out = scorer.finalize(ctx, scorer.score(ctx, batches))
    return [s / scorer.diagnostics["scale"] for s in out], scorer.diagnostics


@pytest.mark.parametrize("style", list(ACTIVATIONS))
def test_two_layer_closed_form_for_every_way_of_writing_relu(style):
    torch.manual_seed(0)
    model = TwoLayer(style=style).double()
    ctx = mlp_ctx(model)
    batches, x = data()
    (S1, S2), diag = px(ctx, batches)
    W1, W2 = ctx.params["layers.0.weight"], ctx.params["layers.1.weight"]
    M1, M2 = ctx.masks
    R1, R2 = px_closed_form(W1, W2, M1, M2, x, lambda z: 1.0 if z > 0 else 0.0)
    torch.testing.assert_close(S1, R1, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(S2, R2, rtol=1e-10, atol=1e-14)
    assert torch.all(S1[~M1] == 0) and torch.all(S2[~M2] == 0)
    # a g-net that were dense at pruned positions (all weights 1) would give other scores
    D1, D2 = px_closed_form(W1, W2, torch.ones_like(M1), torch.ones_like(M2), x, lambda z: 1.0 if z > 0 else 0.0)
    assert not torch.allclose(S2, D2)


@pytest.mark.parametrize("name,act,gate", [
    ("leaky_relu", lambda z: F.leaky_relu(z, 0.1), lambda z: 1.0 if z > 0 else 0.1),
    ("gelu", F.gelu, lambda z: float(F.gelu(torch.tensor(z, dtype=torch.float64))) / z),
    ("nn.Tanh", nn.Tanh(), lambda z: float(torch.tanh(torch.tensor(z, dtype=torch.float64))) / z),
])
def test_other_activations_use_the_slope_as_gate(name, act, gate):
    torch.manual_seed(0)
    model = TwoLayer(act=act).double()
    ctx = mlp_ctx(model)
    batches, x = data()
    (S1, S2), _ = px(ctx, batches)
    R1, R2 = px_closed_form(ctx.params["layers.0.weight"], ctx.params["layers.1.weight"], *ctx.masks, x, gate)
    torch.testing.assert_close(S1, R1, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(S2, R2, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("act", [torch.sigmoid, nn.Softplus(), lambda z: z.sigmoid()])
def test_activations_without_a_gate_are_an_error(act):
    model = TwoLayer(act=act).double()
    ctx = mlp_ctx(model)
    with pytest.raises(ValueError, match="px: the model uses (sigmoid|softplus).*supports ReLU"):
        PXScorer().score(ctx, data()[0])


def test_per_layer_conservation_on_a_deeper_mlp():
    torch.manual_seed(3)
    model = TwoLayer(n_in=6, hidden=9, n_out=4, depth=4).double()
    ctx = mlp_ctx(model, keep=0.6)
    batches, x = data(8, 6)
    scores, diag = px(ctx, batches)
    r = reference_px_R(model, ctx, x)
    assert diag["R"] == pytest.approx(r, rel=1e-12)
    for name, s in zip(ctx.names, scores):
        assert float(s.sum()) == pytest.approx(r, rel=1e-10), name


def test_one_output_ranks_like_squared_synflow_l2():
    torch.manual_seed(4)
    model = TwoLayer(n_in=6, hidden=8, n_out=1, depth=3).double()
    ctx = mlp_ctx(model, keep=0.8)
    scores, _ = px(ctx, data(6, 6)[0])
    sf = SynFlowL2Scorer(input_shape=(6,), score_form="square").score(ctx, [])
    for a, b in zip(scores, sf):
        assert torch.equal(a == 0, b == 0)  # the same dead paths
    ratio = torch.cat([(a / b)[b > 0] for a, b in zip(scores, sf)])
    assert ratio.numel() > 50
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-9, atol=0)


# ------------------------------------------------------------- CNN with BatchNorm and biases
class ActCNN(nn.Module):
    """conv(+bias) -> BN -> act -> conv -> BN -> act -> maxpool -> linear(+bias); every
    activation goes through self.act so that the reference can replace it."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 3 * 3, classes)

    def act(self, z):
        return F.relu(z)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.act(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("bn", ["running", "train", "eval"])
def test_cnn_with_batchnorm_and_biases_matches_reference(bn):
    model = make_model(ActCNN)
    model.train()
    ctx = make_ctx(model, keep=0.7)
    g = torch.Generator().manual_seed(5)
    batches = [Batch(i, torch.randn(3, 1, 6, 6, dtype=torch.float64, generator=g)) for i in range(2)]
    buffers = {n: b.clone() for n, b in ctx.buffers.items()}
    rng = torch.random.get_rng_state()
    got, _ = px(ctx, batches, batchnorm=bn)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(torch.equal(buffers[n], ctx.buffers[n]) for n in buffers)  # the eval statistics are kept
    assert all(m.training for m in model.modules())
    ref = reference_px(model, ctx, batches, bn=bn)
    for n, a, r, m in zip(ctx.names, got, ref, ctx.masks):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12 * float(r.max()), msg=n)
        assert torch.all(a[~m] == 0)
        assert float(a[m].max()) > 0


class BNPoolNet(nn.Module):
    """Bias-free conv -> BN -> ReLU -> conv -> BN -> ReLU -> global average pool -> linear: the
    net where train-mode BatchNorm makes the h-net constant."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def test_per_layer_conservation_with_running_batchnorm():
    """Default batchnorm="running" with zero shifts (running mean 0, beta 0; gamma and the running
    variance random): sum_{j in layer} S_j = R for every layer, R written out with F.conv2d."""
    torch.manual_seed(11)
    model = BNPoolNet().double()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.running_var.uniform_(0.5, 2.0)
    ctx = make_ctx(model, keep=0.7)
    g = torch.Generator().manual_seed(12)
    xs = [torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=g) for _ in range(2)]
    scores, diag = px(ctx, [Batch(i, x) for i, x in enumerate(xs)])
    W1, W2, W3 = (ctx.params[n] for n in ctx.names)
    M1, M2, M3 = (m.double() for m in ctx.masks)
    s1, s2 = ((bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(1, -1, 1, 1)
              for bn in (model.bn1, model.bn2))
    h = torch.ones(1, 2, 5, 5, dtype=torch.float64)
    h = F.conv2d(F.conv2d(h, W1 ** 2, padding=1) * s1 ** 2, W2 ** 2, padding=1) * s2 ** 2
    z2 = h.mean((2, 3)) @ (W3 ** 2).T
    r = 0.0
    for x in xs:
        a1 = F.conv2d(x, W1, padding=1) * s1
        z1 = F.conv2d(x ** 2, M1, padding=1) * (a1 > 0)
        a2 = F.conv2d(torch.relu(a1), W2, padding=1) * s2
        z1 = F.conv2d(z1, M2, padding=1) * (a2 > 0)
        r += float(((z1.mean((2, 3)) @ M3.T) * z2).sum())
    assert diag["R"] == pytest.approx(r, rel=1e-12)
    for name, s in zip(ctx.names, scores):
        assert float(s.sum()) == pytest.approx(r, rel=1e-10), name


def test_running_batchnorm_needs_running_statistics():
    model = make_model(TinyCNN, track=False)
    ctx = make_ctx(model)
    x = [Batch(0, torch.randn(2, 1, 8, 8, dtype=torch.float64))]
    with pytest.raises(ValueError, match="batchnorm='running'.*track_running_stats=False.*batchnorm='train'"):
        PXScorer().score(ctx, x)
    PXScorer(batchnorm="train").score(ctx, x)


def test_saliency_api_matches_reference():
    model = make_model(ActCNN)
    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(3, 1, 6, 6, dtype=torch.float64, generator=g) for _ in range(2)]
    got = widetopo.saliency(model, xs, "px")
    ctx = make_ctx(model, keep=1.0)
    ref = reference_px(model, ctx, [Batch(i, x) for i, x in enumerate(xs)])
    peak_got = max(float(v.max()) for v in got.values())
    peak_ref = max(float(r.max()) for r in ref)
    for n, r in zip(ctx.names, ref):
        torch.testing.assert_close(got[n] / peak_got, r / peak_ref, rtol=1e-9, atol=1e-13, msg=n)


def test_gradient_is_summed_over_batches_before_the_abs():
    """One backward over all batches equals the per-batch sum of signed gradients: the split
    into score() calls (processes) does not change the finalized scores."""
    model = make_model(ActCNN)
    ctx = make_ctx(model, keep=0.7)
    g = torch.Generator().manual_seed(6)
    batches = [Batch(i, torch.randn(2, 1, 6, 6, dtype=torch.float64, generator=g)) for i in range(3)]
    scorer = PXScorer()
    whole = scorer.score(ctx, batches)
    parts = [scorer.score(ctx, batches[:1]), scorer.score(ctx, batches[1:])]
    assert any(bool((s < 0).any()) for s in whole)  # signed until finalize (BatchNorm)
    for w, a, b in zip(whole, *parts):
        torch.testing.assert_close(w, a + b, rtol=1e-10, atol=1e-12 * float(w.abs().max()))


def test_deep_net_without_batchnorm_does_not_overflow_float32():
    torch.manual_seed(7)
    model = TwoLayer(n_in=8, hidden=40, n_out=3, depth=28)  # float32
    x = torch.rand(4, 8) + 1.0
    net = copy.deepcopy(model)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
        assert not torch.isfinite(net(x ** 2)).all()  # the float32 g-net overflows (40^27)
    ctx = mlp_ctx(model, keep=1.0)
    scorer = PXScorer()
    scores = scorer.finalize(ctx, scorer.score(ctx, [Batch(0, x)]))
    sums = [float(s.sum()) for s in scores]
    assert all(torch.isfinite(s).all() for s in scores) and min(sums) > 0
    assert sums == pytest.approx([sums[0]] * len(sums), rel=1e-9)  # per-layer conservation survives
    masks = widetopo.prune(model, [x], 0.2, method=PXScorer(), rounds=2, verbose=False)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * sum(p.numel() for p in model.parameters()))


def test_batchnorm1d_and_dropout():
    """Dropout stays off: the scores equal those of the same network without the dropout.
    BatchNorm1d as the running-statistics map (default) and in eval mode keeps the dependence of
    the layer before it; with batchnorm="train" the h-net's BatchNorm1d sees identical samples
    (variance 0, two of them so that it runs) and outputs its shift: the round is refused."""
    torch.manual_seed(9)
    body = [nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)]
    with_dropout = nn.Sequential(*body[:3], nn.Dropout(0.5), body[3]).double()
    plain = nn.Sequential(*body).double()
    x = [torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))]
    a = widetopo.saliency(with_dropout, x, "px")
    b = widetopo.saliency(plain, x, "px")
    assert list(a) == ["0.weight", "4.weight"] and list(b) == ["0.weight", "3.weight"]
    torch.testing.assert_close(a["0.weight"], b["0.weight"], rtol=1e-12, atol=0)
    torch.testing.assert_close(a["4.weight"], b["3.weight"], rtol=1e-12, atol=0)
    assert float(a["0.weight"].min()) > 0 and float(a["4.weight"].min()) > 0
    e = widetopo.saliency(with_dropout, x, "px", batchnorm="eval")
    assert float(e["0.weight"].min()) > 0 and float(e["4.weight"].min()) > 0
    # train: the BatchNorm1d outputs its shift beta = 0 plus rounding noise, so the last layer's
    # scores are noise too; the engine refuses the round, naming the layer and the option
    with pytest.raises(NoiseScoresError, match=r"'px' scores of '4.weight' in round 1.*batchnorm='running'"):
        widetopo.saliency(with_dropout, x, "px", batchnorm="train")


def test_registered_name_and_defaults():
    from widetopo.methods import get_method

    m = get_method("px")
    assert m.schedule.rounds == 100 and m.scorer is PXScorer
    assert PXScorer.data_dependent and not PXScorer.needs_targets and PXScorer.selection == "global"


# ------------------------------------------------------------------------- run properties
def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def small_data(n=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 2, 4, 4, generator=g, dtype=dtype) for _ in range(n)]


def test_run_properties():
    masks = check_run_properties("px", small_model, small_data(), 0.1, rounds=3, seed=2)
    assert masks.meta["method"] == "px"


@pytest.mark.parametrize("kill_after", [1, 2])
def test_resume_after_kill(tmp_path, monkeypatch, kill_after):
    check_resume(tmp_path, monkeypatch, "px", small_model, small_data(), 0.1, kill_after, rounds=3)


# ----------------------------------------------------------------------- two gloo processes
def _dist_model():
    return small_model().double()


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        masks = widetopo.prune(_dist_model(), small_data(4, torch.float64), 0.1, method="px", rounds=2,
                               verbose=False)
        torch.save(dict(masks), os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_give_the_masks_of_one(tmp_path):
    spawn(_worker, 2, str(tmp_path), timeout=120)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = widetopo.prune(_dist_model(), small_data(4, torch.float64), 0.1, method=PXScorer(), rounds=2,
                            verbose=False)
    for name in single:
        assert torch.equal(r0[name], r1[name]), name
        assert torch.equal(r0[name], single[name]), name
