"""Per-rank data under torch.distributed (DistributedSampler style) and the agreement check.

2 and 3 gloo processes, each passing its own part of the pruning set (unequal batch counts, one
rank with none), must give the masks of ONE process over the concatenation of the parts in rank
order, for a data-free control (magnitude), methods that use batch-seeded randomness
(widetopo-s), a signed sum finalized after the all_reduce (snip), a whole-set prepass (grasp) and
a data-free method that reads every batch pair (pags); all in float64, masks compared for
equality. The replicated form (every rank the whole
list) keeps working. Ranks that disagree (density, a method option, the model, replicated data
that differs, samples of different shapes) all raise the same RankMismatchError before round 1,
well within the process group's timeout. One spawn per world size runs every check.
"""
import datetime
import os

import pytest
import torch
from torch import nn

from gloo import failure as _failure, spawn

pytestmark = [pytest.mark.needs_kernel("global_threshold", "density_decay_", "restoration_scores", "apply_masks_",
                                       "mask_stats"), pytest.mark.usefixtures("one_thread")]

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

#: batches each rank passes (world -> counts in rank order): unequal, and one rank with none
COUNTS = {2: [3, 1], 3: [2, 0, 3]}
DENSITY = 0.2
#: method -> options (widetopo-s with a restoration, so later rounds and the noise count too)
RUNS = {
    "magnitude": dict(verbose=False),
    "snip": dict(verbose=False),
    "widetopo-s": dict(rounds=2, restorations=1, restore_steps=2, restore_rounds=1, seed=3, verbose=False),
    "grasp": dict(verbose=False),
    # data-free (no sum over batches) but reads every batch: the union is gathered onto every rank
    "pags": dict(population=4, min_kept=0, verbose=False),
}
TIMEOUT = 60  # the process group's timeout: a disagreement must be reported long before it


def make_model(width=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, width)).double()


def union(n):
    """The whole pruning set: n float64 (input, target) batches of 3 samples."""
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
            for _ in range(n)]


def part(world, rank):
    """Rank `rank`'s part of the union (a contiguous slice: rank 0's batches first)."""
    counts = COUNTS[world]
    start = sum(counts[:rank])
    return union(sum(counts))[start:start + counts[rank]]


def index_logger(log):
    """A data-dependent scorer that records the batch indices it is given (scores: |theta|)."""
    from widetopo.scores.base import Scorer

    class IndexLog(Scorer):
        name = "index-log"
        data_dependent = True

        def score(self, ctx, batches):
            log.append([b.index for b in batches])
            return [p.detach().abs() for p in ctx.prunable]

    return IndexLog()


def _worker(rank, world, port, outdir):
    import widetopo

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT))
    try:
        mine, full, last = part(world, rank), union(sum(COUNTS[world])), rank == world - 1
        out = {"per_rank": {}, "meta": {}}
        for method, opts in RUNS.items():
            masks = widetopo.prune(make_model(), mine, DENSITY, method=method, **opts)
            out["per_rank"][method] = dict(masks)
            out["meta"][method] = masks.meta["data_split"]
        explicit = widetopo.prune(make_model(), mine, DENSITY, method="snip", data_split="per_rank", verbose=False)
        out["explicit"] = dict(explicit)
        # per-rank data with sharded scores (each score tensor summed into and selected by one rank)
        out["shard_scores"] = dict(widetopo.prune(make_model(), mine, DENSITY, method="widetopo-s", shard_scores=True,
                                                  **RUNS["widetopo-s"]))
        # equal parts on every rank: "auto" reads them as replicated; "per_rank" counts each once
        same_parts = widetopo.prune(make_model(), union(2), DENSITY, method="snip", data_split="per_rank",
                                    verbose=False)
        out["same_parts"] = dict(same_parts)
        replicated = widetopo.prune(make_model(), full, DENSITY, method="widetopo-s", **RUNS["widetopo-s"])
        out["replicated"] = dict(replicated)
        out["replicated_meta"] = replicated.meta["data_split"]
        # a checkpoint of a per-rank run: rank 0 writes it, every rank checks the fingerprint (the
        # union's batches and digests, the same on every rank) and the second call resumes it
        ckpt = os.path.join(outdir, "run.ckpt")
        written = widetopo.prune(make_model(), mine, DENSITY, method="snip", checkpoint=ckpt, verbose=False)
        out["resumed"] = _failure(lambda: widetopo.prune(make_model(), mine, DENSITY, method="snip",
                                                         checkpoint=ckpt, verbose=False)) is None
        out["checkpointed"] = dict(written)
        log = []
        widetopo.prune(make_model(), mine, DENSITY, method=index_logger(log), rounds=2, verbose=False)
        out["log"] = log
        out["errors"] = {
            "density": _failure(lambda: widetopo.prune(make_model(), mine, 0.3 if last else DENSITY,
                                                       method="snip", verbose=False)),
            "option": _failure(lambda: widetopo.prune(make_model(), mine, DENSITY, method="grasp",
                                                      temperature=100.0 if last else 200.0, verbose=False)),
            "model": _failure(lambda: widetopo.prune(make_model(4 if last else 3), mine, DENSITY, method="snip",
                                                     verbose=False)),
            "replicated": _failure(lambda: widetopo.prune(make_model(), mine, DENSITY, method="snip",
                                                          data_split="replicated", verbose=False)),
            "shapes": _failure(lambda: widetopo.prune(
                make_model(), [(x[:, :, :2] if last else x, y) for x, y in union(2)] if rank in (0, world - 1)
                else [], DENSITY, method="magnitude", verbose=False)),
            "empty": _failure(lambda: widetopo.prune(make_model(), [], DENSITY, method="snip", verbose=False)),
        }
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def spawned(request, tmp_path_factory):
    """(world, [each rank's results]) of one spawn running every check."""
    world = request.param
    outdir = tmp_path_factory.mktemp(f"split{world}")
    spawn(_worker, world, str(outdir), timeout=240)
    return world, [torch.load(outdir / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _equal(a, b):
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_per_rank_parts_give_the_masks_of_one_process_over_their_union(spawned):
    import widetopo

    world, ranks = spawned
    full = union(sum(COUNTS[world]))
    for method, opts in RUNS.items():
        single = widetopo.prune(make_model(), full, DENSITY, method=method, **opts)
        for rank, result in enumerate(ranks):
            assert result["meta"][method] == "per_rank", (method, rank)
            assert _equal(result["per_rank"][method], single), (method, rank)
        if method == "widetopo-s":
            assert all(_equal(r["shard_scores"], single) for r in ranks)
        if method == "snip":
            assert all(_equal(r["explicit"], single) for r in ranks)
            assert all(_equal(r["checkpointed"], single) and r["resumed"] for r in ranks)


def test_equal_parts_declared_per_rank_are_each_counted(spawned):
    import widetopo

    world, ranks = spawned
    single = widetopo.prune(make_model(), union(2) * world, DENSITY, method="snip", verbose=False)
    for result in ranks:
        assert _equal(result["same_parts"], single)


def test_the_comparison_can_fail():
    """The union in another order (batch indices, hence widetopo-s's probes, move) gives other
    masks, so equal masks above show that each batch got its index in the union."""
    import widetopo

    full = union(4)
    opts = RUNS["widetopo-s"]
    a = widetopo.prune(make_model(), full, DENSITY, method="widetopo-s", **opts)
    b = widetopo.prune(make_model(), full[::-1], DENSITY, method="widetopo-s", **opts)
    assert not _equal(a, b)


def test_each_rank_scores_its_own_batches_with_their_index_in_the_union(spawned):
    world, ranks = spawned
    counts = COUNTS[world]
    for rank, result in enumerate(ranks):
        start = sum(counts[:rank])
        expected = list(range(start, start + counts[rank]))
        if counts[rank]:
            assert result["log"] == [expected, expected], rank
        else:  # a rank without batches contributes zeros and never calls score()
            assert result["log"] == [], rank


def test_replicated_data_still_works(spawned):
    import widetopo

    world, ranks = spawned
    single = widetopo.prune(make_model(), union(sum(COUNTS[world])), DENSITY, method="widetopo-s",
                            **RUNS["widetopo-s"])
    for result in ranks:
        assert result["replicated_meta"] == "replicated"
        assert _equal(result["replicated"], single)


@pytest.mark.parametrize("case, needles", [
    ("density", ["density: 0.2 on rank", "0.3 on rank"]),
    ("option", ["method options", "temperature=200.0", "temperature=100.0"]),
    ("model", ["prunable parameters (entry ", "[3, 64]", "[4, 64]"]),
    ("replicated", ["data_split='replicated' needs the same pruning data on every rank"]),
    ("shapes", ["input samples", "[2, 4, 4]", "[2, 2, 4]"]),
])
def test_disagreeing_ranks_all_raise_the_same_error_promptly(spawned, case, needles):
    world, ranks = spawned
    results = [r["errors"][case] for r in ranks]
    assert all(r is not None for r in results), results
    kinds, messages, seconds = zip(*results)
    assert set(kinds) == {"RankMismatchError"}, results
    assert len(set(messages)) == 1, messages  # the same error on every rank
    for needle in needles:
        assert needle in messages[0], (needle, messages[0])
    assert max(seconds) < TIMEOUT / 2, seconds
    if case in ("density", "model", "option"):  # names the odd rank out
        assert f"on rank {world - 1}" in messages[0], messages[0]


def test_no_data_on_any_rank_is_an_error_on_every_rank(spawned):
    world, ranks = spawned
    for r in ranks:
        kind, message, _ = r["errors"]["empty"]
        assert kind == "ValueError" and "data is empty" in message and f"no rank of {world}" in message


def test_rank_mismatch_error_is_exported_and_keeps_valueerror():
    import widetopo

    assert issubclass(widetopo.RankMismatchError, widetopo.WidetopoError)
    assert issubclass(widetopo.RankMismatchError, ValueError)


def test_data_split_option_is_validated():
    import widetopo

    with pytest.raises(ValueError, match="data_split must be one of 'auto', 'per_rank', 'replicated'"):
        widetopo.prune(make_model(), union(1), DENSITY, method="magnitude", data_split="sharded")


def test_describe_differences_names_each_setting_and_its_ranks():
    from widetopo.distributed.agreement import describe_differences

    lines = describe_differences([
        {"density": 0.1, "names": ["a [2]", "b [3]"], "seed": 0},
        {"density": 0.1, "names": ["a [2]", "b [4]"], "seed": 0},
        {"density": 0.2, "names": ["a [2]", "b [3]"], "seed": 0},
    ])
    assert lines == [
        "density: 0.1 on ranks 0, 1; 0.2 on rank 2",
        "names (entry 1): b [3] on ranks 0, 2 (2 entries); b [4] on rank 1 (2 entries)",
    ]
