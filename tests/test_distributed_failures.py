"""Failures on one rank only, 2 gloo processes: every rank must raise promptly (the failed rank
its own error, the other an error naming it), never wait in a collective until the process
group's timeout. Covers arguments refused before round 1 (widetopo.prune, widetopo.saliency, its
masks, and Pruner built directly), nested fail_together blocks, and a scorer that selects the
masks itself (selection = "mask") raising in choose_masks. The process group's timeout is short (TIMEOUT): a
regression that waits in a collective shows up as a slow or timed-out error, and the spawn's own
limit stops a hung worker, both failures of these tests. After every failure the ranks run one
more all_reduce and one pruning together, which fails if a stray collective was left unpaired."""
import datetime
import os

import pytest
import torch
from torch import nn

from gloo import failure as _failure, spawn

pytestmark = [pytest.mark.needs_kernel("global_threshold", "apply_masks_", "mask_stats"),
              pytest.mark.usefixtures("one_thread")]

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

TIMEOUT = 20  # the process group's timeout (s); a prompt failure takes well under PROMPT
PROMPT = 8


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def make_data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 4, generator=g) for _ in range(2)]


def abs_scorer(bad_validate=False):
    """|theta| scores; validate() refuses the run when bad_validate."""
    from widetopo.scores.base import Scorer

    class Abs(Scorer):
        name = "abs-test"
        data_dependent = False

        def validate(self, model, names, options):
            if bad_validate:
                raise ValueError("abs-test: this rank refuses the run")

        def score(self, ctx, batches):
            return [p.detach().abs() for p in ctx.prunable]

    return Abs()


def mask_scorer(fail_round=None):
    """selection = "mask": choose_masks keeps the `keep` largest |theta| itself (ties by index);
    raises in round `fail_round`."""
    from widetopo.scores.base import Scorer

    class KeepLargest(Scorer):
        name = "keep-largest-test"
        data_dependent = False
        selection = "mask"

        def score(self, ctx, batches):
            return [p.detach().abs() * m for p, m in zip(ctx.prunable, ctx.masks)]

        def choose_masks(self, ctx, scores, keep):
            if ctx.round == fail_round:
                raise ValueError(f"choose_masks broke in round {ctx.round}")
            flat = torch.cat([s.flatten() for s in scores])
            chosen = torch.zeros_like(flat, dtype=torch.bool)
            chosen[torch.argsort(flat, descending=True, stable=True)[:keep]] = True
            return [c.view_as(s) & m for c, s, m in zip(chosen.split([s.numel() for s in scores]), scores, ctx.masks)]

    return KeepLargest()


def _nested(rank):
    """Rank 1 fails in the outer block before the inner one; rank 0 runs the inner block."""
    from widetopo.distributed.collectives import fail_together

    with fail_together(torch.device("cpu"), "the outer block"):
        if rank == 1:
            raise ValueError("rank 1 failed before the inner block")
        with fail_together(torch.device("cpu"), "the inner block"):
            pass


def _nested_inner_fails(rank):
    from widetopo.distributed.collectives import fail_together

    with fail_together(torch.device("cpu"), "the outer block"):
        with fail_together(torch.device("cpu"), "the inner block"):
            if rank == 1:
                raise ValueError("rank 1 failed in the inner block")


def _paired(rank):
    """True when the next collective still pairs rank with rank (sum of rank + 1 over 2 ranks)."""
    t = torch.tensor([rank + 1])
    torch.distributed.all_reduce(t)
    return int(t) == 3


def _worker(rank, world, port, outdir):
    import widetopo
    from widetopo.engine.pruner import Pruner

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT))
    bad = rank == 1
    opts = dict(verbose=False)
    cases = {
        # widetopo.prune: option resolution, _check_density, select_prunable
        "option": lambda: widetopo.prune(make_model(), make_data(), 0.5, method="snip",
                                         **(dict(bogus=1) if bad else {}), **opts),
        "density": lambda: widetopo.prune(make_model(), make_data(), 1.5 if bad else 0.5, method="magnitude", **opts),
        "selection": lambda: widetopo.prune(make_model(), make_data(), 0.5, method="magnitude",
                                            names=["nope.weight"] if bad else None, **opts),
        # Pruner.__init__ reached through prune: EngineOptions, the device, the scorer's validate
        "engine": lambda: widetopo.prune(make_model(), make_data(), 0.5, method="magnitude", rounds=0 if bad else 1,
                                         **opts),
        "device": lambda: widetopo.prune(make_model(), make_data(), 0.5, method="magnitude",
                                         device="no-such-device" if bad else None, **opts),
        "validate": lambda: widetopo.prune(make_model(), make_data(), 0.5, method=abs_scorer(bad), **opts),
        "target": lambda: widetopo.prune(make_model(), make_data(), 1e-4 if bad else 0.5, method="magnitude",
                                         count="exact", **opts),
        # widetopo.saliency, and Pruner built directly (run() never reached on the good rank)
        "saliency": lambda: widetopo.saliency(make_model(), make_data(), "snip", **(dict(bogus=1) if bad else {}),
                                              **opts),
        "saliency_masks": lambda: widetopo.saliency(make_model(), make_data(), "snip", **opts, masks={
            n: torch.ones(p.shape, dtype=torch.bool if not bad else torch.float32)
            for n, p in make_model().named_parameters() if n.endswith("weight")}),
        "pruner": lambda: Pruner(make_model(), abs_scorer(), 0.5, rounds=0 if bad else 1, **opts).run(make_data()),
        "pruner_validate": lambda: Pruner(make_model(), abs_scorer(bad), 0.5, **opts).run(make_data()),
        "nested": lambda: _nested(rank),
        "nested_inner": lambda: _nested_inner_fails(rank),
        # selection = "mask": rank 1's choose_masks raises in round 2 of 3
        "choose_masks": lambda: widetopo.prune(make_model(), make_data(), 0.3, method=mask_scorer(2 if bad else None),
                                               rounds=3, **opts),
    }
    out = {"errors": {}, "paired": {}}
    try:
        for case, call in cases.items():
            out["errors"][case] = _failure(call)
            out["paired"][case] = _paired(rank)
        out["masks"] = dict(widetopo.prune(make_model(), make_data(), 0.3, method=mask_scorer(), rounds=3, **opts))
    finally:
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("failures")
    spawn(_worker, 2, str(outdir), timeout=180)
    return [torch.load(outdir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


#: case -> (rank 1's exception type, words its message must hold, what rank 0's error names)
EXPECTED = {
    "option": ("ValueError", ["unknown option(s) ['bogus']"], "checking the arguments of the pruning call"),
    "density": ("ValueError", ["density", "1.5"], "checking the arguments of the pruning call"),
    "selection": ("ValueError", ["names", "nope.weight"], "checking the arguments of the pruning call"),
    "engine": ("ValueError", ["rounds"], "checking the arguments of the pruning call"),
    "device": ("ValueError", ["device", "no-such-device"], "checking the arguments of the pruning call"),
    "validate": ("ValueError", ["abs-test: this rank refuses the run"], "checking the arguments of the pruning call"),
    "target": ("ValueError", ["density 0.0001 keeps no weight"], "checking the arguments of the pruning call"),
    "saliency": ("ValueError", ["unknown option(s) ['bogus']"], "checking the arguments of the pruning call"),
    "saliency_masks": ("ValueError", ["masks['0.weight'] must be a bool tensor"], "checking the masks of saliency"),
    "pruner": ("ValueError", ["rounds"], "checking the arguments of the Pruner"),
    "pruner_validate": ("ValueError", ["abs-test: this rank refuses the run"], "checking the arguments of the Pruner"),
    "nested": ("ValueError", ["rank 1 failed before the inner block"], "the outer block"),
    "nested_inner": ("ValueError", ["rank 1 failed in the inner block"], "the outer block"),
    "choose_masks": ("ValueError", ["choose_masks broke in round 2"], "selecting the masks of round 2"),
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_one_failing_rank_stops_every_rank_promptly(spawned, case):
    kind, needles, what = EXPECTED[case]
    good, bad = spawned[0]["errors"][case], spawned[1]["errors"][case]
    assert bad is not None and good is not None, (good, bad)
    assert bad[0] == kind and all(n in bad[1] for n in needles), bad
    assert good[0] == "RuntimeError" and good[1].startswith(f"{what} failed on rank(s) 1 "), good
    assert max(good[2], bad[2]) < PROMPT, (good, bad)
    assert spawned[0]["paired"][case] and spawned[1]["paired"][case]  # no collective left unpaired


def test_the_ranks_prune_together_after_the_failures(spawned, one_thread):
    """The mask-selecting scorer without a failure: both ranks give one process's masks."""
    import widetopo

    single = widetopo.prune(make_model(), make_data(), 0.3, method=mask_scorer(), rounds=3, verbose=False)
    for r in spawned:
        assert list(r["masks"]) == list(single) and all(torch.equal(r["masks"][n], single[n]) for n in single)


def test_a_nested_fail_together_is_a_no_op_without_a_process_group():
    """One process: the blocks do nothing, the error passes through unchanged."""
    from widetopo.distributed.collectives import fail_together

    with pytest.raises(KeyError, match="inner"):
        with fail_together(torch.device("cpu"), "outer"):
            with fail_together(torch.device("cpu"), "inner"):
                raise KeyError("inner")


def test_collective_device_follows_the_backend_and_the_model(monkeypatch):
    """gloo (or no process group): the CPU. NCCL: the CUDA device of the model's first CUDA
    parameter (ranks that put their model on cuda:rank without torch.cuda.set_device), else the
    current CUDA device. NCCL is simulated: no GPU is needed to check the choice."""
    from widetopo.distributed import collectives

    assert collectives.collective_device(make_model()) == torch.device("cpu")  # no process group
    monkeypatch.setattr(collectives, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert collectives.collective_device(make_model()) == torch.device("cpu")
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.collective_device(make_model()) == torch.device("cuda", 3)  # a CPU model
    assert collectives.collective_device("not a model") == torch.device("cuda", 3)

    class OnCuda1(nn.Module):  # stands for a model moved to cuda:1
        def parameters(self, recurse=True):
            yield type("P", (), {"device": torch.device("cuda", 1)})()

    assert collectives.collective_device(OnCuda1()) == torch.device("cuda", 1)
