"""Two processes on gloo over loopback: each scores its share of the batches, scores are summed
with all_reduce, both ranks derive identical masks, equal to one process over the same batches."""
import datetime
import os

import pytest
import torch
from torch import nn

from gloo import failure as _failure, spawn

pytestmark = pytest.mark.needs_kernel("global_threshold", "density_decay_", "restoration_scores", "apply_masks_",
                                      "mask_stats")

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def make_data(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 2, 4, 4, generator=g, dtype=dtype) for _ in range(n)]


def make_labelled(n):
    """float64 (input, target) batches: SNIP's signed sums then agree across splits to ~1e-16."""
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
            for _ in range(n)]


def make_scorer(log=None):
    from widetopo.scores.base import Scorer

    class DyadicScorer(Scorer):
        """Per-batch scores k/1024 * (1 + |x|-rank of the batch): exact in float32, so sums do
        not depend on the summation order and 1 vs 2 processes must agree bit for bit."""

        name = "dyadic"
        data_dependent = True
        decay = True

        def score(self, ctx, batches):
            if log is not None:
                log.append([b.index for b in batches])
            out = [torch.zeros(p.shape) for p in ctx.prunable]
            for b in batches:
                gen = ctx.generator(b.index)
                w = float(1 + int(b.x.abs().sum()) % 3)
                for o, p in zip(out, ctx.prunable):
                    k = torch.randint(0, 1024, p.shape, generator=gen).float()
                    o += w * k / 1024 * (p != 0)
            return out

    return DyadicScorer()


def make_failing_scorer(rank):
    scorer = make_scorer()
    score = scorer.score

    def failing(ctx, batches):
        if rank == 1 and ctx.round == 2:
            raise ValueError("scorer broke on rank 1")
        return score(ctx, batches)

    scorer.score = failing
    return scorer


OPTS = dict(rounds=3, restorations=1, restore_steps=2, restore_rounds=2, seed=3, verbose=False)
WT_OPTS = dict(rounds=2, restorations=1, restore_steps=2, restore_rounds=2, seed=3, verbose=False)


def _worker(rank, world, port, outdir):
    import widetopo

    torch.set_num_threads(1)  # tiny tensors; two processes already share the two cores

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        log = []
        masks = widetopo.prune(make_model(), make_data(5), 0.1, method=make_scorer(log), **OPTS)
        one = widetopo.prune(make_model(), make_data(1), 0.1, method=make_scorer(), **OPTS)
        wt = widetopo.prune(make_model().double(), make_data(4, torch.float64), 0.1, method="widetopo-s", **WT_OPTS)
        snip = widetopo.prune(make_model().double(), make_labelled(4), 0.1, method="snip", verbose=False)
        # sharded scores: each rank sums and selects only the tensors it owns (same masks)
        sharded = widetopo.prune(make_model(), make_data(5), 0.1, method=make_scorer(), shard_scores=True, **OPTS)
        wt_sharded = widetopo.prune(make_model().double(), make_data(4, torch.float64), 0.1, method="widetopo-s",
                                    shard_scores=True, **WT_OPTS)
        errors = {
            # rank 1's scorer raises in round 2; rank 1 gets no data at all, though replicated data is
            # promised (per-rank data may leave a rank without batches: tests/test_data_split.py)
            "scorer": _failure(lambda: widetopo.prune(make_model(), make_data(4), 0.1,
                                                      method=make_failing_scorer(rank), **OPTS)),
            "data": _failure(lambda: widetopo.prune(make_model(), make_data(4 if rank == 0 else 0), 0.1,
                                                    method=make_scorer(), data_split="replicated", **OPTS)),
        }
        torch.save({"masks": dict(masks), "one": dict(one), "wt": dict(wt), "log": log, "meta": masks.meta,
                    "snip": dict(snip), "errors": errors, "sharded": dict(sharded), "wt_sharded": dict(wt_sharded)},
                   os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def run_spawned(world, outdir, timeout=120):
    spawn(_worker, world, outdir, timeout=timeout)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Run the two gloo workers once for this module; returns (rank 0 result, rank 1 result)."""
    outdir = tmp_path_factory.mktemp("dist")
    run_spawned(2, str(outdir))
    return tuple(torch.load(outdir / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def test_two_ranks_identical_and_equal_to_one_process(spawned, one_thread):
    import widetopo

    r0, r1 = spawned
    # each rank scored its own share of the 5 batches (index % 2 == rank) in every round
    assert r0["log"] and all(idx == [0, 2, 4] for idx in r0["log"])
    assert r1["log"] and all(idx == [1, 3] for idx in r1["log"])
    assert r0["meta"]["world_size"] == 2
    single = widetopo.prune(make_model(), make_data(5), 0.1, method=make_scorer(), **OPTS)
    single_one = widetopo.prune(make_model(), make_data(1), 0.1, method=make_scorer(), **OPTS)
    assert list(r0["masks"]) == list(single)
    for name in single:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert torch.equal(r0["masks"][name], single[name]), name
        # fewer batches than processes: rank 1 contributes zeros, the result is unchanged
        assert torch.equal(r0["one"][name], r1["one"][name]), name
        assert torch.equal(r0["one"][name], single_one[name]), name


def test_helpers_without_process_group():
    from widetopo.distributed import collectives as d
    from widetopo.scores.base import Batch

    assert d.rank_world() == (0, 1)
    bs = [Batch(i, torch.zeros(1)) for i in range(5)]
    assert [b.index for b in d.shard(bs, 1, 2)] == [1, 3]
    assert [b.index for b in d.shard(bs, 0, 3)] == [0, 3]
    t = [torch.ones(2)]
    d.all_reduce_sum_(t)  # no-op
    assert torch.equal(t[0], torch.ones(2))
    with pytest.raises(ValueError, match="rank must be in"):
        d.shard(bs, 2, 2)


def test_widetopo_scorer_two_ranks(spawned, one_thread):
    """The real WideTopo scorer in float64 (model and data; scores accumulate in float64): both
    ranks derive the masks of one process over all four batches. The order in which the two
    ranks' per-batch scores are summed moves a score by ~1e-16 relative, far below the gaps
    between neighbouring scores at the cut, so the masks must be equal, not merely close."""
    import widetopo

    r0, r1 = spawned[0]["wt"], spawned[1]["wt"]
    single = widetopo.prune(make_model().double(), make_data(4, torch.float64), 0.1, method="widetopo-s", **WT_OPTS)
    assert list(r0) == list(single)
    for name in single:
        assert torch.equal(r0[name], r1[name]), name
        assert torch.equal(r0[name], single[name]), name


def test_a_failing_rank_stops_every_rank_without_waiting_for_the_timeout(spawned):
    """The healthy rank raises at once, naming the failed rank, instead of blocking in the next
    collective until the 60 s process-group timeout; the failed rank raises its own error."""
    r0, r1 = spawned[0]["errors"], spawned[1]["errors"]
    kind, message, seconds = r1["scorer"]
    assert (kind, message) == ("ValueError", "scorer broke on rank 1")
    kind, message, seconds0 = r0["scorer"]
    assert kind == "RuntimeError" and "scoring round 2" in message and "rank(s) 1" in message, message
    assert seconds0 < 30
    for r in (r0, r1):  # decided together from every rank's data digest: the same error everywhere
        kind, message, seconds = r["data"]
        assert kind == "RankMismatchError" and "data_split='replicated' needs the same pruning data" in message
        assert "(4 batches) on rank 0" in message and "(0 batches) on rank 1" in message, message
        assert seconds < 30


def test_snip_sums_signed_sensitivities_across_ranks(spawned, one_thread):
    """SNIP's |sum_b g_b * theta| is formed after the all_reduce: two ranks give the masks of one
    process over all four batches."""
    import widetopo

    single = widetopo.prune(make_model().double(), make_labelled(4), 0.1, method="snip", verbose=False)
    for name in single:
        assert torch.equal(spawned[0]["snip"][name], spawned[1]["snip"][name]), name
        assert torch.equal(spawned[0]["snip"][name], single[name]), name


def test_sharded_scores_give_the_masks_of_the_unsharded_run(spawned):
    """shard_scores=True (scores reduced to their owner, sharded top-k, masks broadcast): the
    same masks as the all-reduce run, on both ranks."""
    for rank_result in spawned:
        for plain, sharded in (("masks", "sharded"), ("wt", "wt_sharded")):
            a, b = rank_result[plain], rank_result[sharded]
            assert list(a) == list(b)
            assert all(torch.equal(a[n], b[n]) for n in a), (plain, sharded)


def test_shard_owners_balance_the_scores():
    from widetopo.distributed.owners import owners

    assert owners([10, 1, 1, 8], 2) == [0, 1, 1, 1]
    assert owners([5, 5, 5], 3) == [0, 1, 2]
    assert owners([3], 2) == [0]
