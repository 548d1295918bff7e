"""The pruning loop: keep counts, never reviving, decay/threshold/restoration against a
straightforward PyTorch statement of docs/design.md §2, official counting, determinism, RNG hygiene."""
import math

import pytest
import torch
from torch import nn

import widetopo
from references import reference_run
from widetopo.engine.pruner import Pruner
from widetopo.scores.base import Scorer

pytestmark = pytest.mark.needs_kernel(
    "global_threshold", "density_decay_", "restoration_scores", "apply_masks_", "mask_stats"
)


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )  # prunable: 72 + 192 = 264 weights; all parameters: 264 + 4 + 8 + 3 = 279


def batches(n=2, gen_seed=1):
    g = torch.Generator().manual_seed(gen_seed)
    return [(torch.randn(3, 2, 4, 4, generator=g), torch.randint(0, 3, (3,), generator=g)) for _ in range(n)]


class RandScorer(Scorer):
    """Per-round uniform scores times (|theta| + 0.1), drawn from the run's generator (the scores
    references.reference_run draws)."""

    name = "testrand"
    data_dependent = False

    def __init__(self, decay=False, log=None):
        self.decay = decay
        self.log = log

    def score(self, ctx, batches):
        if self.log is not None:
            self.log.append(
                dict(
                    round=ctx.round,
                    density=ctx.density,
                    kept=sum(int(m.sum()) for m in ctx.masks),
                    masks=[m.clone() for m in ctx.masks],
                    prunable=[p.clone() for p in ctx.prunable],
                )
            )
        gen = ctx.generator(0)
        return [torch.rand(p.shape, generator=gen) * (p.abs() + 0.1) for p in ctx.prunable]


@pytest.mark.parametrize("decay, norm", [(True, False), (False, False), (True, True)])
def test_full_run_matches_reference(decay, norm):
    model = tiny_cnn()
    log = []
    names = ["0.weight", "1.weight", "4.weight"] if norm else None  # with the BatchNorm weight (rank 1)
    masks = Pruner(
        model, RandScorer(decay=decay, log=log), 0.05, names, rounds=4, restorations=2, restore_steps=3,
        restore_rounds=3, seed=7, verbose=False,
    ).run(batches())
    expected, counts = reference_run(model, 0.05, 7, 4, 2, 3, 3, decay=decay, norm=norm)
    assert list(masks) == list(expected)
    for name in expected:
        assert torch.equal(masks[name], expected[name]), name
    assert [e["round"] for e in log] == list(range(1, 11))
    # after each restoration the scorer sees theta = theta_init * m
    init = [p.detach() for n, p in model.named_parameters() if n in expected]
    for entry in (log[4], log[7]):
        for p0, p, m in zip(init, entry["prunable"], entry["masks"]):
            assert torch.equal(p, p0 * m)


def test_exact_keep_counts_each_round():
    # N_P = 264, d* = 0.1, T = 3: d_t = 0.1^(t/3) -> keep round(264 d_t) = 123, 57, 26
    # restoration 0: d_r = 0.1^(1/2); J = 2: d_1 = 0.1 + (d_r - 0.1)/2 -> 55, d_2 = d_r -> 83
    # T' = 2 from 83/264: sqrt(83/264 * 0.1) = 0.17731 -> 47, then 26
    log = []
    masks = Pruner(
        tiny_cnn(), RandScorer(decay=True, log=log), 0.1, rounds=3, restorations=1, restore_steps=2,
        restore_rounds=2, verbose=False,
    ).run(batches())
    assert [e["kept"] for e in log] == [264, 123, 57, 83, 47]
    assert [e["density"] for e in log] == pytest.approx([1.0, 123 / 264, 57 / 264, 83 / 264, 47 / 264])
    assert sum(int(m.sum()) for m in masks.values()) == 26
    assert masks.density == pytest.approx(26 / 264)
    assert masks.meta["density"] == pytest.approx(26 / 264)


class Adversarial(Scorer):
    """Scores every pruned entry far above every kept one, and kept ones 0 (all tied) except the
    first kept entry (1.0: all-zero kept scores are refused as an arbitrary ranking)."""

    name = "adversarial"
    data_dependent = False

    def __init__(self, decay=False, log=None):
        self.decay, self.log = decay, log

    def score(self, ctx, batches):
        self.log.append([m.clone() for m in ctx.masks])
        out = [torch.where(m, 0.0, 1e6) for m in ctx.masks]
        for s, m in zip(out, ctx.masks):
            if m.any():
                s.view(-1)[m.view(-1).nonzero()[0]] = 1.0
                break
        return out


@pytest.mark.parametrize("count", ["exact", "official"])
@pytest.mark.parametrize("decay", [False, True])
def test_pruned_never_revived(count, decay):
    log = []
    masks = Pruner(tiny_cnn(), Adversarial(decay, log), 0.05, rounds=5, count=count, verbose=False).run(batches())
    log.append(list(masks.values()))
    for before, after in zip(log, log[1:]):
        for b, a in zip(before, after):
            assert not bool((a & ~b).any()), "a pruned weight came back"
    if count == "exact":
        assert [sum(int(m.sum()) for m in ms) for ms in log] == [264] + [
            int(math.floor(264 * 0.05 ** (t / 5) + 0.5)) for t in range(1, 6)
        ]


class Fixed(Scorer):
    name = "fixed"
    data_dependent = False

    def __init__(self, values):
        self.values = values

    def score(self, ctx, batches):
        return [v.clone() for v in self.values]


def test_official_counting_hand_example():
    # Linear(4, 2): N_P = 8 weights, N_all = 10. d = 0.5: k = floor(0.5 * 10) = 5;
    # prune every score <= the 6th smallest prunable score.
    model = nn.Linear(4, 2)
    data = [torch.randn(2, 4)]
    s = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])
    m = widetopo.prune(model, data, 0.5, method=Fixed([s]), count="official", verbose=False)
    assert torch.equal(m["weight"], s > 6)  # sorted[5] = 6 -> keeps 7, 8 (density 0.25)
    tied = torch.tensor([[1.0, 2, 3, 4], [5, 6, 6, 8]])
    m = widetopo.prune(model, data, 0.5, method=Fixed([tied]), count="official", verbose=False)
    assert torch.equal(m["weight"], tied > 6)  # both 6s pruned too -> only 8 survives
    m = widetopo.prune(model, data, 0.5, method=Fixed([tied]), count="exact", verbose=False)
    assert torch.equal(m["weight"], torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool))
    # d = 0.1: k = 9 >= N_P -> everything pruned
    m = widetopo.prune(model, data, 0.1, method=Fixed([s]), count="official", verbose=False)
    assert not bool(m["weight"].any())
    assert m.meta["count"] == "official"


def test_exact_ties_keep_first_in_order_among_kept():
    # all scores tied: exactly round(0.5 * 8) = 4 kept, the first four in row-major order
    model = nn.Linear(4, 2)
    m = widetopo.prune(model, [torch.randn(2, 4)], 0.5, method=Fixed([torch.ones(2, 4)]), verbose=False)
    assert torch.equal(m["weight"], torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool))


def test_same_seed_same_masks_and_global_rng_untouched():
    model = tiny_cnn()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2, 4, 4)), batch_size=4,
                                         shuffle=True)
    state = torch.get_rng_state()
    a = widetopo.prune(model, loader, 0.2, method=RandScorer(decay=True), rounds=3, restorations=1,
                       restore_steps=2, seed=5, verbose=False)
    assert torch.equal(torch.get_rng_state(), state), "prune() changed the global RNG"
    torch.rand(100)  # move the global RNG: the masks must not depend on it
    b = widetopo.prune(model, loader, 0.2, method=RandScorer(decay=True), rounds=3, restorations=1,
                       restore_steps=2, seed=5, verbose=False)
    c = widetopo.prune(model, loader, 0.2, method=RandScorer(decay=True), rounds=3, restorations=1,
                       restore_steps=2, seed=6, verbose=False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert a.meta["seed"] == 5 and c.meta["seed"] == 6


def test_data_forms():
    model = tiny_cnn()
    xs = [torch.randn(3, 2, 4, 4) for _ in range(2)]
    ys = [torch.randint(0, 3, (3,)) for _ in range(2)]
    seen = []

    class Seen(RandScorer):
        data_dependent = True

        def score(self, ctx, bs):
            seen.append([(b.index, b.x.shape[0], b.y is None) for b in bs])
            return super().score(ctx, bs)

    widetopo.prune(model, xs, 0.5, method=Seen(), verbose=False)
    widetopo.prune(model, list(zip(xs, ys)), 0.5, method=Seen(), verbose=False)
    widetopo.prune(model, (x for x in xs), 0.5, method=Seen(), verbose=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=4)
    widetopo.prune(model, loader, 0.5, method=Seen(), verbose=False)
    assert seen[0] == [(0, 3, True), (1, 3, True)]
    assert seen[1] == [(0, 3, False), (1, 3, False)]
    assert seen[2] == seen[0]
    assert seen[3] == [(0, 4, False), (1, 2, False)]


def test_max_samples_reads_only_that_many_samples():
    xs = [torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ys = [torch.full((3,), i) for i in range(4)]
    pulled = []

    def stream():  # fails the test if the engine reads past the samples it needs
        for i, (x, y) in enumerate(zip(xs, ys)):
            if i == 2:
                raise AssertionError("batch 2 read although 5 samples were complete after batch 1")
            pulled.append(i)
            yield x, y

    seen = []

    class Seen(RandScorer):
        data_dependent = True

        def score(self, ctx, bs):
            seen.append([(b.index, b.x.clone(), b.y.clone()) for b in bs])
            return super().score(ctx, bs)

    masks = widetopo.prune(tiny_cnn(), stream(), 0.5, method=Seen(), max_samples=5, verbose=False)
    assert pulled == [0, 1]
    (b0, b1), = seen
    assert b0[0] == 0 and torch.equal(b0[1], xs[0]) and torch.equal(b0[2], ys[0])
    assert b1[0] == 1 and torch.equal(b1[1], xs[1][:2]) and torch.equal(b1[2], ys[1][:2])  # cut to 5
    assert masks.meta["max_samples"] == 5
    # a whole number of batches: no cut, and nothing read after the batch that completes it
    seen.clear()
    widetopo.prune(tiny_cnn(), list(zip(xs, ys)), 0.5, method=Seen(), max_samples=6, verbose=False)
    assert [(b[0], b[1].shape[0]) for b in seen[0]] == [(0, 3), (1, 3)]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_samples must be an integer >= 1"):
            widetopo.prune(tiny_cnn(), xs, 0.5, method=RandScorer(), max_samples=bad, verbose=False)


def test_finalize_sees_the_summed_scores_and_decides_the_masks():
    """Scorer.finalize gets the sum over all batches (signed here) and its output is what the
    threshold ranks: the kept half are the entries with the largest |sum|."""
    log = {}

    class Signed(Scorer):
        name = "signed"
        data_dependent = True

        def score(self, ctx, bs):
            out = []
            for p in ctx.prunable:
                per_batch = [torch.randn(p.shape, generator=ctx.generator(b.index)) for b in bs]
                log.setdefault("per_batch", []).append(per_batch)
                out.append(sum(per_batch))
            return out

        def finalize(self, ctx, scores):
            log["summed"] = [s.clone() for s in scores]
            return [s.abs() for s in scores]

    masks = widetopo.prune(tiny_cnn(), batches(3), 0.5, method=Signed(), verbose=False)
    sums = [sum(per_batch) for per_batch in log["per_batch"]]
    for got, ref in zip(log["summed"], sums):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    flat = torch.cat([s.abs().flatten() for s in sums])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.argsort(descending=True, stable=True)[:132]] = True  # 264 prunable weights, half kept
    assert torch.equal(torch.cat([m.flatten() for m in masks.values()]), keep)


def test_preset_and_options_reach_the_engine(monkeypatch):
    got = {}

    def spy(self, data):
        got.update(vars(self.options), scorer=self.scorer, restore_rounds=self.options.post_rounds)

    monkeypatch.setattr(Pruner, "run", spy)
    model = tiny_cnn()
    widetopo.prune(model, batches(), 0.1, method="widetopo")
    assert (got["rounds"], got["restorations"], got["restore_steps"], got["restore_rounds"]) == (50, 2, 50, 50)
    assert (got["schedule"], got["compression_factor"], got["count"], got["seed"]) == ("poly", 5.0, "exact", 0)
    sc = got["scorer"]
    assert (sc.mu1, sc.mu2, sc.eps, sc.probes, sc.decay) == (0.01, 1.0, 5e-4, 1, True)
    widetopo.prune(model, batches(), 0.1, method="widetopo-s", mu1=0.5, rounds=3)
    assert (got["rounds"], got["restorations"], got["restore_steps"], got["restore_rounds"]) == (3, 2, 50, 10)
    assert got["scorer"].mu1 == 0.5
    for method, rounds in [("random", 1), ("magnitude", 1), ("snip", 1), ("synflow", 100)]:
        widetopo.prune(model, batches(), 0.1, method=method)
        assert (got["rounds"], got["restorations"]) == (rounds, 0), method
        assert got["scorer"].name == method
    widetopo.prune(model, batches(), 0.1, method="widetopo_s")  # alias
    assert got["scorer"].name == "widetopo-s" and got["rounds"] == 10


def test_magnitude_end_to_end_keeps_largest():
    model = tiny_cnn()
    m = widetopo.prune(model, batches(), 0.1, method="magnitude", verbose=False)
    w = torch.cat([model[0].weight.detach().abs().reshape(-1), model[4].weight.detach().abs().reshape(-1)])
    keep = int(math.floor(0.1 * 264 + 0.5))
    cut = torch.sort(w, descending=True).values[keep - 1]
    got = torch.cat([m["0.weight"].reshape(-1), m["4.weight"].reshape(-1)])
    assert int(got.sum()) == keep
    assert torch.equal(got, w >= cut)
    assert m.meta["method"] == "magnitude" and m.meta["preset"] == "magnitude"


def test_prune_with_norm_and_bias_selection():
    model = tiny_cnn()
    m = widetopo.prune(model, batches(), 0.2, method=RandScorer(), include_norm=True, include_bias=True,
                       rounds=2, verbose=False)
    assert list(m) == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]
    n = 72 + 4 + 4 + 4 + 192 + 3
    assert m.kept == int(math.floor(0.2 * n + 0.5))
    assert "include_norm" in m.meta["selection"]


def test_logs_collapsed_layers(caplog):
    # official counting over all 279 parameters at d = 0.05 prunes all 264 prunable weights
    with caplog.at_level("INFO", logger="widetopo.engine.pruner"):
        m = widetopo.prune(tiny_cnn(), batches(), 0.05, method=RandScorer(), count="official", verbose=False)
    assert m.kept == 0
    assert any("no weights kept in 2 prunable tensor(s): 0.weight, 4.weight" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    assert any("pruning done" in r.getMessage() for r in caplog.records)


class _FakeTTY:
    def __init__(self):
        self.text = []

    def write(self, s):
        self.text.append(s)

    def flush(self):
        pass

    def isatty(self):
        return True


@pytest.mark.parametrize("verbose", [True, False])
def test_progress_bar_only_on_a_tty_when_verbose(monkeypatch, verbose):
    import sys

    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    widetopo.prune(tiny_cnn(), batches(), 0.1, method=RandScorer(), rounds=2, restorations=1, restore_steps=2,
                   restore_rounds=2, verbose=verbose)
    text = "".join(tty.text)
    if verbose:
        assert "phase=restore0" in text and "phase=prune1" in text and "density=" in text
        assert "s_per_round=" in text and "s_per_step=" in text
    else:
        assert text == ""


def test_no_progress_bar_without_a_tty(capsys):
    widetopo.prune(tiny_cnn(), batches(), 0.1, method=RandScorer(), rounds=2, verbose=True)
    assert capsys.readouterr().err == ""  # pytest's captured stderr is not a TTY
