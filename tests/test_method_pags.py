"""PAGS (docs/design.md §5.10): the spectral terms against dense eigensolves of the bipartite
adjacency of masks written here, the chosen mask against the population's best computed by hand
(float64 SNIP, adjacency eigensolves), population 1 = SNIP, exact K, and the run properties."""
import math

import pytest
import torch
from torch import nn

import widetopo
from method_checks import bn_net, check_resume, check_run_properties, check_two_processes, labelled
from widetopo.engine.rng import make_generator
from widetopo.scores.pags import PAGS_STREAM, layer_distance

pytestmark = [pytest.mark.needs_kernel("global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]

# 4 outputs x 6 inputs; output 3 and input 5 isolated
MASK = torch.tensor([[1, 1, 0, 1, 0, 0],
                     [0, 1, 1, 0, 1, 0],
                     [1, 0, 1, 1, 1, 0],
                     [0, 0, 0, 0, 0, 0]], dtype=torch.bool)


def adjacency_abs_eigs(m):
    """|eigenvalues| of [[0, M^T], [M, 0]], descending (dense float64 eigensolve)."""
    r, c = m.shape
    a = torch.zeros(r + c, r + c, dtype=torch.float64)
    a[:c, c:] = m.T
    a[c:, :c] = m
    return torch.linalg.eigvalsh(a).abs().sort(descending=True).values, torch.linalg.eigvalsh(a)


def test_adjacency_eigenvalues_are_plus_minus_singular_values():
    m = MASK.double()
    _, eigs = adjacency_abs_eigs(m)
    s = torch.linalg.svdvals(m)
    expect = torch.cat([s, -s, torch.zeros(10 - 2 * len(s), dtype=torch.float64)]).sort().values
    torch.testing.assert_close(eigs.sort().values, expect, atol=1e-10, rtol=0)


def test_gap_terms_against_the_dense_adjacency():
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = MASK.double()
    mags, _ = adjacency_abs_eigs(m)
    wmags, _ = adjacency_abs_eigs((w * m).abs())
    # by hand: 10 edges, 3 non-isolated outputs and 5 non-isolated inputs
    d_left, d_right = 10 / 3, 10 / 5
    dr = math.sqrt(d_left - 1) + math.sqrt(d_right - 1) - float(mags[2])  # third |eigenvalue| = s2
    lam = float(wmags[0] - wmags[2])
    got_dr, got_lam = layer_distance(MASK, w)
    assert got_dr == pytest.approx(dr, abs=1e-9) and got_lam == pytest.approx(lam, abs=1e-9)
    assert got_lam > 0.1
    # the port: the *second* |eigenvalue| (= s1) and the mean degree over all 10 nodes
    port_dr, port_lam = layer_distance(MASK, w, gap="port")
    assert port_lam == 0.0
    assert port_dr == pytest.approx(2 * math.sqrt(2 * 10 / 10 - 1) - float(mags[1]), abs=1e-9)


def test_complete_bipartite_has_no_second_singular_value():
    full = torch.ones(3, 5, dtype=torch.bool)
    dr, _ = layer_distance(full, torch.ones(3, 5))
    assert dr == pytest.approx(math.sqrt(5 - 1) + math.sqrt(3 - 1), abs=1e-6)  # s2 = 0
    conv = torch.ones(2, 3, 2, 2, dtype=torch.bool)  # flattened to 2 x 12
    assert layer_distance(conv, torch.ones(2, 3, 2, 2))[0] == pytest.approx(math.sqrt(11) + 1, abs=1e-6)


# --------------------------------------------------------------------------- the population
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def batches(n=3, bs=6):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(bs, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (bs,), generator=g))
            for _ in range(n)]


def snip_mask(model, x, y, keep):
    """float64 SNIP by hand: |dL/dW * W| of the three weights, top `keep` (stable, descending)."""
    weights = [model[i].weight for i in (0, 2, 4)]
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, weights)
    s = [(g * w).abs().detach() for g, w in zip(grads, weights)]
    flat = torch.cat([t.flatten() for t in s])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[flat.argsort(descending=True, stable=True)[:keep]] = True
    return list(torch.split(chosen, [t.numel() for t in s])), [w.detach() for w in weights]


def fitness(masks, weights):
    """sum over layers of sqrt(dr^2 + lam^2), spectra from dense adjacency eigensolves."""
    total = 0.0
    for m, w in zip(masks, weights):
        m = m.reshape(w.shape).double()
        kept = float(m.sum())
        rows, cols = int((m.sum(1) > 0).sum()), int((m.sum(0) > 0).sum())
        mags, _ = adjacency_abs_eigs(m)
        wmags, _ = adjacency_abs_eigs((w * m).abs())
        dr = math.sqrt(kept / rows - 1) + math.sqrt(kept / cols - 1) - float(mags[2])
        total += math.hypot(dr, float(wmags[0] - wmags[2]))
    return total


def test_chosen_mask_is_the_population_best():
    model, data, density, population = mlp(), batches(), 0.3, 5
    n_p = 6 * 12 + 12 * 8 + 8 * 3
    keep = int(density * n_p + 0.5)
    got = widetopo.prune(model, data, density, method="pags", population=population, min_kept=0, min_density=0.0,
                         seed=3, verbose=False)
    assert sum(int(m.sum()) for m in got.values()) == keep
    candidates = []
    for j in range(population):  # member j: a random half of batches j mod 3 and j+1 mod 3 (documented draw)
        x = torch.cat([data[j % 3][0], data[(j + 1) % 3][0]])
        y = torch.cat([data[j % 3][1], data[(j + 1) % 3][1]])
        pick = torch.randperm(12, generator=make_generator(3, 1, j, "cpu", PAGS_STREAM))[:6]
        masks, weights = snip_mask(model, x[pick], y[pick], keep)
        candidates.append((fitness(masks, weights), masks))
    values = [c[0] for c in candidates]
    assert len(set(round(v, 6) for v in values)) == population  # the members differ
    best = candidates[max(range(population), key=lambda j: values[j])][1]
    for (name, mask), ref in zip(got.items(), best):
        assert torch.equal(mask.flatten(), ref), name


def test_population_of_one_is_the_snip_mask():
    model, data = mlp(), batches(n=2)
    got = widetopo.prune(model, data, 0.25, method="pags", population=1, half=False, verbose=False)
    keep = int(0.25 * 192 + 0.5)
    ref, _ = snip_mask(model, torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data]), keep)
    for (name, mask), r in zip(got.items(), ref):
        assert torch.equal(mask.flatten(), r), name


def test_run_properties_resume_and_two_processes(tmp_path, monkeypatch):
    data = labelled(3)
    check_run_properties("pags", bn_net, data, 0.2, population=3, min_kept=0)
    check_run_properties("pags", bn_net, data, 0.2, population=3, min_kept=0, gap="port", rounds=2)
    check_resume(tmp_path, monkeypatch, "pags", bn_net, data, 0.2, kill_after=1, population=2, min_kept=0, rounds=2)
    check_two_processes("pags")


def test_pags_needs_a_target_and_valid_options():
    sal = widetopo.saliency(mlp(), batches(), "pags", population=1)  # no per-weight score: the (dense) mask
    assert all(torch.equal(s, torch.ones_like(s)) for s in sal.values())
    with pytest.raises(ValueError, match="gap must be one of 'paper', 'port'"):
        widetopo.prune(mlp(), batches(), 0.5, method="pags", gap="eig")
    with pytest.raises(ValueError, match="method 'pags' needs targets"):
        widetopo.prune(mlp(), [x for x, _ in batches()], 0.5, method="pags")
    with pytest.raises(ValueError, match="population must be an integer >= 1"):
        widetopo.prune(mlp(), batches(), 0.5, method="pags", population=0)


def _different_data_worker(rank, world, port, outdir):
    import datetime
    import os

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        part = labelled(2, seed=10 + rank)
        per_rank = widetopo.prune(bn_net(), part, 0.2, method="pags", population=2, verbose=False)
        try:
            widetopo.prune(bn_net(), part, 0.2, method="pags", population=2, data_split="replicated", verbose=False)
            message = "no error"
        except ValueError as exc:
            message = str(exc)
        torch.save({"per_rank": dict(per_rank), "message": message}, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_with_different_data_prune_their_union(tmp_path):
    """Each rank passes its own part (docs/distributed.md): the engine gathers the union onto every
    rank, so both give the masks of one process over rank 0's batches then rank 1's; declared
    replicated, the different data is refused on both ranks."""
    from gloo import spawn

    spawn(_different_data_worker, 2, str(tmp_path))
    single = widetopo.prune(bn_net(), labelled(2, seed=10) + labelled(2, seed=11), 0.2, method="pags",
                            population=2, verbose=False)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert all(torch.equal(out["per_rank"][n], single[n]) for n in single), rank
        assert "data_split='replicated' needs the same pruning data on every rank" in out["message"]
