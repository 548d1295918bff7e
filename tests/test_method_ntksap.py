"""NTK-SAP (docs/design.md §5.2) against a hand-written float64 implementation (deep copies, explicit
per-layer re-initialisation, BatchNorm calibrated by hand), the Monte-Carlo expectation on one
linear layer, and the generic method properties."""
import math

import pytest
import torch
from torch import nn

import widetopo
from method_checks import bn_net, check_resume, check_run_properties, check_two_processes, labelled
from references import reference_ntksap
from scoring_nets import TinyCNN, make_ctx, make_model
from widetopo.methods import get_method
from widetopo.scores import Batch
from widetopo.scores.ntksap import NTKSAPScorer, reinit_params, reinit_plan

pytestmark = [pytest.mark.needs_kernel("accumulate_score_", "global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]

def noise_batches(n=2):
    g = torch.Generator().manual_seed(8)
    return [Batch(i, torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)) for i in range(n)]


def test_registry_entry():
    m = get_method("ntksap")
    assert m.name == "ntk-sap" and get_method("NTK-SAP") is m
    assert m.schedule.rounds == 100 and m.schedule.restorations == 0
    assert m.defaults() == {"eps": 0.01, "noise_input": True, "reinit": True}
    s = m.make_scorer()
    assert isinstance(s, NTKSAPScorer) and s.data_dependent and not s.needs_targets and not s.decay
    with pytest.raises(ValueError, match="eps"):
        m.make_options(eps=-1.0)
    with pytest.raises(TypeError, match="reinit"):
        m.make_options(reinit="no")


@pytest.mark.parametrize("noise_input,reinit", [(True, True), (False, True), (True, False), (False, False)])
def test_matches_hand_written_reference(noise_input, reinit):
    model = make_model(TinyCNN)
    ctx = make_ctx(model)
    before = {n: p.clone() for n, p in ctx.params.items()}
    scorer = NTKSAPScorer(noise_input=noise_input, reinit=reinit)
    rng = torch.random.get_rng_state()
    got = scorer.finalize(ctx, scorer.score(ctx, noise_batches()))
    assert torch.equal(rng, torch.random.get_rng_state())
    ref = reference_ntksap(model, ctx, noise_batches(), noise_input=noise_input, reinit=reinit)
    for n, a, r, m in zip(ctx.names, got, ref, ctx.masks):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12 * float(r.max()), msg=n)
        assert torch.all(a[~m] == 0) and bool((a[m] > 0).any())
    # the re-drawn weights live only inside the scorer
    assert all(torch.equal(before[n], ctx.params[n]) for n in before)


def test_each_switch_changes_the_scores():
    model = make_model(TinyCNN)
    ctx = make_ctx(model)
    runs = {}
    for key in [(True, True), (False, True), (True, False)]:
        s = NTKSAPScorer(noise_input=key[0], reinit=key[1])
        runs[key] = s.finalize(ctx, s.score(ctx, noise_batches()))
    keys = list(runs)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not all(torch.allclose(a, b) for a, b in zip(runs[keys[i]], runs[keys[j]]))


def test_linear_layer_monte_carlo_expectation():
    """One linear layer, no re-initialisation, fixed input x (n samples, s inputs), m = 1:
    dF/dm_js = 2 eps^2 sum_n (delta_j . x_n) delta_js x_ns, so over delta ~ N(0, I)
        E[dF/dm_js] = 2 eps^2 A_ss,   Var = 4 eps^4 (A_ss^2 + sum_s' A_ss'^2),   A = sum_n x_n x_n^T,
    whatever W is (for one-sample batches and one input, 2 eps^2 x_s^2 of docs/design.md §5.2). Each
    batch index draws its own delta, so B batches of the same x are B independent draws."""
    eps, draws = 0.01, 1000
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, generator=g, dtype=torch.float64)
    a = x.T @ x
    expected = (2 * eps ** 2 * torch.diagonal(a)).expand(3, 4)
    sd = torch.sqrt(4 * eps ** 4 * (torch.diagonal(a) ** 2 + (a ** 2).sum(1))).expand(3, 4)
    scorer = NTKSAPScorer(noise_input=False, reinit=False, eps=eps)

    def linear_ctx(w_seed):
        torch.manual_seed(w_seed)
        return make_ctx(nn.Linear(4, 3, bias=False).double(), keep=1.01)

    mean = scorer.score(linear_ctx(0), [Batch(i, x) for i in range(draws)])[0] / draws
    z = (mean - expected) / (sd / math.sqrt(draws))
    assert float(z.abs().max()) < 4.5, z
    # the test can tell a factor 2 apart: eps^2 * A_ss is many standard errors away
    assert float(((mean - expected / 2) / (sd / math.sqrt(draws))).abs().median()) > 4
    # exactly independent of W (same deltas, another W)
    few = [Batch(i, x) for i in range(10)]
    torch.testing.assert_close(scorer.score(linear_ctx(0), few)[0], scorer.score(linear_ctx(1), few)[0],
                               rtol=1e-10, atol=1e-14)


def test_reinit_plan_per_layer_type():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4, padding_idx=2)
            self.attn = nn.MultiheadAttention(4, 2)
            self.ln = nn.LayerNorm(4)
            self.conv = nn.Conv1d(4, 6, 3, groups=2)
            self.extra = nn.Parameter(torch.ones(5, 2, 3))
            self.scale = nn.Parameter(torch.full((3,), 0.5))

        def forward(self, x):
            return x

    net = Mixed()
    names = ["emb.weight", "attn.in_proj_weight", "attn.out_proj.weight", "conv.weight", "extra", "scale"]
    plan = {n: (kind, scale, extra) for n, kind, scale, extra in reinit_plan(net, names)}
    assert plan == {
        "emb.weight": ("embedding", 1.0, 2),
        "attn.in_proj_weight": ("uniform", math.sqrt(6 / (12 + 4)), None),
        "attn.in_proj_bias": ("const", 0.0, None),
        "attn.out_proj.weight": ("normal", math.sqrt(2 / 4), None),
        "attn.out_proj.bias": ("const", 0.0, None),
        "ln.weight": ("const", 1.0, None), "ln.bias": ("const", 0.0, None),
        "conv.weight": ("normal", math.sqrt(2 / (2 * 3)), None), "conv.bias": ("const", 0.0, None),
        "extra": ("normal", math.sqrt(2 / 6), None),
        # "scale": rank 1 of no known module type -> keeps its values
    }
    params = {n: p.detach() for n, p in net.named_parameters()}
    drawn = reinit_params(params, reinit_plan(net, names), torch.Generator().manual_seed(3))
    assert torch.equal(drawn["scale"], params["scale"]) and drawn["scale"] is params["scale"]
    assert torch.all(drawn["emb.weight"][2] == 0) and bool((drawn["emb.weight"][3] != 0).all())
    bound = math.sqrt(6 / 16)
    assert float(drawn["attn.in_proj_weight"].abs().max()) <= bound
    gen = torch.Generator().manual_seed(3)  # the draws in named_parameters order (own ones first)
    assert torch.equal(drawn["extra"], torch.randn(5, 2, 3, generator=gen) * math.sqrt(2 / 6))
    emb = torch.randn(7, 4, generator=gen)
    emb[2] = 0
    assert torch.equal(drawn["emb.weight"], emb)
    assert torch.equal(drawn["attn.in_proj_weight"], (torch.rand(12, 4, generator=gen) * 2 - 1) * bound)


def test_token_ids_get_the_noise_at_the_embedding_output():
    """docs/design.md §2.5: for token ids xi replaces the input embedding's output, so the scores
    equal those of the network after the embedding fed Gaussian inputs of that shape."""
    torch.manual_seed(0)
    emb, rest = nn.Embedding(5, 4), nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
    net = nn.Sequential(emb, *rest)
    ids = [torch.randint(0, 5, (3, 2), generator=torch.Generator().manual_seed(0))]
    got = widetopo.saliency(net, ids, "ntk-sap", reinit=False, verbose=False)
    ref = widetopo.saliency(rest, [torch.zeros(3, 2, 4)], "ntk-sap", reinit=False, verbose=False)
    assert list(got) == ["2.weight"] and list(ref) == ["1.weight"]
    assert torch.allclose(got["2.weight"], ref["1.weight"], rtol=1e-6, atol=0)
    assert float(got["2.weight"].abs().sum()) > 0
    masks = widetopo.prune(net, ids, 0.5, method="ntk-sap", rounds=2, noise_input=False, verbose=False,
                           include=(nn.Linear, nn.Embedding))
    assert sum(int(m.sum()) for m in masks.values()) == (20 + 24) // 2


def test_integer_inputs_without_embedding_are_refused():
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 3))
    data = [torch.randint(0, 5, (3, 2), generator=torch.Generator().manual_seed(0))]
    snap = [p.clone() for p in net.parameters()]
    with pytest.raises(widetopo.UnsupportedInputsError, match="noise_input=False"):
        widetopo.prune(net, data, 0.5, method="ntk-sap", rounds=1, verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(snap, net.parameters()))


def test_basic_properties():
    masks = check_run_properties("ntk-sap", bn_net, labelled(3), 0.1, rounds=3)
    other = widetopo.prune(bn_net(), labelled(3), 0.1, method="ntk-sap", rounds=3, seed=1, verbose=False)
    assert not all(torch.equal(masks[k], other[k]) for k in masks)  # the seed matters


@pytest.mark.parametrize("kill_after", [1, 2])
def test_resume_after_kill(tmp_path, monkeypatch, kill_after):
    check_resume(tmp_path, monkeypatch, "ntk-sap", bn_net, labelled(2), 0.1, kill_after, rounds=3)


def test_two_processes_equal_one():
    check_two_processes("ntk-sap")


def test_reinit_of_an_in_out_layer_draws_with_fan_in_of_dim_0(monkeypatch):
    """transformers' Conv1D stores (in, out): its Kaiming std is sqrt(2 / in), not sqrt(2 / out)."""
    from widetopo.sparsity import selection
    from widetopo.sparsity.selection import register_in_out_layer

    monkeypatch.setattr(selection, "IN_OUT_LAYERS", list(selection.IN_OUT_LAYERS))  # registration undone after

    class InOut(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_in, n_out))

        def forward(self, x):
            return x @ self.weight

    register_in_out_layer(InOut)
    model = nn.Sequential(InOut(50, 8), nn.ReLU(), nn.Linear(8, 3))
    plan = {name: (kind, scale) for name, kind, scale, _ in reinit_plan(model, ["0.weight", "2.weight"])}
    assert plan["0.weight"] == ("normal", pytest.approx((2.0 / 50) ** 0.5))
    assert plan["2.weight"] == ("normal", pytest.approx((2.0 / 8) ** 0.5))
