"""widetopo.ntk_spectrum / ntk_matrix (widetopo.sparsity.spectrum) against independent references:
the closed form of a masked linear model, an explicit Jacobian (torch.autograd.functional.jacobian,
float64) of small conv nets with BatchNorm, torch.linalg.eigvalsh of those matrices, Weyl's
inequality, and the Hutchinson variance of Rademacher probes."""
import argparse
import copy
import csv
import json
import math

import pytest
import torch
from torch import nn

import widetopo
from widetopo.sparsity.spectrum import spectrum_report

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- references (float64)

def conv_net(seed=0):
    """Two conv + BN + ReLU layers, average pool, linear (3 logits); BN with non-trivial statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


CONV_PRUNABLE = ["0.weight", "3.weight", "8.weight"]  # the Conv/Linear weights, written out


def random_masks(net, names, density, seed):
    g = torch.Generator().manual_seed(seed)
    params = dict(net.named_parameters())
    return {n: torch.rand(params[n].shape, generator=g) < density for n in names}


def reference_jacobian(net, x, masks, names, bn_train=False):
    """J (N x P) of the flattened outputs of f(θ ⊙ m) w.r.t. θ (the `names` tensors), float64, by
    torch.autograd.functional.jacobian on a float64 copy (eval mode; BN in train mode if asked)."""
    net = copy.deepcopy(net).double().eval()
    if bn_train:
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
    base = {n: p.detach() for n, p in net.named_parameters()}
    shapes = [base[n].shape for n in names]
    sizes = [base[n].numel() for n in names]
    mk = [masks[n].double() if n in masks else torch.ones(s, dtype=torch.float64) for n, s in zip(names, shapes)]
    flat0 = torch.cat([base[n].reshape(-1) for n in names])

    def f(flat):
        new = dict(base)
        for n, shape, piece, m in zip(names, shapes, flat.split(sizes), mk):
            new[n] = piece.view(shape) * m
        return torch.func.functional_call(net, new, (x.double(),)).reshape(-1)

    return torch.autograd.functional.jacobian(f, flat0)


def descending_eigvals(theta):
    return torch.linalg.eigvalsh((theta + theta.T) / 2).flip(0)


# ----------------------------------------------------------------------------- closed form

def test_masked_linear_model_closed_form():
    """f = (W ⊙ m) x: Θ[(i,k),(j,l)] = δ_kl Σ_a x_ia m_ka x_ja, i.e. the block of output k is X diag(m_k) Xᵀ."""
    g = torch.Generator().manual_seed(1)
    n, p, c = 4, 5, 3
    net = nn.Linear(p, c, bias=False)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    M = torch.rand(c, p, generator=g) < 0.6
    expected = torch.zeros(n * c, n * c, dtype=torch.float64)
    for k in range(c):
        block = X @ torch.diag(M[k].double()) @ X.T
        for i in range(n):
            for j in range(n):
                expected[i * c + k, j * c + k] = block[i, j]
    theta = widetopo.ntk_matrix(net, X.float(), {"weight": M})
    # the float32 input is cast to float64: compare with the closed form of the float32-rounded X
    Xr = X.float().double()
    expected_r = torch.zeros_like(expected)
    for k in range(c):
        block = Xr @ torch.diag(M[k].double()) @ Xr.T
        expected_r[k::c, k::c] = block
    torch.testing.assert_close(theta, expected_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(expected_r[::c, ::c], expected[::c, ::c], rtol=1e-5, atol=1e-5)  # layout check
    vals = widetopo.ntk_spectrum(net, X.float(), {"weight": M})
    assert vals.dtype == torch.float64 and vals.shape == (n * c,)
    assert bool((vals[:-1] >= vals[1:]).all())
    torch.testing.assert_close(vals, descending_eigvals(expected_r), rtol=1e-10, atol=1e-12)


def test_bias_by_option_adds_identity_blocks():
    """parameters="all": the bias of logit k has gradient e_k, so Θ gains δ_kl on every (i, j)."""
    g = torch.Generator().manual_seed(2)
    n, p, c = 3, 4, 2
    net = nn.Linear(p, c).double()
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    M = torch.rand(c, p, generator=g) < 0.5
    expected = torch.zeros(n * c, n * c, dtype=torch.float64)
    for k in range(c):
        expected[k::c, k::c] = X @ torch.diag(M[k].double()) @ X.T + 1.0
    theta = widetopo.ntk_matrix(net, X, {"weight": M}, parameters="all")
    torch.testing.assert_close(theta, expected, rtol=1e-12, atol=1e-12)
    prunable_only = widetopo.ntk_matrix(net, X, {"weight": M})
    torch.testing.assert_close(prunable_only, expected - torch.kron(torch.ones(n, n, dtype=torch.float64),
                                                                    torch.eye(c, dtype=torch.float64)))


# ----------------------------------------------------------------------------- explicit Jacobian

@pytest.mark.parametrize("batchnorm", ["eval", "train"])
def test_chunked_blocks_equal_explicit_jacobian_conv_bn(batchnorm):
    net = conv_net()
    x = torch.randn(5, 2, 5, 5, generator=torch.Generator().manual_seed(3))
    masks = random_masks(net, CONV_PRUNABLE, 0.5, seed=4)
    J = reference_jacobian(net, x, masks, CONV_PRUNABLE, bn_train=batchnorm == "train")
    expected = J @ J.T
    # chunk_size=2 and blocks of 1-2 samples: several vmapped chunks and off-diagonal blocks
    theta = widetopo.ntk_matrix(net, x, masks, batchnorm=batchnorm, chunk_size=2,
                                max_block_bytes=2 * 3 * 174 * 8)
    torch.testing.assert_close(theta, expected, rtol=1e-10, atol=1e-12)
    vals = widetopo.ntk_spectrum(net, x, masks, batchnorm=batchnorm, chunk_size=3)
    torch.testing.assert_close(vals, descending_eigvals(expected), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("batchnorm", ["eval", "train"])
def test_trace_exact_equals_sum_of_eigenvalues_and_row_norms(batchnorm):
    net = conv_net(seed=5)
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(6))
    masks = random_masks(net, CONV_PRUNABLE, 0.3, seed=7)
    J = reference_jacobian(net, x, masks, CONV_PRUNABLE, bn_train=batchnorm == "train")
    row_norms = float((J ** 2).sum())
    trace = widetopo.ntk_spectrum(net, x, masks, mode="trace", chunk_size=3, batchnorm=batchnorm)
    vals = widetopo.ntk_spectrum(net, x, masks, batchnorm=batchnorm)
    assert trace.dim() == 0 and trace.dtype == torch.float64
    assert math.isclose(float(trace), row_norms, rel_tol=1e-11)
    assert math.isclose(float(vals.sum()), row_norms, rel_tol=1e-10)


def test_sum_outputs_is_the_summed_kernel():
    """outputs="sum": one output per sample, Θ_sum = S Θ Sᵀ with S summing each sample's logits."""
    net = conv_net(seed=8)
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(9))
    J = reference_jacobian(net, x, {}, CONV_PRUNABLE)
    S = torch.kron(torch.eye(4, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    expected = S @ J @ J.T @ S.T
    torch.testing.assert_close(widetopo.ntk_matrix(net, x, outputs="sum"), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(widetopo.ntk_spectrum(net, x, outputs="sum"), descending_eigvals(expected),
                               rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- Weyl

def test_masking_lowers_every_sorted_eigenvalue():
    """With the pruned weights already zero in θ, J_masked = J diag(m) (a coordinate restriction),
    so Θ_dense − Θ_masked = J diag(1−m) Jᵀ ⪰ 0 and, by Weyl, λ_i(masked) <= λ_i(dense) for all i."""
    net = conv_net(seed=10)
    masks = random_masks(net, CONV_PRUNABLE, 0.4, seed=11)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    x = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(12))
    dense = widetopo.ntk_spectrum(net, x)
    masked = widetopo.ntk_spectrum(net, x, masks)
    slack = 1e-12 * float(dense[0])
    assert bool((masked <= dense + slack).all()), (masked - dense).max()
    assert float(masked.sum()) < float(dense.sum()) * (1 - 1e-3)  # something was removed


# ----------------------------------------------------------------------------- Lanczos, Hutchinson

@pytest.mark.parametrize("batchnorm", ["eval", "train"])
def test_lanczos_topk_equals_eigvalsh(batchnorm):
    net = conv_net(seed=13)
    x = torch.randn(12, 2, 5, 5, generator=torch.Generator().manual_seed(14))
    masks = random_masks(net, CONV_PRUNABLE, 0.5, seed=15)
    J = reference_jacobian(net, x, masks, CONV_PRUNABLE, bn_train=batchnorm == "train")
    expected = descending_eigvals(J @ J.T)[:4]  # N = 36
    # chunk_size=5: 3 sample chunks (eval); 3 vectors per vmapped call over all 12 samples (train)
    top = widetopo.ntk_spectrum(net, x, masks, mode="topk", k=4, tol=1e-10, chunk_size=5, batchnorm=batchnorm)
    assert top.shape == (4,) and top.dtype == torch.float64
    torch.testing.assert_close(top, expected, rtol=1e-9, atol=1e-12)


def test_lanczos_finds_repeated_eigenvalues():
    """A dense linear model: Θ = X Xᵀ ⊗ I_c, every non-zero eigenvalue repeated c times."""
    g = torch.Generator().manual_seed(16)
    n, p, c = 10, 6, 4
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    net = nn.Linear(p, c, bias=False).double()
    gram = torch.linalg.eigvalsh(X @ X.T).flip(0)
    expected = gram.repeat_interleave(c)[:6]  # λ1 x4, λ2 x2
    top = widetopo.ntk_spectrum(net, X, mode="topk", k=6, tol=1e-10)
    torch.testing.assert_close(top, expected, rtol=1e-9, atol=1e-12)


def test_lanczos_past_the_rank_of_theta():
    """Θ = X Xᵀ ⊗ I_2 has rank 4 of N = 20: the Krylov space closes after one product and
    the block is refilled with random directions; the top 6 are the 4 non-zero ones and 0, 0."""
    g = torch.Generator().manual_seed(26)
    X = torch.randn(10, 2, generator=g, dtype=torch.float64)
    net = nn.Linear(2, 2, bias=False).double()
    expected = torch.cat([torch.linalg.eigvalsh(X.T @ X).flip(0).repeat_interleave(2),
                          torch.zeros(2, dtype=torch.float64)])
    top = widetopo.ntk_spectrum(net, X, mode="topk", k=6, tol=1e-10)
    torch.testing.assert_close(top, expected, rtol=1e-9, atol=1e-9 * float(expected[0]))


@pytest.mark.parametrize("batchnorm", ["eval", "train"])
def test_hutchinson_trace_within_its_standard_deviation(batchnorm):
    """Rademacher probes: Var(vᵀΘv) = 2 Σ_{i≠j} Θ_ij², so p probes are within 4 standard deviations,
    sqrt(2 Σ_{i≠j} Θ_ij² / p), of tr Θ (fixed seed: a deterministic check)."""
    net = conv_net(seed=17)
    x = torch.randn(5, 2, 5, 5, generator=torch.Generator().manual_seed(18))
    masks = random_masks(net, CONV_PRUNABLE, 0.5, seed=19)
    J = reference_jacobian(net, x, masks, CONV_PRUNABLE, bn_train=batchnorm == "train")
    theta = J @ J.T
    probes = 64
    std = math.sqrt(2 * float((theta ** 2).sum() - (theta.diagonal() ** 2).sum()) / probes)
    est = widetopo.ntk_spectrum(net, x, masks, mode="trace", probes=probes, seed=3, batchnorm=batchnorm)
    assert abs(float(est) - float(theta.trace())) <= 4 * std
    assert float(est) != float(theta.trace())  # an estimate, not the exact path
    again = widetopo.ntk_spectrum(net, x, masks, mode="trace", probes=probes, seed=3, batchnorm=batchnorm)
    assert float(again) == float(est)


# ----------------------------------------------------------------------------- the caller's state

def _state(net):
    return ({k: v.clone() for k, v in net.state_dict().items()},
            [m.training for m in net.modules()],
            [p.requires_grad for p in net.parameters()],
            [getattr(m, "track_running_stats", None) for m in net.modules()])


def _same(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


@pytest.mark.parametrize("kwargs", [dict(batchnorm="train"), dict(mode="topk", k=3),
                                    dict(mode="trace", probes=4), dict(mode="full", dtype=torch.float32)])
def test_model_and_global_rng_untouched(kwargs):
    net = conv_net(seed=20).train()
    net[0].weight.requires_grad_(False)
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(21))
    masks = random_masks(net, CONV_PRUNABLE, 0.5, seed=22)
    before, rng = _state(net), torch.get_rng_state()
    widetopo.ntk_spectrum(net, x, masks, **kwargs)
    _same(before, _state(net))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in net.parameters())


def _bad(name, **over):
    net = conv_net(seed=23)
    x = torch.randn(3, 2, 5, 5)
    args = dict(model=net, inputs=x, masks=None)
    args.update({k: over.pop(k) for k in list(over) if k in args})
    return args, over, name


@pytest.mark.parametrize("over, name", [
    (dict(mode="eig"), "mode"),
    (dict(mode="topk"), "k"),
    (dict(mode="topk", k=0), "k"),
    (dict(mode="topk", k=10), "k"),          # N = 3 samples x 3 logits = 9
    (dict(k=3), "k"),                        # k without topk
    (dict(probes=5), "probes"),              # probes without trace
    (dict(mode="trace", probes=0), "probes"),
    (dict(outputs="logits"), "outputs"),
    (dict(batchnorm="frozen"), "batchnorm"),
    (dict(parameters="some"), "parameters"),
    (dict(parameters=["nope.weight"]), "names"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(dtype=torch.float16), "dtype"),
    (dict(mode="topk", k=2, tol=0.0), "tol"),
    (dict(seed="x"), "seed"),
    (dict(masks={"0.weight": torch.ones(3, 2, 3, 3)}), "masks"),               # not bool
    (dict(masks={"0.weight": torch.ones(3, 2, 3, 2, dtype=torch.bool)}), "masks"),  # shape
    (dict(masks={"nope": torch.ones(1, dtype=torch.bool)}), "masks"),            # name
    (dict(masks={"1.weight": torch.ones(3, dtype=torch.bool)}), "masks"),        # outside the selection
    (dict(inputs=[[1.0]]), "inputs"),
    (dict(inputs=torch.zeros(0, 2, 5, 5)), "inputs"),
    (dict(model="net"), "model"),
])
def test_bad_arguments_name_themselves_and_change_nothing(over, name):
    args, kwargs, _ = _bad(name, **over)
    net = args["model"]
    before = _state(net) if isinstance(net, nn.Module) else None
    with pytest.raises((ValueError, TypeError), match=name):
        widetopo.ntk_spectrum(args["model"], args["inputs"], args["masks"], **kwargs)
    if before is not None:
        _same(before, _state(net))


# ----------------------------------------------------------------------------- report and CLI

def test_spectrum_report_writes_plot_csv_json(tmp_path):
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(24)
    n, p, c = 4, 5, 3
    net = nn.Linear(p, c, bias=False).double()
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    M = torch.rand(c, p, generator=g) < 0.5
    expected = {}
    for label, m in (("dense", torch.ones(c, p, dtype=torch.bool)), ("half", M)):
        theta = torch.zeros(n * c, n * c, dtype=torch.float64)
        for k in range(c):
            theta[k::c, k::c] = X @ torch.diag(m[k].double()) @ X.T
        expected[label] = descending_eigvals(theta)
    out = tmp_path / "spec.png"
    result = spectrum_report(net, X, {"dense": None, "half": {"weight": M}}, out)
    assert out.stat().st_size > 0
    rows = list(csv.reader(open(tmp_path / "spec.csv")))
    assert rows[0] == ["rank", "dense", "half"] and len(rows) == n * c + 1
    for j, label in enumerate(("dense", "half"), start=1):
        got = torch.tensor([float(r[j]) for r in rows[1:]], dtype=torch.float64)
        torch.testing.assert_close(got, expected[label], rtol=1e-10, atol=1e-12)
    data = json.load(open(tmp_path / "spec.json"))
    assert data["spectra"]["half"]["density"] == pytest.approx(float(M.double().mean()))
    assert data["spectra"]["dense"]["trace"] == pytest.approx(float(expected["dense"].sum()), rel=1e-10)
    assert result["files"][0] == str(out)


def test_cli_spectrum_rebuilds_network_and_samples(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn", reason="the CLI test uses scikit-learn's bundled digits dataset")
    from widetopo.cli import spectrum as cli_spectrum
    from widetopo.data import load_dataset
    from widetopo.models import build_model

    torch.manual_seed(3)
    net = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    names = widetopo.select_prunable(net)
    masks = widetopo.Masks(random_masks(net, names, 0.3, seed=25),
                           meta={"model": "cnn", "dataset": "digits", "seed": 3, "in_channels": 1,
                                 "num_classes": 10, "image_size": 8, "pruning_samples": 40})
    path = tmp_path / "m.wtm"
    masks.save(path)

    parser = argparse.ArgumentParser()
    cli_spectrum.add_parser(parser.add_subparsers())
    out = tmp_path / "s.png"
    args = parser.parse_args(["spectrum", str(path), "--dense", "-o", str(out), "--samples", "3"])
    assert cli_spectrum.run(args, True) == 0
    assert "wrote" in capsys.readouterr().out
    data = json.load(open(tmp_path / "s.json"))
    assert list(data["spectra"]) == ["dense", "m"]

    # reference: the same network and the first 3 of the 40 pruning samples, explicit Jacobian
    x = load_dataset("digits", split="train").subset(40, seed=3).tensors()[0][:3]
    for label, mk in (("dense", {}), ("m", dict(masks))):
        J = reference_jacobian(net, x, mk, names)
        expected = descending_eigvals(J @ J.T)
        got = torch.tensor(data["spectra"][label]["eigenvalues"], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * float(expected[0]))

    from widetopo.cli.args import CLIError, UsageError

    with pytest.raises(UsageError, match="--dense"):
        cli_spectrum.run(parser.parse_args(["spectrum", "-o", str(out)]), True)
    # wired into the console script: the same numbers, and a usage error is exit status 2
    from widetopo.cli import main

    assert main(["-q", "spectrum", str(path), "-o", str(tmp_path / "t.png"), "--samples", "3"]) == 0
    assert json.load(open(tmp_path / "t.json"))["spectra"]["m"] == data["spectra"]["m"]
    assert main(["-q", "spectrum", "-o", str(tmp_path / "u.png")]) == 2
    with pytest.raises(UsageError, match="--k"):
        cli_spectrum.run(parser.parse_args(["spectrum", str(path), "--mode", "topk", "-o", str(out)]), True)
    other = widetopo.Masks(dict(masks), meta={**masks.meta, "seed": 4})
    other.save(tmp_path / "other.wtm")
    with pytest.raises(CLIError, match="different seed"):
        cli_spectrum.run(parser.parse_args(["spectrum", str(path), str(tmp_path / "other.wtm"), "-o", str(out)]), True)


def test_cli_spectrum_reuses_a_class_balanced_pruning_set(tmp_path, capsys):
    """`widetopo prune --samples-per-class 2 --max-train-samples 300` records both in the mask
    file; `widetopo spectrum` then takes its samples from that class-balanced set of the first
    300 training images (rebuilt here by hand: the seeded permutation, the first 2 of each class)."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn", reason="the CLI test uses scikit-learn's bundled digits dataset")
    from widetopo.cli import main
    from widetopo.data import load_dataset
    from widetopo.models import build_model
    from widetopo.sparsity.maskfile import read_header

    path = tmp_path / "m.wtm"
    assert main(["-q", "prune", "--method", "magnitude", "--density", "0.3", "--seed", "2", "--samples-per-class", "2",
                 "--max-train-samples", "300", "-o", str(path)]) == 0
    meta = read_header(path)["meta"]
    assert (meta["samples_per_class"], meta["max_train_samples"], meta["pruning_samples"]) == (2, 300, 20)
    assert main(["-q", "spectrum", str(path), "--dense", "--samples", "4", "-o", str(tmp_path / "s.png")]) == 0
    data = json.load(open(tmp_path / "s.json"))

    train = load_dataset("digits", split="train")
    images, labels = train.tensors()
    images, labels = images[:300], labels[:300]
    order = torch.randperm(300, generator=torch.Generator().manual_seed(2)).tolist()
    picked, seen = [], {}
    for i in order:
        c = int(labels[i])
        if seen.get(c, 0) < 2:
            seen[c] = seen.get(c, 0) + 1
            picked.append(i)
    x = images[picked[:4]]
    torch.manual_seed(2)
    net = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    names = widetopo.select_prunable(net)
    mask = {n: m for n, m in widetopo.load_masks(path).items()}
    for label, mk in (("dense", {}), ("m", mask)):
        J = reference_jacobian(net, x, mk, names)
        expected = descending_eigvals(J @ J.T)
        got = torch.tensor(data["spectra"][label]["eigenvalues"], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * float(expected[0]))

    # files pruned on different sets: the first file's samples, and a warning saying so
    other = widetopo.Masks(mask, meta={**meta, "samples_per_class": None, "pruning_samples": 40})
    other.save(tmp_path / "other.wtm")
    capsys.readouterr()
    assert main(["-q", "spectrum", str(path), str(tmp_path / "other.wtm"), "--samples", "4",
                 "-o", str(tmp_path / "t.png")]) == 0
    err = capsys.readouterr().err
    assert "pruned on different sets" in err and "samples_per_class" in err
    assert json.load(open(tmp_path / "t.json"))["spectra"]["m"] == data["spectra"]["m"]


def test_tied_weights_and_token_inputs():
    """A language model whose head is tied to its embedding: the tied tensor is one prunable
    parameter (its canonical name), integer token ids are not cast; J by the explicit Jacobian."""
    from arch_models import TiedLM

    torch.manual_seed(27)
    net = TiedLM()
    x = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(28))
    names = ["emb.weight", "mid.weight"]  # the head's weight is emb.weight
    masks = random_masks(net, names, 0.5, seed=29)
    net64 = copy.deepcopy(net).double()
    base = {n: p.detach() for n, p in net64.named_parameters()}
    shapes, sizes = [base[n].shape for n in names], [base[n].numel() for n in names]

    def f(flat):
        new = dict(base)
        for n, shape, piece in zip(names, shapes, flat.split(sizes)):
            new[n] = piece.view(shape) * masks[n].double()
        return torch.func.functional_call(net64, new, (x,)).reshape(-1)

    J = torch.autograd.functional.jacobian(f, torch.cat([base[n].reshape(-1) for n in names]))
    torch.testing.assert_close(widetopo.ntk_matrix(net, x, masks), J @ J.T, rtol=1e-10, atol=1e-13)
